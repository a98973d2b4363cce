import os
import threading

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgw.observability.accesslog import AccessLog
from fastgw.observability.logs import Logger


def read_lines(path):
    with open(path, "rb") as f:
        return [orjson.loads(line) for line in f.read().splitlines()]


def test_lines_written_in_order_and_close_flushes_all(tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    for i in range(5000):
        log.write({"i": i, "path": "/v1/chat/completions", "status": 200})
        if i % 700 == 0:
            log.flush()
    log.close()  # the tail after the last flush must still land
    records = read_lines(path)
    assert [r["i"] for r in records] == list(range(5000))
    assert records[0] == {"i": 0, "path": "/v1/chat/completions", "status": 200}
    assert log.dropped == 0


def test_appends_to_existing_file(tmp_path):
    path = tmp_path / "access.log"
    path.write_bytes(b'{"old":1}\n')
    log = AccessLog(str(path))
    log.write({"new": 2})
    log.close()
    assert read_lines(path) == [{"old": 1}, {"new": 2}]


def test_write_after_close_is_ignored_and_close_is_idempotent(tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    log.write({"a": 1})
    log.close()
    log.write({"b": 2})
    log.close()
    assert read_lines(path) == [{"a": 1}]


def test_off_writes_nothing(tmp_path, capfd):
    log = AccessLog("off")
    assert not log.enabled
    log.write({"a": 1})
    log.flush()
    log.close()
    assert capfd.readouterr().out == ""


def test_stdout(capfd):
    log = AccessLog("-")
    log.write({"a": 1})
    log.write({"b": "x"})
    log.close()
    out = capfd.readouterr().out
    assert [orjson.loads(line) for line in out.splitlines()] == [{"a": 1}, {"b": "x"}]


def test_unserialisable_values_fall_back_to_str(tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    class Odd:
        def __str__(self):
            return "odd"

    log.write({"obj": Odd()})
    log.close()
    assert read_lines(path)[0]["obj"] == "odd"


def test_slow_pipe_does_not_block_write_and_drops_beyond_bound(tmp_path):
    r, w = os.pipe()
    os.set_blocking(r, True)
    errors = tmp_path / "errors.log"
    with open(errors, "w") as err:
        # nobody reads the pipe: the writer thread blocks in os.write once the pipe buffer (64 KiB) is full
        log = AccessLog(f"/dev/fd/{w}", max_queued_bytes=256 * 1024, log=Logger(err))
        record = {"pad": "x" * 1000}
        for _ in range(2000):  # ~2 MB, far beyond pipe buffer + bound; must return, never block
            log.write(record)
            log.flush()
        assert log.dropped > 0
        assert log.backlog <= 256 * 1024 + 2000
        accepted = 2000 - log.dropped
        # now drain the pipe so close() can finish, and check every accepted line arrived whole
        chunks = []
        reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(r, 1 << 16), b"")))
        reader.start()
        log.close()
        os.close(w)
        reader.join(10)
        os.close(r)
    lines = b"".join(chunks).splitlines()
    assert len(lines) == accepted
    assert all(orjson.loads(line) == record for line in lines)
    warnings = [orjson.loads(line) for line in errors.read_bytes().splitlines()]
    assert warnings and warnings[0]["event"] == "access log lines dropped"
    assert sum(w_["dropped"] for w_ in warnings) == log.dropped


@pytest.mark.timeout(10)
def test_schedule_flushes_from_the_loop(tmp_path):
    import asyncio

    path = tmp_path / "access.log"
    log = AccessLog(str(path), flush_interval=0.01)

    async def main():
        log.schedule(asyncio.get_running_loop())
        log.write({"a": 1})
        while log._enqueued_bytes == 0:
            await asyncio.sleep(0.005)

    asyncio.run(main())
    log.close()
    assert read_lines(path) == [{"a": 1}]


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(st.binary(min_size=1, max_size=40).map(lambda b: b + b"\n"), max_size=60),
       max_queued=st.integers(0, 600), flush_every=st.integers(1, 20), close_at=st.integers(0, 70))
def test_write_line_keeps_and_drops_like_reference(lines, max_queued, flush_every, close_at):
    """The compiled write_line against the plain-Python rule it replaced: a line is kept while at most
    max_queued_bytes wait, else counted as dropped; after close() lines are ignored."""
    log = AccessLog(os.devnull, max_queued_bytes=max_queued)
    try:
        pending, size, dropped = [], 0, 0
        for i, line in enumerate(lines):
            if i == close_at:
                log.close()                 # flushes what it accepted
                pending, size, dropped = [], 0, log.dropped
            log.write_line(line)
            if i < close_at:
                if size > max_queued:
                    dropped += 1
                else:
                    pending.append(line)
                    size += len(line)
            assert (log._pending, log._pending_bytes, log.dropped) == (pending, size, dropped)
            if i % flush_every == 0 and i < close_at:
                log.flush()
                pending, size = [], 0
                dropped = log.dropped       # a flush itself drops the batch when the writer is far behind
    finally:
        log.close()


def test_write_line_needs_bytes(tmp_path):
    log = AccessLog(str(tmp_path / "a.log"))
    with pytest.raises(TypeError):
        log.write_line("not bytes")
    log.close()
