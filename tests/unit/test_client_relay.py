"""The client connection and the relay driven through stand-in transports (no sockets): pipelining, a stale
connection retried, a refused connection falling back, the keep-alive SSE head, a client that leaves, policy
hooks that fail, refuse, answer or read stream events, and what accounting counts once."""
import asyncio
import os
import tempfile

import msgspec
import orjson
import pytest
import uvloop

from fastgw.observability.accesslog import AccessLog
from fastgw.observability.logs import Logger
from fastgw.observability.metrics import Stats
from fastgw.policies import Policy, Reject, Reply
from fastgw.proxy.client import ClientConnection, monotonic
from fastgw.proxy.gateway import Gateway
from fastgw.proxy.upstream import Pool, UpstreamConnection
from fastgw.runtime import config


class Transport:
    """Keeps what is written and whether it was closed; what the connection code calls of a transport."""

    def __init__(self):
        self.out = []
        self.closed = self.aborted = self.paused = False

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data):
        self.out.append(data)

    def writelines(self, parts):
        self.out.extend(parts)

    def close(self):
        self.closed = True

    def abort(self):
        self.aborted = True

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False

    def take(self) -> bytes:
        data = b"".join(self.out)
        self.out.clear()
        return data


def chat(model="gpt-4o-mini", stream=False, rid="r1", method=b"POST", path=b"/v1/chat/completions") -> bytes:
    body = orjson.dumps({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
    return (method + b" " + path + b" HTTP/1.1\r\nhost: gw\r\nx-request-id: " + rid.encode() +
            b"\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body)


def json_response(content=b"hello", status=200) -> bytes:
    body = orjson.dumps({"id": "c", "object": "chat.completion", "choices": [{"index": 0, "message": {
        "role": "assistant", "content": content.decode()}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}})
    return b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        status, len(body), body)


def sse_response(events=3) -> bytes:
    out = [b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"]
    for i in range(events):
        ev = b'data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"t%d"}}]}\n\n' % i
        out.append(b"%x\r\n%s\r\n" % (len(ev), ev))
    out.append(b"%x\r\n%s\r\n0\r\n\r\n" % (len(b"data: [DONE]\n\n"), b"data: [DONE]\n\n"))
    return b"".join(out)


class Rig:
    """A gateway (real config, policies, metrics, access log) whose connections use stand-in transports."""

    def __init__(self, policies=(), keepalive=15.0, deployments=1, provider="openai"):
        self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.dir = tempfile.mkdtemp()
        cfg = config.parse("\n".join(
            ["[server]", f"stream_keepalive_interval = {keepalive}", "[[models]]", 'name = "*"'] +
            [f'[[models.deployments]]\nurl = "http://10.0.0.{i + 1}:8000/v1"\nprovider = "{provider}"'
             for i in range(deployments)]))
        if policies:
            pdir = os.path.join(self.dir, "policies")
            os.mkdir(pdir)
            for i, name in enumerate(policies):
                with open(os.path.join(pdir, f"{i:02d}.toml"), "w") as f:
                    f.write(f'policy = "tests.unit.test_client_relay:{name}"\n')
            cfg.policies_dir = pdir
        self.log_path = os.path.join(self.dir, "access.log")
        self.access = AccessLog(self.log_path)
        self.stats = Stats(self.dir, "0")
        self.gw = Gateway(self.loop, cfg, log=Logger(open(os.devnull, "w")), stats=self.stats,
                          access_log=self.access, run_dir=self.dir, worker_id="0", mock_url=None)
        self.ups = {}

    def upstream(self, index=0):
        """A new idle upstream connection in deployment `index`'s pool."""
        d = self.gw.router.wildcard.deployments[index]
        pool = d.pool = d.pool or self.gw.pools.get(d)
        up = UpstreamConnection(pool)
        up.connection_made(Transport())
        pool.release(up)
        return up

    def client(self):
        c = ClientConnection(self.gw)
        c.connection_made(Transport())
        return c

    def spin(self, n=5):
        for _ in range(n):
            self.loop.run_until_complete(asyncio.sleep(0))

    def access_lines(self):
        self.access.flush()
        self.access.close()
        with open(self.log_path, "rb") as f:
            return [orjson.loads(l) for l in f.read().splitlines()]

    def close(self):
        self.loop.close()


@pytest.fixture
def rig():
    made = []

    def make(**kw):
        r = Rig(**kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def test_pipelined_requests_are_sent_one_at_a_time_and_answered_in_order(rig):
    r = rig()
    up = r.upstream()
    c = r.client()
    c.data_received(chat(rid="a") + chat(rid="b"))
    sent = up.transport.take()
    assert sent.count(b"POST /v1/chat/completions") == 1 and b"x-request-id: a" in sent
    up.data_received(json_response(b"first"))
    out = c.transport.take()
    assert out.startswith(b"HTTP/1.1 200") and b"x-request-id: a" in out and b"first" in out
    sent = up.transport.take()                          # the second request went out only now
    assert b"x-request-id: b" in sent
    up.data_received(json_response(b"second"))
    out = c.transport.take()
    assert b"x-request-id: b" in out and b"second" in out
    lines = r.access_lines()
    assert [(l["request_id"], l["status"], l["prompt_tokens"]) for l in lines] == [("a", 200, 7), ("b", 200, 7)]


def test_a_stale_kept_alive_connection_is_retried_on_another(rig):
    r = rig()
    fresh = r.upstream()
    stale = r.upstream()                                # used once, so kept alive: may be stale
    c = r.client()
    c.data_received(chat(rid="warm"))
    stale.data_received(json_response())
    c.transport.take()
    c.data_received(chat(rid="s"))                      # acquire() takes the last released: `stale` again
    assert b"x-request-id: s" in stale.transport.take()
    stale.connection_lost(None)                         # closed by the upstream before answering
    assert b"x-request-id: s" in fresh.transport.take()
    fresh.data_received(json_response(b"retried"))
    assert b"retried" in c.transport.take()
    assert r.stats._upstream_errors == {}               # a stale retry is not an upstream error


class RefusingPool(Pool):
    async def open_one(self):
        raise ConnectionRefusedError()


def test_a_refused_connection_falls_back_to_the_next_deployment_and_is_counted(rig):
    r = rig(deployments=2)
    first, second = r.gw.router.wildcard.deployments
    first.pool = RefusingPool(r.loop, first, 4, 1.0)   # no idle connection: connect() is called, and refused
    up = r.upstream(1)
    c = r.client()
    c.data_received(chat(rid="f"))                      # round robin starts with the first deployment
    r.spin()
    assert b"x-request-id: f" in up.transport.take()
    up.data_received(json_response(b"from-second"))
    assert b"from-second" in c.transport.take()
    assert r.stats._upstream_errors == {(first.name, "connect"): 1}
    assert r.access_lines()[0]["upstream"] == second.name


def test_a_slow_stream_gets_our_sse_head_and_comments_then_the_events(rig):
    r = rig(keepalive=5.0)
    up = r.upstream()
    c = r.client()
    c.data_received(chat(stream=True, rid="k"))
    assert c.transport.take() == b""
    c.check_deadline(monotonic() + 6)                   # no upstream head after 5 s: keep the client busy
    out = c.transport.take()
    assert out.startswith(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream") and b": keep-alive" in out
    up.data_received(sse_response(3))
    out = c.transport.take()
    assert b"HTTP/1.1" not in out                       # no second head
    assert out.count(b"chat.completion.chunk") == 3 and out.endswith(b"0\r\n\r\n")
    line = r.access_lines()[0]
    assert line["status"] == 200 and line["ttft_ms"] is not None and line["ttft_ms"] >= 0


def test_an_upstream_refusal_after_our_sse_head_is_one_error_event(rig):
    r = rig(keepalive=5.0)
    up = r.upstream()
    c = r.client()
    c.data_received(chat(stream=True, rid="e"))
    c.check_deadline(monotonic() + 6)
    c.transport.take()
    err = b'{"error":{"message":"slow down","type":"rate_limit_error","code":null}}'
    up.data_received(b"HTTP/1.1 429 X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                     % (len(err), err))
    out = c.transport.take()
    assert b"data: " + err in out and out.endswith(b"0\r\n\r\n")


def test_without_keepalive_comments_ttft_is_still_the_first_event(rig):
    r = rig(keepalive=0)
    up = r.upstream()
    c = r.client()
    c.data_received(chat(stream=True, rid="t"))
    head, rest = sse_response(2).split(b"\r\n\r\n", 1)
    up.data_received(head + b"\r\n\r\n")               # the head alone: no token yet
    up.data_received(rest)
    line = r.access_lines()[0]
    assert line["ttft_ms"] is not None


def test_a_client_that_leaves_cancels_the_upstream_request(rig):
    r = rig()
    up = r.upstream()
    c = r.client()
    c.data_received(chat(rid="gone"))
    c.connection_lost(None)
    assert up.transport.aborted                         # its connection cannot be reused
    assert up not in up.pool.idle
    line = r.access_lines()[0]
    assert (line["request_id"], line["status"], line["error"]) == ("gone", 499, "client_disconnected")


@pytest.mark.parametrize("answer", [json_response(b"mine"), sse_response(2)], ids=["json", "stream"])
def test_bytes_after_a_response_end_are_never_the_next_clients_answer(rig, answer):
    # A buggy upstream glues an unsolicited response to the end of a real one, in the same read. Kept in the
    # pooled connection's parser, those bytes were the next request's "answer": another client's data.
    r = rig()
    fresh = r.upstream()
    glued = r.upstream()                                # released last: acquire() hands it out first
    first = r.client()
    first.data_received(chat(stream=b"text/event-stream" in answer, rid="a"))
    assert b"x-request-id: a" in glued.transport.take()
    glued.data_received(answer + json_response(b"UNSOLICITED"))
    assert b"UNSOLICITED" not in first.transport.take()
    assert glued.closed and glued not in glued.pool.idle   # never reused
    second = r.client()
    second.data_received(chat(rid="b"))
    assert b"x-request-id: b" in fresh.transport.take() and not glued.transport.out
    fresh.data_received(json_response(b"for-b"))
    out = second.transport.take()
    assert b"for-b" in out and b"UNSOLICITED" not in out


def test_a_reset_mid_stream_closes_the_client_without_a_clean_end(rig):
    r = rig()
    up = r.upstream()
    c = r.client()
    c.data_received(chat(stream=True, rid="m"))
    up.data_received(sse_response(3)[:200])
    up.connection_lost(None)
    out = c.transport.take()
    assert out.startswith(b"HTTP/1.1 200") and b"[DONE]" not in out and not out.endswith(b"0\r\n\r\n")
    assert c.transport.closed
    assert r.access_lines()[0]["error"] == "upstream_reset"


def test_head_on_health_endpoints_answers_without_a_body(rig):
    r = rig()
    c = r.client()
    c.data_received(b"HEAD /healthz HTTP/1.1\r\nhost: gw\r\n\r\nHEAD /readyz HTTP/1.1\r\nhost: gw\r\n\r\n")
    out = c.transport.take()
    assert out.count(b"HTTP/1.1 200 OK") == 2 and b"status" not in out and b"content-length: 15" in out


# -- policies ------------------------------------------------------------------------------------------------

class _Base(Policy):
    Config = msgspec.Struct


class BuggyRequest(_Base):
    name = "buggy-request"

    def request(self, ex):
        raise RuntimeError("bug")


class BuggyResponseHeaders(_Base):
    name = "buggy-response-headers"

    def response_headers(self, ex):
        raise KeyError("bug")


class Refuse429(_Base):
    name = "refuse-429"

    def request(self, ex):
        raise Reject(429, "no", code="rate_limit_exceeded", reason="rate_limit")


class Answer(_Base):
    name = "answer"

    def request(self, ex):
        raise Reply(b'{"cached":true}', headers=(("x-fastgw-cache", "hit"),))


class Events(_Base):
    name = "events"
    seen = []

    def stream_event(self, ex, event):
        Events.seen.append(event)


def test_a_policy_bug_in_the_request_phase_is_a_policy_error_not_an_upstream_one(rig):
    r = rig(policies=["BuggyRequest"])
    up = r.upstream()
    c = r.client()
    c.data_received(chat(rid="b"))
    out = c.transport.take()
    assert out.startswith(b"HTTP/1.1 500") and b'"code":"policy_error"' in out
    assert up.transport.take() == b"" and r.stats._upstream_errors == {}
    assert r.access_lines()[0]["error"] == "policy_error"


def test_a_policy_bug_in_response_headers_drops_the_upstream_and_answers_500(rig):
    r = rig(policies=["BuggyResponseHeaders"])
    up = r.upstream()
    c = r.client()
    c.data_received(chat(rid="h"))
    up.data_received(json_response())
    out = c.transport.take()
    assert out.startswith(b"HTTP/1.1 500") and b'"code":"policy_error"' in out
    assert up.transport.aborted and r.stats._upstream_errors == {}


def test_a_refusal_is_counted_once_with_a_bounded_model_label(rig):
    r = rig(policies=["Refuse429"])
    c = r.client()
    c.data_received(chat(model="a-client-made-up-model", rid="x"))
    assert c.transport.take().startswith(b"HTTP/1.1 429")
    assert r.stats._rejections == {("", "other", "rate_limit"): 1}


def test_a_policy_may_answer_the_request_itself(rig):
    r = rig(policies=["Answer"])
    up = r.upstream()
    c = r.client()
    c.data_received(chat(rid="c"))
    out = c.transport.take()
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b'{"cached":true}') and b"x-fastgw-cache: hit" in out
    assert up.transport.take() == b""                   # no upstream request


def test_stream_event_hooks_see_each_complete_event(rig):
    Events.seen.clear()
    r = rig(policies=["Events"])
    up = r.upstream()
    c = r.client()
    c.data_received(chat(stream=True, rid="s"))
    resp = sse_response(3)
    for i in range(0, len(resp), 7):                    # events split across reads
        up.data_received(resp[i:i + 7])
    assert [e.count(b"\n\n") for e in Events.seen] == [1] * 4
    assert b"t0" in Events.seen[0] and Events.seen[-1].startswith(b"data: [DONE]")


class SlowPool(Pool):
    """connect() finishes when the test says so."""

    def __init__(self, *a):
        super().__init__(*a)
        self.ready = None

    async def open_one(self):
        self.ready = asyncio.get_event_loop().create_future()
        return await self.ready


def test_keepalive_comments_while_connecting_do_not_lose_the_request(rig):
    r = rig(keepalive=5.0)
    d = r.gw.router.wildcard.deployments[0]
    pool = d.pool = SlowPool(r.loop, d, 4, 10.0)
    c = r.client()
    c.data_received(chat(stream=True, rid="slow-connect"))
    r.spin()
    c.check_deadline(monotonic() + 6)                   # our SSE head goes out while still connecting
    assert c.transport.take().startswith(b"HTTP/1.1 200 OK")
    up = UpstreamConnection(pool)
    up.connection_made(Transport())
    pool.ready.set_result(up)
    r.spin()
    assert b"x-request-id: slow-connect" in up.transport.take()
    up.data_received(sse_response(2))
    assert c.transport.take().count(b"chat.completion.chunk") == 2


# -- a translating provider, through the provider interface --------------------------------------------------

from fastgw.errors import error_body                    # noqa: E402
from fastgw.providers import PROVIDERS                  # noqa: E402
from fastgw.providers.base import Provider              # noqa: E402


class Gen(Provider):
    """A made-up wire format: POST /gen {"prompt"} -> {"text", "in", "out"}; errors {"err"}."""

    def __init__(self):
        super().__init__("test-gen", True)

    def request_lines(self, base_path, endpoints, d):
        return {"/v1/chat/completions": b"POST " + base_path.encode() + b"/gen HTTP/1.1\r\n"}

    def header_lines(self, host_value, key, d):
        return b"host: " + host_value.encode() + b"\r\n"

    def request_body(self, ex, model_json, add_usage):
        return orjson.dumps({"prompt": orjson.loads(ex.body)["messages"][-1]["content"]})

    def response_body(self, ex, status, body):
        got = orjson.loads(body)
        if status != 200:
            return error_body(got["err"], "invalid_request_error")
        ex.prompt_tokens, ex.completion_tokens = got["in"], got["out"]
        return orjson.dumps({"object": "chat.completion", "model": ex.model, "choices": [
            {"index": 0, "message": {"role": "assistant", "content": got["text"]}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": got["in"], "completion_tokens": got["out"]}})


@pytest.fixture
def gen_provider():
    PROVIDERS["test-gen"] = Gen()
    yield
    del PROVIDERS["test-gen"]


def raw_response(body: bytes, status=200, chunked=False) -> bytes:
    if chunked:
        return (b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                b"%x\r\n%s\r\n0\r\n\r\n" % (status, len(body), body))
    return b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        status, len(body), body)


def test_a_translating_provider_shapes_the_request_and_the_answer(rig, gen_provider):
    r = rig(provider="test-gen")
    up = r.upstream()
    c = r.client()
    c.data_received(chat(rid="g"))
    sent = up.transport.take()
    assert sent.startswith(b"POST /v1/gen HTTP/1.1\r\n") and sent.endswith(b'{"prompt":"hi"}')
    up.data_received(raw_response(b'{"text":"translated","in":5,"out":1}', chunked=True))
    out = c.transport.take()
    head, body = out.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK") and b"content-length: %d" % len(body) in head
    assert b"transfer-encoding" not in head
    assert orjson.loads(body)["choices"][0]["message"]["content"] == "translated"
    line = r.access_lines()[0]
    assert (line["prompt_tokens"], line["completion_tokens"]) == (5, 1)


def test_a_translating_provider_maps_errors_and_refuses_what_it_cannot_serve(rig, gen_provider):
    r = rig(provider="test-gen")
    up = r.upstream()
    c = r.client()
    c.data_received(chat(rid="e"))
    up.transport.take()
    up.data_received(raw_response(b'{"err":"prompt is too long"}', status=400))
    out = c.transport.take()
    assert out.startswith(b"HTTP/1.1 400") and orjson.loads(out.split(b"\r\n\r\n", 1)[1]) == {
        "error": {"message": "prompt is too long", "type": "invalid_request_error", "param": None, "code": None}}
    c.data_received(chat(rid="u", path=b"/v1/embeddings"))
    out = c.transport.take()
    assert out.startswith(b"HTTP/1.1 400") and b'"code":"unsupported_endpoint"' in out
    assert up.transport.take() == b""


def test_a_full_pool_answers_503_upstream_busy_after_the_queue_timeout(rig):
    r = rig()
    d = r.gw.router.wildcard.deployments[0]
    d.pool = Pool(r.loop, d, 8, 1.0, 0, 0.05)          # no connection may be opened: every request queues
    c = r.client()
    c.data_received(chat(rid="busy"))
    assert c.transport.take() == b"" and d.pool.waiting() == 1
    c.check_deadline(monotonic() + 0.1)                 # the sweeper finds its queue time is up
    out = c.transport.take()
    assert out.startswith(b"HTTP/1.1 503") and b'"code":"upstream_busy"' in out and b"retry-after: 1" in out
    assert r.stats._upstream_errors == {(d.name, "busy"): 1}


class OneConnectionPool(Pool):
    """Opens one stand-in connection (max_connections=1 keeps it the only one)."""

    async def open_one(self):
        self.made = UpstreamConnection(self)
        self.made.connection_made(Transport())
        return self.made


def test_a_queued_request_gets_the_connection_the_one_before_it_releases(rig):
    r = rig()
    d = r.gw.router.wildcard.deployments[0]
    pool = d.pool = OneConnectionPool(r.loop, d, 8, 1.0, 1, 5.0)
    first, second, third = r.client(), r.client(), r.client()
    first.data_received(chat(rid="one"))
    r.spin()
    up = pool.made
    second.data_received(chat(rid="two"))
    third.data_received(chat(rid="three"))
    assert b"x-request-id: one" in up.transport.take() and pool.waiting() == 2 and pool.open == 1
    third.connection_lost(None)                         # a queued client leaves: its place is skipped
    assert pool.waiting() == 1
    up.data_received(json_response(b"for-one"))         # released: handed to "two" at once, no task
    assert b"for-one" in first.transport.take()
    assert b"x-request-id: two" in up.transport.take() and pool.waiting() == 0
    up.data_received(json_response(b"for-two"))
    assert b"for-two" in second.transport.take()
    assert pool.queued == 2 and pool.idle == [up] and pool.open == 1


def test_what_one_upstream_read_produces_goes_out_in_one_write(rig):
    r = rig()
    up = r.upstream()
    c = r.client()
    c.data_received(chat(stream=True, rid="w"))
    up.data_received(sse_response(14))                 # head, 14 events, [DONE] and the end in one read
    assert len(c.transport.out) == 1                    # one write (one syscall), not head + events + end
    out = c.transport.take()
    assert out.startswith(b"HTTP/1.1 200") and out.count(b"chat.completion.chunk") == 14
    assert out.endswith(b"0\r\n\r\n")
    c.data_received(chat(stream=True, rid="w2"))
    resp = sse_response(3)
    head_end = resp.index(b"\r\n\r\n") + 4
    up.data_received(resp[:head_end])                   # a head alone goes out at once (the client sees it)
    assert len(c.transport.out) == 1 and c.transport.take().startswith(b"HTTP/1.1 200")
    up.data_received(resp[head_end:])
    assert len(c.transport.out) == 1
