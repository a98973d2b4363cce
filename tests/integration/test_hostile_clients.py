"""Hostile clients (issue 13 item 1), on raw sockets against a real `fastgw serve`, with its default settings and
with key-auth (and a token rate limit) on: framing and smuggling, limits, slow clients, pipelining.

Every case ends in a clear refusal (a 4xx, or 501/505 where RFC 9110 names them, with an OpenAI error body and
the connection closed when the framing is in doubt) or in a closed connection; nothing smuggled behind a refusal
is answered; the worker keeps serving others (a normal request succeeds after each case, and the worker is the
one that started); the ops log holds no stack trace and none of the clients' bytes."""
from __future__ import annotations

import os
import socket
import threading
import time

import orjson
import pytest

from fastgw.policies.auth.policy import hash_key
from tests.integration.conftest import Gateway, MockThread, model_config, wait_for
from tests.integration.faulty_upstream import FaultyUpstream
from tests.integration.rawhttp import Reader, converse, parse, post

# The long variant (python -m perf.battery) multiplies the load of the slow-client and pipelining cases by this.
SCALE = int(os.environ.get("FASTGW_BATTERY_SCALE", "1"))
KEY = "sk-consumer-hostile-51b0"
MARK = b"hostile-7d2f"         # in every hostile request: must never reach the ops log
CHAT = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}]})
STREAM = orjson.dumps({"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "Hi"}]})


def policies(tmp) -> str:
    d = tmp / "policies"
    d.mkdir()
    (d / "10-auth.toml").write_text(f'policy = "key-auth"\n[[consumers]]\nname = "team"\nkeys = ["{hash_key(KEY)}"]\n')
    (d / "20-rate.toml").write_text('policy = "rate-limit"\n[[rules]]\nwindow = "minute"\ntokens = 100000000\n')
    return f'policies_dir = "{d}"\n'


def start(tmp, mock, upstream, mode: str, extra: str = "") -> Gateway:
    """Any model name goes to the mock (the "*" route), so hostile model names reach the access log; model
    "raw" to the raw upstream (tests/integration/faulty_upstream.py)."""
    cfg = model_config(mock.url, extra=(policies(tmp) if mode == "key-auth" else "") + extra, name="*")
    gw = Gateway(tmp, cfg + f'\n[[models]]\nname = "raw"\n[[models.deployments]]\nurl = "{upstream.url}"\n')
    gw.key = KEY if mode == "key-auth" else ""
    gw.worker = worker_pid(gw)
    return gw


def worker_pid(gw: Gateway) -> int:
    path = f"/proc/{gw.proc.pid}/task/{gw.proc.pid}/children"
    return int(wait_for(lambda: open(path).read().split(), what="the worker process")[0])


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def served_and_clean(gw: Gateway) -> None:
    """The worker that started still serves, and logged nothing it should not have."""
    c = converse(gw.port, post(CHAT, key=gw.key))
    assert [a.status for a in c.answers] == [200], c.raw[:300]
    assert worker_pid(gw) == gw.worker and os.path.exists(f"/proc/{gw.worker}")
    log = gw.ops_log()
    assert "Traceback" not in log and '"level":"error"' not in log and "worker died" not in log, log[-3000:]
    assert MARK.decode() not in log


@pytest.fixture(scope="module")
def mock():
    m = MockThread()
    yield m
    m.stop()


@pytest.fixture(scope="module")
def upstream():
    up = FaultyUpstream()
    yield up
    up.stop()
    assert not up.errors


@pytest.fixture(scope="module", params=["default", "key-auth"])
def gw(request, mock, upstream, tmp_path_factory):
    g = start(tmp_path_factory.mktemp(request.param), mock, upstream, request.param)
    yield g
    served_and_clean(g)
    g.stop()


# -- framing, smuggling and limits: one request each -------------------------------------------------------

def req(start_line: bytes, fields: bytes = b"", body: bytes = b"", host: bool = True) -> bytes:
    """A request with our marker (and the consumer's key, filled in per gateway, at %AUTH%)."""
    return (start_line + b"\r\n" + (b"host: gw\r\n" if host else b"") + b"x-trace: " + MARK + b"\r\n%AUTH%"
            + fields + b"\r\n" + body)


P = b"POST /v1/chat/completions HTTP/1.1"
CL = b"content-length: %d\r\n" % len(CHAT)
TE = b"transfer-encoding: chunked\r\n"
SMUGGLED = b"GET /healthz HTTP/1.1\r\nhost: gw\r\n\r\n"


def chunked(body: bytes, ext: bytes = b"") -> bytes:
    return b"%x%s\r\n%s\r\n0\r\n\r\n" % (len(body), ext, body)


def jbody(raw: bytes, ctype: bytes = b"content-type: application/json\r\n") -> tuple:
    return (P, ctype + b"content-length: %d\r\n" % len(raw), raw)


REFUSED_400 = {400}
# name -> (start line, fields, body, allowed statuses). A status set with 200 means the request is valid (odd but
# allowed); "closed" means closing without an answer is right too.
CASES = {
    # framing and smuggling
    "cl and te": (P, CL + TE, b"0\r\n\r\n" + SMUGGLED, REFUSED_400),
    "te and cl": (P, TE + CL, b"0\r\n\r\n" + SMUGGLED, REFUSED_400),
    "two different cl": (P, b"content-length: 4\r\ncontent-length: 5\r\n", b"abcde" + SMUGGLED, REFUSED_400),
    "cl list": (P, b"content-length: 5, 5\r\n", b"abcde", REFUSED_400),
    "cl signed": (P, b"content-length: +5\r\n", b"abcde", REFUSED_400),
    "cl negative": (P, b"content-length: -1\r\n", b"", REFUSED_400),
    "cl hex": (P, b"content-length: 0x5\r\n", b"abcde", REFUSED_400),
    "cl with a space": (P, b"content-length: 1 0\r\n", b"abcdefghij", REFUSED_400),
    "cl 20 digits": (P, b"content-length: 99999999999999999999\r\n", b"", REFUSED_400),
    "cl over the body limit": (P, b"content-length: 999999999999\r\n", b"", {413}),
    "cl twice the same": (P, CL + CL, CHAT, {200}),
    "chunk size not hex": (P, TE, b"zz\r\nab\r\n0\r\n\r\n" + SMUGGLED, REFUSED_400),
    "chunk size overflow": (P, TE, b"ffffffffffffffffff\r\nab\r\n0\r\n\r\n", REFUSED_400),
    "chunk size negative": (P, TE, b"-5\r\nhello\r\n0\r\n\r\n", REFUSED_400),
    "chunk extension unterminated": (P, TE, chunked(CHAT, b';a="x'), REFUSED_400),
    "chunk extension bare": (P, TE, chunked(CHAT, b";"), REFUSED_400),
    "chunk extension valid": (P, TE, chunked(CHAT, b';name=value;q="a b"'), {200}),
    "chunk without its crlf": (P, TE, b"%x\r\n%sXX0\r\n\r\n" % (len(CHAT), CHAT), REFUSED_400),
    "chunk lines with bare lf": (P, TE, b"%x\n%s\n0\n\n" % (len(CHAT), CHAT), REFUSED_400),
    "chunk over the body limit": (P, TE, b"1100000\r\n" + b"x" * 1000, {413}),
    "trailers": (P, TE, chunked(CHAT)[:-2] + b"x-checksum: 1\r\n\r\n", {200}),
    "trailer with content-length": (P, TE, chunked(CHAT)[:-2] + b"content-length: 5\r\n\r\n" + SMUGGLED,
                                    REFUSED_400),
    "trailer with transfer-encoding": (P, TE, chunked(CHAT)[:-2] + b"transfer-encoding: chunked\r\n\r\n",
                                       REFUSED_400),
    "bare cr in a field": (P, b"x-a: b\rx-b: c\r\n" + CL, CHAT, REFUSED_400),
    "bare lf line end": (P, b"x-a: b\n" + CL, CHAT, REFUSED_400),
    "obs-fold": (P, b"x-a: b\r\n c\r\n" + CL, CHAT, REFUSED_400),
    "space before the colon": (P, b"content-length : 5\r\n", b"abcde", REFUSED_400),
    "tab before the colon": (P, b"x-a\t: b\r\n" + CL, CHAT, REFUSED_400),
    "empty field name": (P, b": b\r\n" + CL, CHAT, REFUSED_400),
    "nul in a value": (P, b"x-a: b\x00c\r\n" + CL, CHAT, REFUSED_400),
    "control byte in a value": (P, b"x-a: b\x01c\r\n" + CL, CHAT, REFUSED_400),
    "del in a value": (P, b"x-a: b\x7fc\r\n" + CL, CHAT, REFUSED_400),
    "nul in the target": (b"GET /heal\x00thz HTTP/1.1", b"", b"", REFUSED_400),
    "control byte in the target": (b"GET /heal\x01thz HTTP/1.1", b"", b"", REFUSED_400),
    "non-ascii field name": (P, b"x-\xc3\xa9: b\r\n" + CL, CHAT, REFUSED_400),
    "non-ascii target": (b"GET /h\xc3\xa9althz HTTP/1.1", b"", b"", REFUSED_400),
    "non-ascii value (obs-text)": (P, b"x-a: caf\xe9\r\n" + CL, CHAT, {200}),
    "absolute-form target": (b"POST http://gw/v1/chat/completions HTTP/1.1", CL, CHAT, {404}),
    "asterisk target on GET": (b"GET * HTTP/1.1", b"", b"", REFUSED_400),
    "asterisk target on OPTIONS": (b"OPTIONS * HTTP/1.1", b"", b"", {404}),
    "two spaces in the request line": (b"GET  /healthz HTTP/1.1", b"", b"", REFUSED_400),
    "method not a token": (b"G@T /healthz HTTP/1.1", b"", b"", REFUSED_400),
    "lower-case method": (b"post /v1/chat/completions HTTP/1.1", CL, CHAT, {405}),
    "HTTP/1.0": (b"POST /v1/chat/completions HTTP/1.0", CL, CHAT, {200}),
    "HTTP/1.0 keep-alive, chunked, smuggling": (b"POST /v1/chat/completions HTTP/1.0",
                                                b"connection: keep-alive\r\n" + TE, chunked(CHAT) + SMUGGLED, {200}),
    "HTTP/0.9": (b"GET /healthz", b"", b"", REFUSED_400),
    "HTTP/1.2": (b"GET /healthz HTTP/1.2", b"", b"", {505}),
    "HTTP/2 preface": (b"PRI * HTTP/2.0", b"", b"SM\r\n\r\n", {505}),
    "no host": (b"GET /healthz HTTP/1.1", b"", b"", REFUSED_400),
    "two hosts": (b"GET /healthz HTTP/1.1", b"host: other\r\n", b"", REFUSED_400),
    "expect 100-continue": (P, b"expect: 100-Continue\r\n" + CL, CHAT, {200}),
    "expect something else": (P, b"expect: 200-ok\r\n" + CL, CHAT, {417}),
    "expect a list": (P, b"expect: 100-continue, x\r\n" + CL, CHAT, {417}),
    "te gzip": (P, b"transfer-encoding: gzip\r\n", b"", {501}),
    "te gzip, chunked": (P, b"transfer-encoding: gzip, chunked\r\n", chunked(CHAT), {501}),
    "te chunked, gzip": (P, b"transfer-encoding: chunked, gzip\r\n", chunked(CHAT), {501}),
    "te identity": (P, b"transfer-encoding: identity\r\n", b"", {501}),
    "te chunked twice": (P, b"transfer-encoding: chunked, chunked\r\n", chunked(CHAT), REFUSED_400),
    "te in two fields": (P, TE + TE, chunked(CHAT), REFUSED_400),
    "te empty": (P, b"transfer-encoding: \r\n", b"", REFUSED_400),
    "te quoted": (P, b'transfer-encoding: "chunked"\r\n', chunked(CHAT), REFUSED_400),
    "te with a parameter": (P, b"transfer-encoding: chunked;q=1\r\n", chunked(CHAT), REFUSED_400),
    # limits
    "header block too large": (P, b"x-pad: " + b"p" * 20000 + b"\r\n" + CL, CHAT, {431}),
    "too many fields": (P, b"".join(b"x-h%d: 1\r\n" % i for i in range(150)) + CL, CHAT, {431}),
    "request line too long": (b"GET /" + b"a" * 20000 + b" HTTP/1.1", b"", b"", {431}),
    "nested json 100k deep": jbody(b'{"model":"gpt-4o-mini","x":' + b"[" * 100000 + b"]" * 100000 + b"}")
    + (REFUSED_400,),
    "json number overflowing a double": jbody(b'{"model":"gpt-4o-mini","messages":[],"temperature":1e999999}')
    + (REFUSED_400,),
    "huge n": jbody(b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],'
                    b'"n":99999999999999999999999}') + ({200, 429},),
    "huge max_tokens": jbody(b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],'
                             b'"max_tokens":9223372036854775807,"n":128}') + ({200, 429},),
    "not utf-8": jbody(b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"\xff\xfe"}]}')
    + (REFUSED_400,),
    "lone surrogate escape": jbody(b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"\\ud800"}]}')
    + (REFUSED_400,),
    "no content type": jbody(CHAT, b"") + ({200},),
    "text/plain content type": jbody(CHAT, b"content-type: text/plain\r\n") + ({200},),
    "a form, not json": jbody(b"model=gpt-4o-mini&x=1", b"content-type: application/x-www-form-urlencoded\r\n")
    + (REFUSED_400,),
    "body an array": jbody(b'[{"model":"gpt-4o-mini"}]') + (REFUSED_400,),
    "body a string": jbody(b'"gpt-4o-mini"') + (REFUSED_400,),
    "body null": jbody(b"null") + (REFUSED_400,),
    "body empty": jbody(b"") + (REFUSED_400,),
    "model not a string": jbody(b'{"model":["gpt-4o-mini"],"messages":[]}') + (REFUSED_400,),
    "no model": jbody(b'{"messages":[]}') + (REFUSED_400,),
}


def test_framing_smuggling_and_limits(gw):
    auth = f"authorization: Bearer {gw.key}\r\n".encode() if gw.key else b""
    failures = []
    for name, (line, fields, body, allowed) in CASES.items():
        data = req(line, fields, body, host=name != "no host").replace(b"%AUTH%", auth)
        # a second answer can only be to a smuggled request: wait for it only when one is there
        c = converse(gw.port, data, expect=2 if SMUGGLED in body else 1, timeout=3)
        statuses = [a.status for a in c.answers if a.complete]
        problem = None
        if not statuses or statuses[0] not in allowed:
            problem = f"answered {statuses}, expected one of {sorted(allowed)}"
        elif len(statuses) > 1:
            problem = f"more than one answer {statuses}: something behind the request was read as a request"
        elif statuses[0] >= 400:
            a = c.answers[0]
            err = a.error()                             # OpenAI-shaped
            if MARK in a.body:
                problem = "the refusal echoes the client's bytes"
            # A message the parser refused (no code: framing in doubt) closes the connection; a refusal of a
            # well-framed one (invalid_json, unknown_url...) may keep it.
            if err["code"] is None and not (c.closed or a.headers.get("connection") == "close"):
                problem = "refused, but the connection stays open on framing in doubt"
        elif line.endswith(b"HTTP/1.0") and not (c.closed or c.answers[0].headers.get("connection") == "close"):
            problem = "an HTTP/1.0 request was not closed after its answer"
        if problem:
            failures.append(f"{name}: {problem}: {c.raw[:200]!r}")
        ok = converse(gw.port, post(CHAT, key=gw.key))
        if [a.status for a in ok.answers] != [200]:
            failures.append(f"{name}: the next request failed: {ok.raw[:200]!r}")
    assert not failures, "\n".join(failures)


def test_the_access_log_cannot_be_forged(gw, mock):
    # A model name with a line break, quotes, a JSON-looking tail and control characters: one access line, holding
    # exactly that name (the "*" route sends any model to the mock).
    model = 'gpt\n{"request_id":"forged"}\r\u2028"\\\x00\x1b[31m' + MARK.decode()
    body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    c = converse(gw.port, post(body, "x-request-id: forge-me\r\n", key=gw.key))
    assert c.answers[0].status == 200
    lines = wait_for(lambda: [x for x in gw.access_lines() if x["request_id"] == "forge-me"], what="its line")
    assert len(lines) == 1 and lines[0]["model"] == model
    assert not [x for x in gw.access_lines() if x["request_id"] == "forged"]


@pytest.mark.parametrize("rid", ['a"b', "a b", "a" * 200, "é", "<script>"])
def test_an_odd_request_id_is_replaced_not_echoed(gw, rid):
    c = converse(gw.port, post(CHAT, f"x-request-id: {rid}\r\n", key=gw.key))
    assert c.answers[0].status == 200 and c.answers[0].headers["x-request-id"].startswith("req-")


# -- slow clients -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["default", "key-auth"])
def slow_gw(request, mock, upstream, tmp_path_factory):
    g = start(tmp_path_factory.mktemp("slow-" + request.param), mock, upstream, request.param,
              "[server]\nheader_timeout = 1.0\nbody_timeout = 1.0\nmax_body_bytes = 65536\n"
              "[upstream]\nstream_gap_timeout = 30\n")
    yield g
    served_and_clean(g)
    g.stop()


def dribble(port: int, first: bytes, rest: bytes, out: dict) -> None:
    """Send `first` at once, then `rest` a byte every 0.1 s until an answer comes or the connection closes;
    out: the answers and the seconds it took."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        t0 = time.monotonic()
        s.sendall(first)
        s.settimeout(0.1)
        got = b""
        for i in range(len(rest)):
            try:
                s.send(rest[i:i + 1])
                chunk = s.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            got += chunk
            if not chunk or b"\r\n\r\n" in got:
                break
        s.settimeout(5)
        try:
            while chunk := s.recv(65536):
                got += chunk
        except OSError:
            pass
        out["answers"] = parse(got)
        out["after"] = time.monotonic() - t0


@pytest.mark.parametrize("what", ["head", "body"])
def test_slowloris_gets_408_at_the_timeout_and_others_are_served(slow_gw, what):
    auth = f"authorization: Bearer {slow_gw.key}\r\n" if slow_gw.key else ""
    head = f"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n{auth}content-length: {len(CHAT)}\r\n\r\n".encode()
    first, rest = (b"", head + CHAT) if what == "head" else (head, CHAT)
    results = [{} for _ in range(50 * SCALE)]
    threads = [threading.Thread(target=dribble, args=(slow_gw.port, first, rest, out)) for out in results]
    for t in threads:
        t.start()
    # Meanwhile every other client is served as usual.
    t0 = time.monotonic()
    for _ in range(20):
        c = converse(slow_gw.port, post(CHAT, key=slow_gw.key))
        assert [a.status for a in c.answers] == [200]
    assert time.monotonic() - t0 < 2.0 * SCALE
    for t in threads:
        t.join()
    for out in results:
        assert [a.status for a in out["answers"]] == [408], out
        assert out["answers"][0].error()["code"] == "request_timeout"
        assert out["after"] < 3.5 * SCALE      # 1 s timeouts, checked each second


def test_a_client_that_never_reads_a_large_stream_holds_back_the_upstream(slow_gw, upstream):
    """Backpressure, not buffering: while the client reads nothing, the gateway stops reading the upstream, whose
    sends then wait (an endless stream, made as it is sent), and the worker's memory stays flat; when the client
    reads, the stream flows again; when it leaves, the upstream sees the gateway close."""
    pid = slow_gw.worker
    before = rss_mb(pid)
    gone = upstream.closed_by_peer
    start = upstream.stream_sent                           # what earlier streams sent
    with socket.create_connection(("127.0.0.1", slow_gw.port), timeout=10) as s:
        s.sendall(post(orjson.dumps({**orjson.loads(STREAM), "model": "raw"}), "x-fault: endless-stream\r\n",
                       key=slow_gw.key))
        samples = [-1]

        def stalled():
            samples.append(upstream.stream_sent - start)
            return samples[-1] > 0 and samples[-1] == samples[-2]

        t0 = time.monotonic()
        while not stalled():
            assert time.monotonic() - t0 < 15, "the upstream never stopped sending: the gateway buffers the stream"
            time.sleep(0.5)
        held = upstream.stream_sent - start
        assert held < 64 * 1024 * 1024                     # what the sockets hold, no more
        assert rss_mb(pid) - before < 20, (before, rss_mb(pid))
        got = 0
        while got < held + 20 * SCALE * 1024 * 1024:       # reading: everything held, and the stream goes on
            chunk = s.recv(1 << 20)
            assert chunk
            got += len(chunk)
        assert upstream.stream_sent - start > held and rss_mb(pid) - before < 20
    wait_for(lambda: upstream.closed_by_peer > gone, timeout=3, what="the upstream to see the client leave")


def test_a_header_of_bare_crs_never_completes_and_times_out(slow_gw):
    c = converse(slow_gw.port, b"GET /healthz HTTP/1.1\rhost: gw\r\r" + MARK, timeout=4)
    assert [a.status for a in c.answers] == [408] and c.answers[0].headers["connection"] == "close"


# -- pipelining -----------------------------------------------------------------------------------------------

def test_pipelined_answers_come_in_order(gw):
    reqs, ids = b"", []
    for i in range(30):
        rid = f"pipe-{i}"
        ids.append(rid)
        if i % 3 == 0:
            reqs += f"GET /healthz HTTP/1.1\r\nhost: gw\r\nx-request-id: {rid}\r\n\r\n".encode()
        else:
            delay = "x-mock-delay-ms: 100\r\n" if i == 1 else ""
            reqs += post(STREAM if i % 3 == 2 else CHAT, f"x-request-id: {rid}\r\n{delay}", key=gw.key)
    c = converse(gw.port, reqs, expect=30, timeout=10)
    assert [a.headers["x-request-id"] for a in c.answers] == ids
    assert all(a.status == 200 and a.complete for a in c.answers)


def test_a_bad_request_mid_pipeline_does_not_poison_the_ones_before(gw):
    reqs = (post(CHAT, "x-request-id: before-1\r\nx-mock-delay-ms: 200\r\n", key=gw.key)
            + b"GET /healthz HTTP/1.1\r\nhost: gw\r\nx-request-id: before-2\r\n\r\n"
            + b"GET /healthz HTTP/1.1\r\nhost: gw\r\nx-bad: a\nx-trace: " + MARK + b"\r\n\r\n"
            + post(CHAT, "x-request-id: after\r\n", key=gw.key))
    c = converse(gw.port, reqs, expect=4, timeout=5)
    assert [(a.status, a.headers["x-request-id"]) for a in c.answers[:2]] == [(200, "before-1"), (200, "before-2")]
    assert [a.status for a in c.answers[2:]] == [400] and c.closed       # the one after is never read
    assert orjson.loads(c.answers[0].body)["choices"]


def test_a_pipeline_larger_than_the_buffers_is_answered_in_order(slow_gw):
    # The client sends far more than the gateway keeps while an answer is in flight (max head + max body: 80 KB
    # here), so the gateway stops reading it now and then; everything is answered, in order, nothing lost.
    n = 400 * SCALE
    reqs = b"".join(post(CHAT, f"x-request-id: big-{i}\r\nx-pad: {'p' * 8000}\r\n"
                         + ("x-mock-delay-ms: 300\r\n" if i == 0 else ""), key=slow_gw.key) for i in range(n))
    reader = Reader()
    with socket.create_connection(("127.0.0.1", slow_gw.port), timeout=20 * SCALE) as s:
        sender = threading.Thread(target=s.sendall, args=(reqs,))
        sender.start()
        while reader.complete < n:
            chunk = s.recv(1 << 20)
            assert chunk, f"closed after {reader.complete} answers"
            reader.feed(chunk)
        sender.join()
    assert [a.headers["x-request-id"] for a in reader.answers()] == [f"big-{i}" for i in range(n)]
    assert all(a.status == 200 for a in reader.answers())
