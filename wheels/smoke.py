"""Smoke test of an installed fastgw: the one every built wheel must pass (cibuildwheel's test-command and
wheels/build-local.sh run it with the Python the wheel was installed into).

It imports fastgw (which fails loudly if a compiled module is missing), checks `fastgw --version`, starts
`fastgw serve` on the embedded default config (the built-in mock upstream, no keys needed) on a free loopback
port, sends one chat completion with urllib, checks the answer, then stops the server with SIGTERM and checks
that it exits 0. Standard library only: the wheel's own dependencies are all that is installed.

    python wheels/smoke.py            # exit 0 and one "smoke: ok" line on success
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

# Generous: cibuildwheel runs aarch64 wheels under QEMU emulation, where start-up takes many seconds.
START_TIMEOUT = float(os.environ.get("SMOKE_START_TIMEOUT", "90"))
STOP_TIMEOUT = float(os.environ.get("SMOKE_STOP_TIMEOUT", "60"))


def fail(msg: str, logs: str = "") -> None:
    sys.stderr.write(f"smoke: FAILED: {msg}\n")
    if logs:
        sys.stderr.write("---- server output ----\n" + logs[-8000:] + "\n")
    sys.exit(1)


def fastgw_command() -> list[str]:
    """The `fastgw` console script installed beside this interpreter (what users run), not `python -m`."""
    bindir = os.path.dirname(sys.executable)
    exe = shutil.which("fastgw", path=bindir) or shutil.which("fastgw")
    if exe is None:
        fail(f"no `fastgw` script next to {sys.executable} or on PATH")
    return [exe]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat(port: int) -> dict:
    body = json.dumps({
        "model": "smoke-test",
        "messages": [{"role": "user", "content": "Say hello to the smoke test."}],
        "max_tokens": 16,
    }).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json", "Authorization": "Bearer smoke-test"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        if resp.status != 200:
            raise AssertionError(f"status {resp.status}")
        return json.loads(resp.read())


def main() -> None:
    import fastgw  # noqa: F401  (the import itself checks every compiled module is there)

    cmd = fastgw_command()
    out = subprocess.run(cmd + ["--version"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0 or fastgw.__version__ not in out.stdout + out.stderr:
        fail(f"`fastgw --version` gave {out.returncode}: {out.stdout!r} {out.stderr!r}")

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTGW_")}
    env.update(FASTGW_HOST="127.0.0.1", FASTGW_PORT=str(port), FASTGW_WORKERS="1")
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd + ["serve"], env=env, stdout=log, stderr=subprocess.STDOUT)

    def logs() -> str:
        log.seek(0)
        return log.read()

    try:
        deadline = time.monotonic() + START_TIMEOUT
        answer = None
        while answer is None:
            if proc.poll() is not None:
                fail(f"`fastgw serve` exited with {proc.returncode} before answering", logs())
            try:
                answer = chat(port)
            except (ConnectionError, urllib.error.URLError, socket.timeout) as exc:
                if isinstance(exc, urllib.error.HTTPError):
                    fail(f"chat completion answered HTTP {exc.code}: {exc.read()[:500]!r}", logs())
                if time.monotonic() > deadline:
                    fail(f"no answer on port {port} within {START_TIMEOUT:.0f} s ({exc})", logs())
                time.sleep(0.2)
        try:
            content = answer["choices"][0]["message"]["content"]
            assert answer["object"] == "chat.completion", answer["object"]
            assert isinstance(content, str) and content, "empty content"
            assert answer["choices"][0]["message"]["role"] == "assistant"
            assert answer["usage"]["total_tokens"] > 0, answer["usage"]
        except (KeyError, IndexError, TypeError, AssertionError) as exc:
            fail(f"unexpected chat completion {answer!r}: {exc!r}", logs())

        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            fail(f"`fastgw serve` still running {STOP_TIMEOUT:.0f} s after SIGTERM", logs())
        if code != 0:
            fail(f"`fastgw serve` exited with {code} after SIGTERM (expected 0)", logs())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"smoke: ok (fastgw {fastgw.__version__}, python {sys.version.split()[0]}, "
          f"{len(content)} chars from the mock)")


if __name__ == "__main__":
    main()
