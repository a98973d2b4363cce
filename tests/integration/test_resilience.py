"""Retries, fallbacks, circuit breakers and health checks through the running gateway (issue 12), against
several upstreams on loopback, each failing one way: the built-in mock (its x-mock-* defaults make one answer
500, 429 or 400 context_length_exceeded to every request), a port nobody listens on, and `Scripted`, a tiny
upstream written here that answers what the test says (hang, reset before a byte, 429 then 200, a switch from
failing to healthy)."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import orjson
import pytest

from fastgw.policies.auth.policy import hash_key
from tests.conftest import free_port
from tests.integration.conftest import ROOT, MockThread, wait_for, wait_for_value

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Say hello"}]}
ANSWER = orjson.dumps({"id": "chatcmpl-s", "object": "chat.completion", "created": 1, "model": "scripted",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "scripted hello"},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})


def http(status: int, body: bytes = ANSWER, headers: bytes = b"") -> bytes:
    return (b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n"
            % (status, len(body), headers) + body)


def error(status: int, code: str = "x") -> bytes:
    return http(status, orjson.dumps({"error": {"message": f"scripted {status}", "type": "x", "param": None,
                                                "code": code}}))


class Scripted:
    """An upstream on loopback that answers request n (from 0) with `answer(n)`: response bytes (the connection
    stays open for the next request), ("delay", seconds, bytes), "reset" (close with RST before any byte) or
    "hang" (never answer). `requests` counts what arrived."""

    def __init__(self, answer):
        self.answer = answer
        self.requests = 0
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                n = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        n = int(value)
                while len(buf) < n:
                    buf += conn.recv(65536)
                buf = buf[n:]
                with self.lock:
                    i = self.requests
                    self.requests += 1
                what = self.answer(i)
                if what == "reset":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    return
                if what == "hang":
                    while conn.recv(65536):
                        pass
                    return
                if isinstance(what, tuple):
                    time.sleep(what[1])
                    what = what[2]
                conn.sendall(what)
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self):
        self.sock.close()


@pytest.fixture
def upstreams():
    made = []

    def make(kind, **kw):
        u = Scripted(kind) if callable(kind) else MockThread(**kw)
        made.append(u)
        return u

    yield make
    for u in made:
        u.stop()


def refused_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"          # nothing listens there: connections are refused


def models(*tables: str, server: str = "") -> str:
    return server + "\n".join(tables)


def model(name: str, urls, extra: str = "", provider: str = "openai") -> str:
    deps = "".join(f'[[models.deployments]]\nurl = "{u}"\nprovider = "{provider}"\n' for u in urls)
    return f'[[models]]\nname = "{name}"\n{extra}\n{deps}'


def post(gw, body=None, headers=None, timeout=20.0):
    return httpx.post(gw.base + "/v1/chat/completions", json=body or CHAT, headers=headers or {}, timeout=timeout)


def metric(gw, name: str, **labels) -> float:
    total = 0.0
    for line in httpx.get(gw.base + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def chat_lines(gw) -> list[dict]:
    return [line for line in gw.access_lines() if line["path"] == "/v1/chat/completions"]


def last_line(gw, n: int = 1) -> dict:
    """The access line of the n-th chat request (GET /metrics is logged too)."""
    return wait_for(lambda: len(chat_lines(gw)) >= n and chat_lines(gw)[n - 1], what=f"access line {n}")


# -- failures before the first byte: another deployment answers ----------------------------------------------------

@pytest.mark.parametrize("failure", ["refused", "500", "429", "hang", "reset"])
def test_a_failure_before_the_first_byte_is_served_by_a_healthy_deployment(failure, upstreams, start_gateway):
    good = upstreams(None)
    if failure == "refused":
        bad_url, kind = refused_url(), "connect"
    elif failure in ("500", "429"):
        bad_url, kind = upstreams(None, status=int(failure)).url, f"http_{failure}"
    else:
        bad_url, kind = upstreams(lambda n: failure).url, "timeout" if failure == "hang" else "reset"
    cfg = models(model("m", [bad_url, good.url], "[models.retry]\nattempts = 2\nbackoff_ms = 0"),
                 server="[upstream]\nfirst_byte_timeout = 1.0\n")
    gw = start_gateway(cfg)
    t0 = time.monotonic()
    r = post(gw)                                          # round robin: the first request goes to the bad one
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    assert r.headers["x-fastgw-model"] == "m"
    assert time.monotonic() - t0 < (4 if failure == "hang" else 2)
    line = last_line(gw)
    assert (line["status"], line["attempts"], line["upstream"]) == (200, 2, f"127.0.0.1:{good.port}")
    bad = bad_url.split("/")[2]
    wait_for_value(lambda: metric(gw, "fastgw_upstream_errors_total", upstream=bad, kind=kind), 1.0,
                   what=f"the {kind} counted")
    # Stream requests too (of two, the balancing sends one to the bad deployment first): nothing of the failed
    # attempt reaches the client.
    for _ in range(2):
        r = httpx.post(gw.base + "/v1/chat/completions", json={**CHAT, "stream": True}, timeout=20)
        assert r.status_code == 200 and r.text.startswith("data: {") and r.text.count("data: [DONE]") == 1
    assert sorted(last_line(gw, n)["attempts"] for n in (2, 3)) == [1, 2]


def test_without_retries_the_failure_reaches_the_client_as_before(upstreams, start_gateway):
    bad = upstreams(None, status=500)
    gw = start_gateway(models(model("m", [bad.url, upstreams(None).url])))
    r = post(gw)
    assert r.status_code == 500 and r.json()["error"]["code"] == "mock_error"
    assert last_line(gw)["attempts"] == 1


# -- failures after the first byte: a clean end, no retry ------------------------------------------------------------

def test_a_failure_after_the_first_byte_ends_the_stream_and_is_not_retried(upstreams, start_gateway):
    mock = upstreams(None)
    cfg = models(model("m", [mock.url, mock.url], "[models.retry]\nattempts = 3\nbackoff_ms = 0"),
                 server="[upstream]\nstream_gap_timeout = 1.0\n")
    gw = start_gateway(cfg)
    before = mock.stats.requests
    with pytest.raises(httpx.HTTPError):                  # reset after 2 events: the client sees a broken stream
        with httpx.stream("POST", gw.base + "/v1/chat/completions", json={**CHAT, "stream": True},
                          headers={"x-mock-reset-after": "2"}, timeout=20) as r:
            assert r.status_code == 200
            for _ in r.iter_bytes():
                pass
    assert mock.stats.requests - before == 1              # never sent again
    # A first token slower than stream_gap_timeout after the head: cut, not retried either.
    with pytest.raises(httpx.HTTPError):
        with httpx.stream("POST", gw.base + "/v1/chat/completions", json={**CHAT, "stream": True},
                          headers={"x-mock-first-token-delay-ms": "3000"}, timeout=20) as r:
            for _ in r.iter_bytes():
                pass
    assert mock.stats.requests - before == 2
    lines = wait_for(lambda: len(chat_lines(gw)) == 2 and chat_lines(gw), what="two access lines")
    assert [(l["error"], l["attempts"]) for l in lines] == [("upstream_reset", 1), ("upstream_timeout", 1)]


# -- 429 and retry-after ------------------------------------------------------------------------------------------

def test_retry_after_is_honoured_up_to_the_cap(upstreams, start_gateway):
    answers = {0: http(429, b'{"error":{"message":"slow down","type":"rate_limit","code":null}}',
                       b"retry-after: 5\r\n"),
               2: http(429, b'{"error":{"message":"slow down","type":"rate_limit","code":null}}',
                       b"retry-after-ms: 300\r\n")}
    s = upstreams(lambda n: answers.get(n, http(200)))
    gw = start_gateway(models(model("m", [s.url], "[models.retry]\nattempts = 2\nbackoff_ms = 0\n"
                                                  "retry_after_cap_ms = 600")))
    t0 = time.monotonic()
    r = post(gw)                                          # 429 asking 5 s: waited 0.6 s (the cap), then 200
    waited = time.monotonic() - t0
    assert r.status_code == 200 and 0.55 <= waited < 3, waited
    t0 = time.monotonic()
    r = post(gw)                                          # 429 asking 300 ms: waited that
    waited = time.monotonic() - t0
    assert r.status_code == 200 and 0.28 <= waited < 0.6, waited
    assert s.requests == 4


def test_a_429_on_the_last_attempt_reaches_the_client_with_its_retry_after(upstreams, start_gateway):
    bad = upstreams(None, status=429, retry_after=7)
    gw = start_gateway(models(model("m", [bad.url], "[models.retry]\nattempts = 2\nbackoff_ms = 0\n"
                                                    "retry_after_cap_ms = 100")))
    r = post(gw)
    assert r.status_code == 429 and r.headers["retry-after"] == "7"
    assert bad.stats.requests == 2 and last_line(gw)["attempts"] == 2


# -- fallbacks ------------------------------------------------------------------------------------------------------

def test_fallback_models_and_the_context_window_fallback(upstreams, start_gateway):
    small = upstreams(None, status=400, error_code="context_length_exceeded")
    down = upstreams(None, status=503)
    good = upstreams(None)
    cfg = models(model("small", [small.url], 'context_window_fallbacks = ["large"]'),
                 model("large", [good.url]),
                 model("primary", [down.url], 'fallbacks = ["claude"]'),
                 f'[[models]]\nname = "claude"\n[[models.deployments]]\nurl = "http://127.0.0.1:{good.port}"\n'
                 'provider = "anthropic"\nmodel = "claude-sonnet-4-5"\nkey_env = "ANTHROPIC_KEY"\n')
    gw = start_gateway(cfg, env={"ANTHROPIC_KEY": "sk-ant-test"})
    client = openai.OpenAI(base_url=gw.base + "/v1", api_key="x", max_retries=0, timeout=20)
    raw = client.chat.completions.with_raw_response.create(model="small", messages=CHAT["messages"])
    assert raw.headers["x-fastgw-model"] == "large"
    assert raw.parse().model == "large"                   # the upstream's own `model`, left as it sent it
    raw = client.chat.completions.with_raw_response.create(model="primary", messages=CHAT["messages"])
    assert raw.headers["x-fastgw-model"] == "claude"     # another provider (Anthropic's wire format)
    assert raw.parse().choices[0].message.content
    stream = client.chat.completions.create(model="primary", messages=CHAT["messages"], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    lines = wait_for(lambda: len(chat_lines(gw)) == 3 and chat_lines(gw), what="three access lines")
    assert [(l["model"], l["served_model"], l["attempts"]) for l in lines] == [
        ("small", "large", 2), ("primary", "claude", 2), ("primary", "claude", 2)]
    wait_for_value(lambda: metric(gw, "fastgw_fallbacks_total", model="primary", fallback="claude"), 2.0,
                   what="fallbacks counted")
    assert metric(gw, "fastgw_upstream_errors_total", kind="context_length_exceeded") == 1.0
    # Without a context-window fallback a plain model answers the 400 as the upstream sent it.
    r = post(gw, {**CHAT, "model": "large"}, headers={"x-mock-status": "400",
                                                      "x-mock-error-code": "context_length_exceeded"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


# -- circuit breakers --------------------------------------------------------------------------------------------

def test_the_breaker_opens_half_opens_and_closes_across_two_workers(upstreams, start_gateway):
    state = {"failing": True}
    flaky = upstreams(lambda n: ("delay", 0.5, error(500) if state["failing"] else http(200)))
    good = upstreams(None)
    admin = free_port()
    cfg = models(model("m", [flaky.url, good.url],
                       "[models.breaker]\nconsecutive_failures = 2\ncooldown_s = 4\nhalf_open_probes = 1"),
                 server=f"[server]\nadmin_port = {admin}\n")
    gw = start_gateway(cfg, workers=2)
    flaky_label = f"127.0.0.1:{flaky.port}"

    def burst(n):
        """n requests at once, each on its own connection (the kernel spreads them over both workers)."""
        out = []
        threads = [threading.Thread(target=lambda: out.append(post(gw, headers={"connection": "close"})))
                   for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sorted(r.status_code for r in out)

    while flaky.requests < 2:                             # two failures in a row, whichever workers saw them
        post(gw, headers={"connection": "close"})
    wait_for_value(lambda: metric(gw, "fastgw_deployment_state", model="m", upstream=flaky_label), 2.0,
                   what="the breaker open in /metrics")
    seen = flaky.requests
    assert burst(12) == [200] * 12 and flaky.requests == seen      # open: both workers skip it
    status = httpx.get(f"http://127.0.0.1:{admin}/status", timeout=5).json()
    states = {w["worker"]: [d["breaker"]["state"] for d in w["deployments"] if d["upstream"] == flaky_label]
              for w in status["workers"]}
    assert states == {"0": ["open"], "1": ["open"]}
    time.sleep(4.1)                                       # cool-down over: half-open, one probe at a time
    assert burst(8).count(500) == 1 and flaky.requests == seen + 1  # the probe failed: open again
    wait_for_value(lambda: metric(gw, "fastgw_breaker_opens_total", model="m", upstream=flaky_label), 2.0,
                   what="two opens counted")
    state["failing"] = False
    time.sleep(4.1)
    assert burst(8) == [200] * 8 and flaky.requests == seen + 2     # one probe, which succeeded: closed
    wait_for_value(lambda: metric(gw, "fastgw_deployment_state", model="m", upstream=flaky_label), 0.0,
                   what="the breaker closed in /metrics")
    for _ in range(6):
        post(gw)
    assert flaky.requests > seen + 2                      # traffic again


def test_health_checks_open_and_close_the_breaker_without_traffic(upstreams, start_gateway):
    state = {"up": False}
    checked = upstreams(lambda n: http(200) if state["up"] else error(503))
    good = upstreams(None)
    cfg = models(model("m", [checked.url, good.url],
                       'health_check = { path = "/v1/models", interval_s = 0.3, timeout_s = 1 }\n'
                       "[models.breaker]\nconsecutive_failures = 5\ncooldown_s = 60"))
    gw = start_gateway(cfg, workers=2)
    label = f"127.0.0.1:{checked.port}"
    wait_for_value(lambda: metric(gw, "fastgw_deployment_state", model="m", upstream=label), 2.0,
                   what="opened by the health check")
    seen = checked.requests
    for _ in range(4):
        assert post(gw, headers={"connection": "close"}).status_code == 200
    assert checked.requests - seen <= 1                   # only health checks (about one per 0.3 s) reach it
    state["up"] = True
    wait_for_value(lambda: metric(gw, "fastgw_deployment_state", model="m", upstream=label), 0.0,
                   what="closed by the health check")


# -- limits are charged once -----------------------------------------------------------------------------------

def test_limits_and_budgets_are_charged_once_per_client_request(tmp_path, upstreams, start_gateway):
    bad = upstreams(None, status=500)
    good = upstreams(None)
    pdir = tmp_path / "policies"
    pdir.mkdir()
    key = "sk-alice-resilience"
    (pdir / "10-auth.toml").write_text(f'policy = "key-auth"\n[[consumers]]\nname = "alice"\n'
                                       f'keys = ["{hash_key(key)}"]\n')
    (pdir / "20-rate.toml").write_text('policy = "rate-limit"\nbackend = "local"\n[[rules]]\nid = "r"\n'
                                       'match = { consumer = "alice" }\nwindow = "day"\nrequests = 3\n')
    cfg = f'policies_dir = "{pdir}"\n' + model("m", [bad.url, good.url],
                                                  "[models.retry]\nattempts = 2\nbackoff_ms = 0")
    gw = start_gateway(cfg)
    auth = {"authorization": f"Bearer {key}"}
    remaining = []
    for _ in range(3):
        r = post(gw, headers=auth)
        assert r.status_code == 200
        remaining.append(r.headers["x-ratelimit-remaining-requests"])
    assert remaining == ["2", "1", "0"]                   # one request each, whatever the attempts
    assert post(gw, headers=auth).status_code == 429
    lines = wait_for(lambda: len(chat_lines(gw)) == 4 and chat_lines(gw), what="four access lines")
    assert [l["status"] for l in lines] == [200, 200, 200, 429] and lines[3]["attempts"] == 0
    assert good.stats.requests == 3 and bad.stats.requests >= 1          # some went to the bad one first ...
    assert sum(l["attempts"] for l in lines) == 3 + bad.stats.requests   # ... and were retried, uncharged


# -- configuration ---------------------------------------------------------------------------------------------

def test_bad_config_is_refused_at_load_and_a_bad_reload_keeps_the_old_one(tmp_path, upstreams, start_gateway):
    good = upstreams(None)
    bad_cfg = models(model("a", [good.url], 'fallbacks = ["b"]'), model("b", [good.url], 'fallbacks = ["a"]'))
    path = tmp_path / "bad.toml"
    path.write_text(bad_cfg)
    r = subprocess.run([sys.executable, "-m", "fastgw", "check-config", str(path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "models[0] ('a').fallbacks: a fallback cycle: a -> b -> a" in r.stderr
    gw = start_gateway(models(model("a", [good.url], 'fallbacks = ["b"]'), model("b", [good.url])))
    assert post(gw, {**CHAT, "model": "a"}).status_code == 200
    gw.config_path.write_text(bad_cfg)
    gw.signal(signal.SIGHUP)
    wait_for(lambda: "config reload refused" in gw.ops_log(), what="config reload refused")
    assert "models[0] ('a').fallbacks: a fallback cycle: a -> b -> a" in gw.ops_log()
    assert post(gw, {**CHAT, "model": "a"}).status_code == 200          # the old config still serves
