import datetime
import io

import orjson

from fastgw.observability.logs import Logger


def lines(buf):
    return [orjson.loads(line) for line in buf.getvalue().splitlines()]


def test_one_json_line_per_event_with_fields():
    buf = io.StringIO()
    log = Logger(buf, worker=2)
    log.info("listening", port=8080)
    log.warning("slow", ms=12.5)
    log.error("boom", upstream="openai")
    a, b, c = lines(buf)
    assert (a["level"], a["event"], a["worker"], a["port"]) == ("info", "listening", 2, 8080)
    assert (b["level"], b["ms"]) == ("warning", 12.5)
    assert (c["level"], c["upstream"]) == ("error", "openai")
    ts = datetime.datetime.fromisoformat(a["ts"].replace("Z", "+00:00"))
    assert ts.tzinfo is not None


def test_no_worker_key_when_unset_and_binary_stream():
    buf = io.BytesIO()

    class Wrapper:  # a text stream with a .buffer, like sys.stderr
        buffer = buf

    Logger(Wrapper()).info("x")
    rec = orjson.loads(buf.getvalue())
    assert "worker" not in rec and rec["event"] == "x"


def test_never_raises():
    class Broken:
        def write(self, _):
            raise OSError("closed")

        def flush(self):
            raise OSError("closed")

    Logger(Broken()).info("x", obj=object())  # neither the stream nor the value may raise
    buf = io.StringIO()
    Logger(buf).info("y", obj=object(), **{"k": {1: 2}})
    assert lines(buf)[0]["k"] == {"1": 2}


def test_exception_logs_stack_and_returns_an_id():
    buf = io.StringIO()
    log = Logger(buf)
    try:
        raise ValueError("secret detail")
    except ValueError:
        error_id = log.exception("handler failed", path="/v1/chat/completions")
    rec = lines(buf)[0]
    assert rec["error_id"] == error_id and len(error_id) == 12
    assert rec["exc_type"] == "ValueError" and "secret detail" in rec["stack"]
    assert rec["level"] == "error" and rec["path"] == "/v1/chat/completions"
    # the id, which is all a client gets to see, says nothing about the exception
    assert "secret" not in error_id


def test_bind_keeps_stream():
    buf = io.StringIO()
    Logger(buf).bind(5).info("child")
    assert lines(buf)[0]["worker"] == 5


def test_log_throttle_logs_the_first_then_counts_the_rest():
    import io

    import orjson

    from fastgw.observability.logs import LogThrottle, Logger

    out = io.StringIO()
    t = [100.0]
    throttle = LogThrottle(Logger(out), 10.0, clock=lambda: t[0])
    assert throttle.warning("proxy protocol refused", peer="a") is True
    for _ in range(50):
        assert throttle.warning("proxy protocol refused", peer="b") is False
    assert throttle.warning("other event") is True            # events are throttled separately
    t[0] += 10.0
    assert throttle.warning("proxy protocol refused", peer="c") is True
    lines = [orjson.loads(l) for l in out.getvalue().splitlines()]
    assert [(l["event"], l.get("peer"), l.get("suppressed")) for l in lines] == [
        ("proxy protocol refused", "a", None), ("other event", None, None), ("proxy protocol refused", "c", 50)]
