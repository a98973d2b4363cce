"""Secrets and surfaces (issue 13 item 6): distinctive provider keys, consumer keys (good, wrong, a narrow one) and
a Redis password are planted in the environment and the policy files; the gateway is driven through successes and
every kind of refusal, reloaded, asked for its metrics and its admin status; then every output is searched for
them: each response (head and body), the access log, the ops log, /metrics, the admin endpoints, check-config.

The admin listener is never on the public port; loose file permissions are warned about at start (the checks
themselves: tests/unit/test_permissions.py; constant-time key checks: tests/unit/test_policies_auth.py)."""
from __future__ import annotations

import signal
import subprocess
import sys

import httpx
import orjson
import pytest

from fastgw.policies.auth.policy import hash_key
from tests.conftest import RedisServer, free_port, require_tool
from tests.integration.conftest import ROOT, Gateway, MockThread, wait_for, wait_port
from tests.integration.rawhttp import converse, parse, post

PROVIDER_KEYS = {"OPENAI_KEY": "sk-prov-openai-Q1w2E3r4t5", "ANTHROPIC_KEY": "sk-ant-prov-Z9x8C7v6b5",
                 "GEMINI_KEY": "gm-prov-P0o9I8u7y6", "AZURE_KEY": "az-prov-L5k4J3h2g1"}
GOOD = "sk-cons-good-M1n2B3v4c5"
NARROW = "sk-cons-narrow-W3e4R5t6y7"          # may use gpt-4o-mini only
WRONG = "sk-cons-wrong-T6y7U8i9o0"            # configured nowhere: what a client guessing sends
REDIS_PW = "redis-pw-G5f4D3s2a1"
SECRETS = [*PROVIDER_KEYS.values(), GOOD, NARROW, WRONG, REDIS_PW]
# Their distinctive tails too (a masked echo such as "sk-...t5" would keep one), and the consumers' digests.
NEEDLES = SECRETS + [s[-10:] for s in SECRETS] + [hash_key(GOOD), hash_key(NARROW)]

MODELS = ("gpt-4o-mini", "azure-gpt-4o", "claude-sonnet-4", "gemini-2.5-flash")


def config(mock_port: int, policies: str, admin_port: int) -> str:
    m = f"http://127.0.0.1:{mock_port}"
    return f"""policies_dir = "{policies}"
[server]
admin_port = {admin_port}
[upstream]
first_byte_timeout = 0.5
[[models]]
name = "gpt-4o-mini"
[[models.deployments]]
url = "{m}/v1"
key_env = "OPENAI_KEY"
[[models]]
name = "azure-gpt-4o"
[[models.deployments]]
url = "{m}"
provider = "azure"
model = "gpt-4o-prod"
key_env = "AZURE_KEY"
[[models]]
name = "claude-sonnet-4"
[[models.deployments]]
url = "{m}"
provider = "anthropic"
model = "claude-sonnet-4-20250514"
key_env = "ANTHROPIC_KEY"
[[models]]
name = "gemini-2.5-flash"
[[models.deployments]]
url = "{m}"
provider = "gemini"
key_env = "GEMINI_KEY"
"""


def write_policies(d, redis_port: int, dead_port: int) -> None:
    d.mkdir(mode=0o700)
    (d / "10-auth.toml").write_text(
        f'policy = "key-auth"\n[[consumers]]\nname = "team"\nkeys = ["{hash_key(GOOD)}"]\n'
        f'[[consumers]]\nname = "narrow"\nkeys = ["{hash_key(NARROW)}"]\nmodels = ["gpt-4o-mini"]\n')
    # Limits in Redis behind its password; a rule that refuses a second request carrying x-limit-me.
    (d / "20-rate.toml").write_text(
        f'policy = "rate-limit"\nbackend = "redis"\n[redis]\nurl = "redis://:{REDIS_PW}@127.0.0.1:{redis_port}/0"\n'
        '[[rules]]\nid = "once"\nmatch = { header = ["x-limit-me"] }\nrequests = 1\nwindow = "minute"\n'
        '[[rules]]\nper = ["consumer"]\ntokens = 100000000\n')
    # The same password for a Redis that is down: its failures are logged (fail open), never with it.
    (d / "30-rate-down.toml").write_text(
        f'policy = "rate-limit"\nbackend = "redis"\n[redis]\nurl = "redis://:{REDIS_PW}@127.0.0.1:{dead_port}/0"\n'
        'connect_timeout = 0.05\n[[rules]]\nrequests = 100000\n')
    (d / "40-budget.toml").write_text('policy = "budget"\n[[budgets]]\nconsumer = "*"\nusd = 1000.0\nperiod = "day"\n')
    for f in d.iterdir():
        f.chmod(0o600)


def chat(model: str, **kw) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": "Say hello"}], **kw})


def requests_and_refusals(gw, admin: int) -> list[tuple[str, bytes]]:
    """Drive the gateway through successes and every refusal; (what, raw bytes of the answer) for each."""
    out = []

    def ask(what, data, expect_status):
        c = converse(gw.port, data, timeout=10)
        statuses = [a.status for a in c.answers]
        assert statuses[:1] == [expect_status], (what, c.raw[:300])
        out.append((what, c.raw))

    auth = f"authorization: Bearer {GOOD}\r\n"
    for model in MODELS:
        ask(f"chat {model}", post(chat(model), key=GOOD), 200)
        ask(f"stream {model}", post(chat(model, stream=True, stream_options={"include_usage": True}), key=GOOD), 200)
    ask("api-key header", post(chat("gpt-4o-mini"), f"api-key: {GOOD}\r\n"), 200)
    ask("x-api-key header", post(chat("azure-gpt-4o"), f"x-api-key: {GOOD}\r\n"), 200)
    ask("messages api", post(orjson.dumps({"model": "claude-sonnet-4", "max_tokens": 20, "messages": [
        {"role": "user", "content": "hi"}]}), f"x-api-key: {GOOD}\r\nanthropic-version: 2023-06-01\r\n",
        path="/v1/messages"), 200)
    ask("embeddings", post(orjson.dumps({"model": "gpt-4o-mini", "input": "x"}), path="/v1/embeddings", key=GOOD), 200)
    ask("a key in the query string", post(chat("gpt-4o-mini"), path=f"/v1/chat/completions?api_key={GOOD}",
                                          key=GOOD), 200)
    # refusals
    ask("no key", post(chat("gpt-4o-mini")), 401)
    for header in ("authorization: Bearer {}", "api-key: {}", "x-api-key: {}", "authorization: {}"):
        ask(f"wrong key in {header}", post(chat("gpt-4o-mini"), header.format(WRONG) + "\r\n"), 401)
    ask("wrong key on the messages api", post(orjson.dumps({"model": "claude-sonnet-4", "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}]}), f"x-api-key: {WRONG}\r\n", path="/v1/messages"), 401)
    ask("a good key as basic auth", post(chat("gpt-4o-mini"), f"authorization: Basic {GOOD}\r\n"), 401)
    ask("model not allowed", post(chat("claude-sonnet-4"), key=NARROW), 403)
    ask("rate limited: first", post(chat("gpt-4o-mini"), "x-limit-me: 1\r\n", key=GOOD), 200)
    ask("rate limited", post(chat("gpt-4o-mini"), "x-limit-me: 1\r\n", key=GOOD), 429)
    ask("invalid json", post(b"{nope", key=GOOD), 400)
    ask("unknown model", post(chat("no-such-model"), key=GOOD), 404)
    ask("unknown url, key in the query", f"GET /nope?api_key={GOOD} HTTP/1.1\r\nhost: gw\r\n{auth}\r\n".encode(), 404)
    ask("wrong method", f"GET /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n{auth}\r\n".encode(), 405)
    ask("head too large", post(chat("gpt-4o-mini"), "x-pad: " + "p" * 20000 + "\r\n", key=GOOD), 431)
    ask("body too large", f"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n{auth}"
                          "content-length: 999999999\r\n\r\n".encode(), 413)
    ask("bad framing", f"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n{auth}"
                       "content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n".encode(), 400)
    ask("upstream error", post(chat("gpt-4o-mini"), "x-mock-status: 401\r\n", key=GOOD), 401)
    ask("translated upstream error", post(chat("claude-sonnet-4"), "x-mock-status: 401\r\n", key=GOOD), 502)
    ask("upstream timeout", post(chat("gemini-2.5-flash"), "x-mock-delay-ms: 3000\r\n", key=GOOD), 504)
    # surfaces
    for path in ("/metrics", "/healthz", "/readyz"):
        ask(path, f"GET {path} HTTP/1.1\r\nhost: gw\r\n\r\n".encode(), 200)
    ask("/v1/models", f"GET /v1/models HTTP/1.1\r\nhost: gw\r\n{auth}\r\n".encode(), 200)   # behind key-auth
    for path in ("/status", "/healthz", "/readyz"):
        c = converse(admin, f"GET {path} HTTP/1.1\r\nhost: gw\r\n\r\n".encode())
        assert c.answers[0].status == 200
        out.append((f"admin {path}", c.raw))
    return out


def test_no_secret_reaches_any_output(tmp_path):
    require_tool("redis-server")
    redis = RedisServer(("--requirepass", REDIS_PW))
    mock = MockThread()
    dead = free_port()
    admin = free_port()
    policies = tmp_path / "policies"
    write_policies(policies, redis.port, dead)
    cfg = config(mock.port, str(policies), admin)
    gw = Gateway(tmp_path, cfg, env=PROVIDER_KEYS)
    try:
        wait_port(admin, gw.proc)
        outputs = requests_and_refusals(gw, admin)
        metrics = httpx.get(gw.base + "/metrics", timeout=5).text
        assert 'consumer="team"' in metrics                  # the consumer's name is there, its key is not
        gw.signal(signal.SIGHUP)
        wait_for(lambda: "config reloaded" in gw.ops_log(), what="the reload")
        wait_for(lambda: "redis_unavailable" in gw.ops_log(), what="the down Redis to be logged")
        outputs.append(("status after reload", converse(admin, b"GET /status HTTP/1.1\r\nhost: a\r\n\r\n").raw))
        check = subprocess.run([sys.executable, "-m", "fastgw", "check-config", str(gw.config_path)], cwd=ROOT,
                               env={**PROVIDER_KEYS, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        outputs.append(("check-config", (check.stdout + check.stderr).encode()))
    finally:
        gw.stop()
        mock.stop()
        redis.kill()
    outputs += [("access log", gw.out_path.read_bytes()), ("ops log", gw.err_path.read_bytes())]
    answered = {parse(data)[0].headers.get("x-request-id") for what, data in outputs if not what.startswith(
        ("admin", "status", "check-config", "access", "ops"))}
    logged = {x["request_id"] for x in gw.access_lines()}
    assert answered <= logged, answered - logged                  # every answer was accounted, and searched
    leaks = [(what, needle) for what, data in outputs for needle in NEEDLES if needle.encode() in data]
    assert not leaks, leaks


MODEL = '[[models]]\nname = "m"\n[[models.deployments]]\nurl = "http://127.0.0.1:9/v1"\n'


def serve(path, *args, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastgw", "serve", "--config", str(path), "--workers", "1", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_the_admin_listener_is_never_the_public_port(tmp_path):
    # Both listeners use SO_REUSEPORT: on one port the kernel would share its connections between them (the
    # public one answering /status now and then). So one port for both is refused at start, whether the config
    # says so or the command line's --port makes it so. (/status is never answered on the public port:
    # tests/integration/test_operations.py test_admin_status_reload_and_isolation.)
    port = free_port()
    path = tmp_path / "fastgw.toml"
    for text, args in ((f"[server]\nport = {port}\nadmin_port = {port}\n", ()),
                       (f"[server]\nadmin_port = {port}\n", ("--port", str(port)))):
        path.write_text(text + MODEL)
        r = serve(path, *args)
        assert r.returncode == 2 and "server.admin_port" in r.stderr and "public port" in r.stderr, r.stderr


def test_a_world_writable_config_is_warned_about_at_start(tmp_path):
    path = tmp_path / "fastgw.toml"
    path.write_text(MODEL)
    ops = tmp_path / "ops.log"
    for mode, expected in ((0o644, 0), (0o666, 1)):
        path.chmod(mode)
        port = free_port()
        with open(ops, "w") as err:
            p = subprocess.Popen([sys.executable, "-m", "fastgw", "serve", "--config", str(path), "--workers", "1",
                                  "--port", str(port), "--access-log", "off"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                 stderr=err)
            try:
                wait_port(port, p)
            finally:
                p.send_signal(signal.SIGTERM)
                p.wait(30)
        warnings = [orjson.loads(x) for x in ops.read_text().splitlines() if "loose file permissions" in x]
        assert len(warnings) == expected, ops.read_text()
    assert warnings[0]["file"] == str(path) and warnings[0]["level"] == "warning"
    assert "world-writable" in warnings[0]["problem"]
