"""Retries, fallbacks and breakers in the relay, driven through stand-in transports (no sockets): which attempt
goes where, what the client sees (never part of a replaced answer), what is counted, and that the request
phase runs once however many attempts a request takes."""
import asyncio
import os
import tempfile
import time

import msgspec
import orjson
import pytest
import uvloop

from fastgw.observability.accesslog import AccessLog
from fastgw.observability.logs import Logger
from fastgw.observability.metrics import Stats
from fastgw.policies import Policy
from fastgw.proxy.client import ClientConnection, monotonic
from fastgw.proxy.gateway import Gateway
from fastgw.proxy.upstream import UpstreamConnection
from fastgw.runtime import config
from tests.unit.test_client_relay import RefusingPool, Transport, chat, json_response, sse_response


def error_response(status, code=None, headers=b"") -> bytes:
    body = orjson.dumps({"error": {"message": f"upstream says {status}", "type": "x", "param": None, "code": code}})
    return b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        status, len(body), headers, body)


def model(name, n=1, extra=""):
    """A [[models]] table with `n` deployments on 10.<k>.0.<i> (k from the name, so models never share one)."""
    k = sum(name.encode()) % 250
    return "\n".join([f'[[models]]\nname = "{name}"\n{extra}'] +
                     [f'[[models.deployments]]\nurl = "http://10.{k}.0.{i + 1}:8000/v1"' for i in range(n)])


class Rig:
    """A real gateway (config, metrics, access log, policies) whose connections use stand-in transports."""

    def __init__(self, toml, policies=()):
        self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.dir = tempfile.mkdtemp()
        cfg = config.parse("[server]\nstream_keepalive_interval = 15.0\n" + toml)
        if policies:
            pdir = os.path.join(self.dir, "policies")
            os.mkdir(pdir)
            for i, name in enumerate(policies):
                with open(os.path.join(pdir, f"{i:02d}.toml"), "w") as f:
                    f.write(f'policy = "tests.unit.test_relay_retries:{name}"\n')
            cfg.policies_dir = pdir
        self.log_path = os.path.join(self.dir, "access.log")
        self.access = AccessLog(self.log_path)
        self.stats = Stats(self.dir, "0")
        self.gw = Gateway(self.loop, cfg, log=Logger(open(os.devnull, "w")), stats=self.stats,
                          access_log=self.access, run_dir=self.dir, worker_id="1", mock_url=None)

    def deployment(self, name, index=0):
        return self.gw.router.routes[name].deployments[index]

    def upstream(self, name, index=0):
        """A new idle upstream connection in that deployment's pool."""
        d = self.deployment(name, index)
        pool = d.pool = d.pool or self.gw.pools.get(d)
        up = UpstreamConnection(pool)
        up.connection_made(Transport())
        pool.release(up)
        return up

    def client(self):
        c = ClientConnection(self.gw)
        c.connection_made(Transport())
        return c

    def spin(self, seconds=0.0):
        self.loop.run_until_complete(asyncio.sleep(seconds))
        for _ in range(3):
            self.loop.run_until_complete(asyncio.sleep(0))

    def access_lines(self):
        self.access.flush()
        self.access.close()
        with open(self.log_path, "rb") as f:
            return [orjson.loads(line) for line in f.read().splitlines()]

    def close(self):
        self.loop.close()


@pytest.fixture
def rig():
    made = []

    def make(*a, **kw):
        r = Rig(*a, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def sent(up) -> bool:
    return b"POST /v1/chat/completions" in up.transport.take()


def test_a_5xx_answer_is_replaced_by_the_next_deployment_and_the_client_never_sees_it(rig):
    r = rig(model("m", 2, "[models.retry]\nattempts = 2\nbackoff_ms = 0"))
    a, b = r.upstream("m", 0), r.upstream("m", 1)
    c = r.client()
    c.data_received(chat("m"))
    assert sent(a) and not sent(b)
    a.data_received(error_response(503))
    assert c.transport.take() == b""                  # held, not relayed
    assert sent(b)
    assert a in a.pool.idle                           # its body was read whole: kept alive for reuse
    b.data_received(json_response(b"from-b"))
    out = c.transport.take()
    assert out.startswith(b"HTTP/1.1 200") and b"from-b" in out and b"503" not in out
    assert b"x-fastgw-model: m\r\n" in out
    line = r.access_lines()[0]
    assert (line["status"], line["attempts"], line["upstream"], line["served_model"]) == (
        200, 2, r.deployment("m", 1).name, None)
    assert r.stats._upstream_errors == {(r.deployment("m", 0).name, "http_503"): 1}


def test_without_retries_a_5xx_is_relayed_as_it_came(rig):
    r = rig(model("m", 2))
    a, b = r.upstream("m", 0), r.upstream("m", 1)
    c = r.client()
    c.data_received(chat("m"))
    assert sent(a)
    a.data_received(error_response(500))
    out = c.transport.take()
    assert out.startswith(b"HTTP/1.1 500") and b"upstream says 500" in out and not sent(b)
    line = r.access_lines()[0]
    assert (line["status"], line["attempts"]) == (500, 1) and r.stats._upstream_errors == {}


def test_the_last_attempts_answer_is_relayed_when_every_attempt_failed(rig):
    r = rig(model("m", 1, "[models.retry]\nattempts = 3\nbackoff_ms = 0"))
    a = r.upstream("m")
    c = r.client()
    c.data_received(chat("m"))
    for n in range(3):                                # the same deployment, three times
        assert sent(a), n
        a.data_received(error_response(502 + n))
    out = c.transport.take()
    assert out.startswith(b"HTTP/1.1 504") and b"upstream says 504" in out
    assert out.count(b"HTTP/1.1") == 1
    assert r.access_lines()[0]["attempts"] == 3
    name = r.deployment("m").name
    assert r.stats._upstream_errors == {(name, "http_502"): 1, (name, "http_503"): 1}


def test_retry_after_is_waited_on_the_same_deployment_up_to_the_cap(rig):
    r = rig(model("m", 1, "[models.retry]\nattempts = 2\nbackoff_ms = 0\nretry_after_cap_ms = 300"))
    a = r.upstream("m")
    c = r.client()
    c.data_received(chat("m"))
    assert sent(a)
    t0 = time.monotonic()
    a.data_received(error_response(429, "rate_limit_exceeded", b"retry-after: 30\r\n"))   # asks 30 s: capped
    r.spin()
    assert not sent(a)                                # waiting
    while not a.transport.out and time.monotonic() - t0 < 2:
        r.spin(0.02)
    waited = time.monotonic() - t0
    assert sent(a) and 0.28 <= waited < 1.0
    a.data_received(json_response(b"later"))
    assert b"later" in c.transport.take()


def test_retry_after_ms_is_honoured_and_another_deployment_goes_at_once(rig):
    r = rig(model("m", 2, "[models.retry]\nattempts = 3\nbackoff_ms = 0\nretry_after_cap_ms = 5000"))
    a, b = r.upstream("m", 0), r.upstream("m", 1)
    c = r.client()
    c.data_received(chat("m"))
    assert sent(a)
    a.data_received(error_response(429, None, b"retry-after-ms: 400\r\n"))
    assert sent(b)                                    # untried: no wait for a's retry-after
    t0 = time.monotonic()
    b.data_received(error_response(429, None, b"retry-after-ms: 400\r\n"))
    while not (a.transport.out or b.transport.out) and time.monotonic() - t0 < 2:
        r.spin(0.01)
    # The third attempt goes back to one of them (the balancing says which), once its 400 ms are over.
    assert 0.3 <= time.monotonic() - t0 < 0.9
    assert sent(a) != sent(b)


class Counting(Policy):
    name = "counting"
    Config = msgspec.Struct
    calls = []

    def request(self, ex):
        Counting.calls.append("request")

    def response_headers(self, ex):
        Counting.calls.append("response_headers")
        ex.response_headers.append(b"x-counted: 1\r\n")

    def complete(self, ex):
        Counting.calls.append("complete")


def test_the_request_and_complete_phases_run_once_however_many_attempts(rig):
    Counting.calls.clear()
    r = rig(model("m", 2, "[models.retry]\nattempts = 3\nbackoff_ms = 0"), policies=["Counting"])
    a, b = r.upstream("m", 0), r.upstream("m", 1)
    c = r.client()
    c.data_received(chat("m"))
    assert sent(a)
    a.data_received(error_response(500))
    assert sent(b)
    b.data_received(json_response())
    out = c.transport.take()
    assert out.count(b"x-counted: 1\r\n") == 1        # the replaced answer's header lines are gone
    assert Counting.calls == ["request", "response_headers", "response_headers", "complete"]


def test_a_timeout_before_the_head_is_retried_and_the_late_answer_ignored(rig):
    r = rig(model("m", 2, "[models.retry]\nattempts = 2\nbackoff_ms = 0"))
    a, b = r.upstream("m", 0), r.upstream("m", 1)
    c = r.client()
    c.data_received(chat("m"))
    assert sent(a)
    c.check_deadline(monotonic() + 121)               # first_byte_timeout (120 s) passed
    assert a.transport.aborted and sent(b)
    b.data_received(json_response(b"second"))
    assert b"second" in c.transport.take()
    assert r.stats._upstream_errors == {(r.deployment("m", 0).name, "timeout"): 1}


def test_a_reset_after_the_first_byte_is_never_retried(rig):
    r = rig(model("m", 2, "[models.retry]\nattempts = 3\nbackoff_ms = 0"))
    a, b = r.upstream("m", 0), r.upstream("m", 1)
    c = r.client()
    c.data_received(chat("m", stream=True))
    assert sent(a)
    whole = sse_response(3)
    a.data_received(whole[:len(whole) // 2])
    a.connection_lost(ConnectionResetError())
    out = c.transport.take()
    assert out.startswith(b"HTTP/1.1 200") and not out.endswith(b"0\r\n\r\n")
    assert c.transport.closed and not sent(b)
    assert r.access_lines()[0]["error"] == "upstream_reset"


def test_a_reset_before_the_head_is_retried_on_the_next_deployment(rig):
    r = rig(model("m", 2, "[models.retry]\nattempts = 2\nbackoff_ms = 0"))
    a, b = r.upstream("m", 0), r.upstream("m", 1)
    c = r.client()
    c.data_received(chat("m", stream=True))
    assert sent(a)
    a.connection_lost(ConnectionResetError())        # a fresh connection: a reset, not a stale one
    assert sent(b)
    b.data_received(sse_response(2))
    out = c.transport.take()
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"0\r\n\r\n") and out.count(b"HTTP/1.1") == 1


def test_fallback_models_in_order_once_the_models_attempts_are_used(rig):
    r = rig("\n".join([model("a", 1, 'fallbacks = ["b", "c"]'), model("b"), model("c")]))
    a, b, cc = r.upstream("a"), r.upstream("b"), r.upstream("c")
    client = r.client()
    client.data_received(chat("a"))
    assert sent(a)
    a.data_received(error_response(503))
    assert sent(b)
    body = b.transport.out
    b.data_received(error_response(500))
    assert sent(cc)
    cc.data_received(json_response(b"from-c"))
    out = client.transport.take()
    assert out.startswith(b"HTTP/1.1 200") and b"from-c" in out and b"x-fastgw-model: c\r\n" in out
    line = r.access_lines()[0]
    assert (line["model"], line["served_model"], line["attempts"]) == ("a", "c", 3)
    assert r.stats._fallbacks == {("a", "b"): 1, ("b", "c"): 1}
    del body


def test_a_fallback_model_gets_its_own_name_when_its_deployment_names_no_model(rig):
    r = rig("\n".join([model("a", 1, 'fallbacks = ["b"]'), model("b")]))
    a, b = r.upstream("a"), r.upstream("b")
    c = r.client()
    c.data_received(chat("a"))
    a.transport.take()
    a.data_received(error_response(500))
    request = b.transport.take()
    assert b'"model":"b"' in request and b'"model":"a"' not in request


def test_a_context_length_error_goes_to_the_context_window_fallback(rig):
    r = rig("\n".join([model("small", 1, 'context_window_fallbacks = ["large"]\nfallbacks = ["other"]'),
                       model("large"), model("other")]))
    s, big, other = r.upstream("small"), r.upstream("large"), r.upstream("other")
    c = r.client()
    c.data_received(chat("small"))
    assert sent(s)
    s.data_received(error_response(400, "context_length_exceeded"))
    assert sent(big) and not sent(other)
    big.data_received(json_response(b"big enough"))
    out = c.transport.take()
    assert b"big enough" in out and b"x-fastgw-model: large" in out
    assert r.stats._upstream_errors == {(r.deployment("small").name, "context_length_exceeded"): 1}


def test_other_400s_are_relayed_even_with_special_fallbacks(rig):
    r = rig("\n".join([model("small", 1, 'content_policy_fallbacks = ["large"]'), model("large")]))
    s, big = r.upstream("small"), r.upstream("large")
    c = r.client()
    c.data_received(chat("small"))
    s.transport.take()
    s.data_received(error_response(400, "context_length_exceeded"))   # not the content policy's list
    out = c.transport.take()
    assert out.startswith(b"HTTP/1.1 400") and b"context_length_exceeded" in out and not sent(big)
    assert r.stats._upstream_errors == {}


def test_the_breaker_opens_and_picks_skip_the_deployment(rig):
    r = rig(model("m", 2, "[models.breaker]\nconsecutive_failures = 2\ncooldown_s = 60"))
    a, b = r.upstream("m", 0), r.upstream("m", 1)
    c = r.client()
    for _ in range(2):                                # round robin: a, b, a
        c.data_received(chat("m"))
        assert sent(a)
        a.data_received(error_response(500))
        c.transport.take()
        c.data_received(chat("m"))
        assert sent(b)
        b.data_received(json_response())
        c.transport.take()
    assert r.deployment("m", 0).breaker.state() == 2
    for _ in range(3):                                # open: only b
        c.data_received(chat("m"))
        assert sent(b) and not sent(a)
        b.data_received(json_response())
        c.transport.take()
    assert r.stats._breaker_opens == {("m", r.deployment("m", 0).name): 1}


def test_every_breaker_open_answers_503_with_retry_after(rig):
    r = rig(model("m", 1, "[models.breaker]\nconsecutive_failures = 1\ncooldown_s = 30"))
    a = r.upstream("m")
    c = r.client()
    c.data_received(chat("m"))
    a.transport.take()
    a.data_received(error_response(500))
    c.transport.take()
    c.data_received(chat("m"))
    out = c.transport.take()
    assert out.startswith(b"HTTP/1.1 503") and b'"code":"no_available_deployment"' in out
    assert b"retry-after: 30\r\n" in out and not sent(a)
    assert r.access_lines()[1]["attempts"] == 0


def test_an_open_breaker_sends_the_request_to_a_fallback_model(rig):
    r = rig("\n".join([model("a", 1, 'fallbacks = ["b"]\nbreaker = { consecutive_failures = 1 }'), model("b")]))
    r.deployment("a").breaker.record(False)
    a, b = r.upstream("a"), r.upstream("b")
    c = r.client()
    c.data_received(chat("a"))
    assert not sent(a) and sent(b)
    b.data_received(json_response())
    assert b"x-fastgw-model: b" in c.transport.take()


def test_a_refused_connection_still_fails_over_without_retries_configured(rig):
    r = rig(model("m", 2))
    first = r.deployment("m", 0)
    first.pool = RefusingPool(r.loop, first, 4, 1.0)
    b = r.upstream("m", 1)
    c = r.client()
    c.data_received(chat("m"))
    r.spin()
    assert sent(b)
    b.data_received(json_response())
    assert c.transport.take().startswith(b"HTTP/1.1 200")
    assert r.access_lines()[0]["attempts"] == 2


def test_no_attempt_starts_after_the_deadline(rig):
    r = rig(model("m", 2, "[models.retry]\nattempts = 5\nbackoff_ms = 0\ndeadline_ms = 1"))
    a, b = r.upstream("m", 0), r.upstream("m", 1)
    c = r.client()
    c.data_received(chat("m"))
    assert sent(a)
    time.sleep(0.01)
    a.data_received(error_response(500))
    out = c.transport.take()
    assert out.startswith(b"HTTP/1.1 500") and not sent(b)


def test_a_client_that_leaves_during_a_backoff_cancels_the_next_attempt(rig):
    r = rig(model("m", 1, "[models.retry]\nattempts = 2\nbackoff_ms = 0\nretry_after_cap_ms = 10000"))
    a = r.upstream("m")
    c = r.client()
    c.data_received(chat("m"))
    a.transport.take()
    a.data_received(error_response(429, None, b"retry-after: 0.2\r\n"))
    c.connection_lost(None)
    r.spin(0.3)
    assert not sent(a)
    assert r.access_lines()[0]["status"] == 499


def test_a_prompt_gemini_blocked_goes_to_the_content_policy_fallback(rig, monkeypatch):
    # tests/data/wire/gemini/response_blocked_prompt.json: a 200 whose prompt was blocked, which the gemini
    # provider turns into a 400 content_filter.
    with open(os.path.join(os.path.dirname(__file__), "..", "data", "wire", "gemini",
                           "response_blocked_prompt.json"), "rb") as f:
        blocked = f.read()
    monkeypatch.setenv("FASTGW_TEST_GEMINI_KEY", "gm-test")
    as_gemini = ':8000"\nprovider = "gemini"\nmodel = "gemini-2.0-flash"\nkey_env = "FASTGW_TEST_GEMINI_KEY"'
    r = rig("\n".join([model("g", 1, 'content_policy_fallbacks = ["safe"]').replace(':8000/v1"', as_gemini),
                       model("safe"), model("plain-g", 1).replace(':8000/v1"', as_gemini)]))
    g, safe = r.upstream("g"), r.upstream("safe")
    c = r.client()
    c.data_received(chat("g"))
    assert b"generateContent" in g.transport.take()
    g.data_received(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                    % (len(blocked), blocked))
    assert sent(safe)
    safe.data_received(json_response(b"answered elsewhere"))
    out = c.transport.take()
    assert b"answered elsewhere" in out and b"x-fastgw-model: safe" in out
    # A model without that list answers the refusal itself.
    plain = r.upstream("plain-g")
    c.data_received(chat("plain-g"))
    plain.transport.take()
    plain.data_received(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                        % (len(blocked), blocked))
    out = c.transport.take()
    assert out.startswith(b"HTTP/1.1 400") and b'"code":"content_filter"' in out
