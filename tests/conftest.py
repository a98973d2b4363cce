"""Shared fixtures: a real redis-server on a free loopback port; Exchanges built from real parsed requests."""
import shutil
import socket
import subprocess
import time
import types

import pytest



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server subprocess: no persistence, loopback only. kill() stops it mid-test (outage tests).
    `args`: more server options, e.g. ("--requirepass", "pw")."""

    def __init__(self, args=()):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith((b"+PONG", b"-NOAUTH")):   # up (NOAUTH: with a password)
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.kill()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _need_redis_server():
    if shutil.which("redis-server") is None:
        if __import__("os").environ.get("CI"):
            pytest.fail("redis-server is not installed: `make test` installs it (apt-get install redis-server)")
        pytest.skip("redis-server is not installed (`make test` installs it)")


@pytest.fixture
def redis_server():
    _need_redis_server()
    server = RedisServer()
    yield server
    server.kill()


REDIS_PASSWORD = "s3cret-redis-pw"


@pytest.fixture
def redis_server_with_password():
    """A redis-server that requires AUTH with REDIS_PASSWORD."""
    _need_redis_server()
    server = RedisServer(("--requirepass", REDIS_PASSWORD))
    yield server
    server.kill()


@pytest.fixture
def make_exchange():
    """make_exchange(path, headers={...}, model=..., prompt=..., max_tokens=...) -> a real Exchange whose
    parser has parsed a real HTTP request with those headers."""
    from fastgw.protocol.http import HEAD, RequestParser
    from fastgw.proxy.exchange import Exchange

    def make(path="/v1/chat/completions", headers=None, model="gpt-4o-mini", prompt=100, max_tokens=-1, n=-1,
             consumer="", group="", method=b"POST"):
        lines = [f"{method.decode()} {path} HTTP/1.1", "host: gw"]
        for k, v in (headers or {}).items():
            lines.append(f"{k}: {v}")
        head = ("\r\n".join(lines) + "\r\ncontent-length: 0\r\n\r\n").encode("latin-1")
        p = RequestParser()
        p.feed(head)
        assert p.next_event() == HEAD
        ex = Exchange("req-1", "127.0.0.1", method, path, p, time.perf_counter())
        ex.model = model
        ex._prompt_estimate = prompt
        ex.fields = types.SimpleNamespace(max_tokens=max_tokens, n=n)
        ex.consumer = consumer
        ex.group = group
        return ex

    return make


@pytest.fixture
def policy_ctx(tmp_path):
    """A PolicyContext with a real Logger (into a buffer), real Stats and a fresh run_dir."""
    import io

    from fastgw.runtime.config import Config
    from fastgw.observability.logs import Logger
    from fastgw.observability.metrics import Stats
    from fastgw.policies.api import PolicyContext

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    buf = io.StringIO()
    ctx = PolicyContext(Logger(buf, worker=0), Stats(str(tmp_path / "metrics"), "0"), str(run_dir), "0", Config())
    ctx.log.buffer = buf  # lets tests read what was logged
    return ctx
