"""Real processes on real sockets: `fastgw serve` (supervisor + workers) in front of the built-in mock."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {port}")


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    """Poll `predicate` until it returns something true (returned); AssertionError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def wait_for_value(get, want, timeout: float = 10.0, what: str = "value"):
    """Poll `get()` until it equals `want` (a metric: workers publish theirs once a second); the failure says
    what it was instead."""
    deadline = time.monotonic() + timeout
    while True:
        got = get()
        if got == want:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still {got!r} after {timeout} s, expected {want!r}")
        time.sleep(0.05)


class MockThread:
    """The built-in mock in a thread of the test process, so tests can read its connection counters."""

    def __init__(self, **defaults):
        import uvloop

        from fastgw.devtools.mock import start_mock

        self.loop = uvloop.new_event_loop()
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(start_mock("127.0.0.1", 0, **defaults))
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"

    @property
    def stats(self):
        return self.server.mock_stats

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Gateway:
    """`python -m fastgw serve` as a subprocess; stdout (access log) and stderr (ops log) go to files."""

    def __init__(self, tmp_path, config: str | None = None, args: tuple = (), workers: int = 1, env=None):
        self.port = free_port()
        tmp_path = tmp_path / f"gateway-{self.port}"   # several gateways in one test keep their files apart
        tmp_path.mkdir()
        self.dir = tmp_path
        self.config_path = None
        cmd = [sys.executable, "-m", "fastgw", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", str(workers), *args]
        if config is not None:
            self.config_path = tmp_path / "fastgw.toml"
            self.config_path.write_text(config)
            cmd += ["--config", str(self.config_path)]
        self.out_path = tmp_path / "access.log"
        self.err_path = tmp_path / "ops.log"
        self.out = open(self.out_path, "wb")
        self.err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.out, stderr=self.err,
                                     env={**os.environ, **(env or {})})
        self.base = f"http://127.0.0.1:{self.port}"
        try:
            wait_port(self.port, self.proc)
        except Exception:
            self.stop()
            raise RuntimeError("gateway did not start:\n" + self.err_path.read_text())

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()
        self.err.close()
        return self.proc.returncode

    def ops_log(self) -> str:
        if not self.err.closed:   # closed by stop(): everything is in the file already
            self.err.flush()
        return self.err_path.read_text()

    def access_lines(self) -> list[dict]:
        import orjson

        return [orjson.loads(line) for line in self.out_path.read_bytes().splitlines() if line.strip()]


@pytest.fixture
def mock():
    m = MockThread()
    yield m
    m.stop()


@pytest.fixture
def start_gateway(tmp_path):
    started = []

    def start(*a, **kw) -> Gateway:
        gw = Gateway(tmp_path, *a, **kw)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


def model_config(upstream_url: str, extra: str = "", key_env: str = "", name: str = "gpt-4o-mini") -> str:
    key = f'key_env = "{key_env}"\n' if key_env else ""
    return f"""{extra}
[[models]]
name = "{name}"
[[models.deployments]]
url = "{upstream_url}"
{key}"""


def raw_request(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        try:
            while True:
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
        except socket.timeout:
            pass
        return b"".join(chunks)
