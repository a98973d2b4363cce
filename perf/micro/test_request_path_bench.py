"""User-space CPU of one whole proxied request, without sockets: the connection code between fake transports.

The client connection, the upstream connection, the parsers, routing, the access-log line and the metrics all
run for real; only the transports are stand-ins that keep what is written. No syscalls, so the figure is the
gateway's own user-space cost per request (the part that differs from nginx; the kernel's share is the same).
"""
import asyncio
import json
import os
import tempfile

import pytest
import uvloop

from fastgw.runtime import config
from fastgw.observability.accesslog import AccessLog
from fastgw.proxy.client import ClientConnection
from fastgw.proxy.upstream import UpstreamConnection
from fastgw.proxy.gateway import Gateway
from fastgw.observability.logs import Logger
from fastgw.observability.metrics import Stats

HERE = os.path.dirname(os.path.abspath(__file__))
CHAT = open(os.path.join(HERE, "..", "scenarios", "chat_request.json"), "rb").read()
RESPONSE_BODY = open(os.path.join(HERE, "..", "mocks", "bodies", "chat.json"), "rb").read()


class Transport:
    """Keeps what is written; what asyncio's transports offer that the connection code calls."""

    def __init__(self, peer=("127.0.0.1", 40000)):
        self.out = []
        self.peer = peer

    def get_extra_info(self, name, default=None):
        return self.peer if name == "peername" else default

    def write(self, data):
        self.out.append(data)

    def writelines(self, parts):
        self.out.extend(parts)

    def close(self):
        pass

    abort = pause_reading = resume_reading = close


def request_bytes(stream=False, api_key="sk-test") -> bytes:
    body = CHAT if not stream else CHAT.replace(b'"model"', b'"stream":true,"model"', 1)
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAccept-Encoding: gzip, deflate\r\n"
            b"Connection: keep-alive\r\nauthorization: Bearer %s\r\naccept: application/json\r\n"
            b"content-type: application/json\r\nuser-agent: OpenAI/Python 1.54.0\r\nx-stainless-lang: python\r\n"
            b"x-stainless-package-version: 1.54.0\r\nx-stainless-os: Linux\r\nx-stainless-arch: x64\r\n"
            b"x-stainless-runtime: CPython\r\nx-stainless-runtime-version: 3.11.7\r\n"
            b"content-length: %d\r\n\r\n%s" % (api_key.encode(), len(body), body))


def response_bytes() -> bytes:
    return (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 23 Nov 2026 18:00:00 GMT\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n%s"
            % (len(RESPONSE_BODY), RESPONSE_BODY))


def sse_response_writes(events=14) -> list:
    """The SSE reply as a provider writes it: the head, each event, [DONE], the end of the chunked body."""
    chunk = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
    out = [b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"]
    for _ in range(events):
        out.append(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    out.append(b"%x\r\n%s\r\n" % (len(b"data: [DONE]\n\n"), b"data: [DONE]\n\n"))
    out.append(b"0\r\n\r\n")
    return out


def sse_response_bytes(events=14) -> bytes:
    return b"".join(sse_response_writes(events))


@pytest.fixture(scope="module")
def gateway():
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    run_dir = tempfile.mkdtemp()
    cfg = config.single_upstream("http://127.0.0.1:9/v1")
    access = AccessLog(os.devnull)
    gw = Gateway(loop, cfg, log=Logger(), stats=Stats(run_dir, "0"), access_log=access, run_dir=run_dir,
                 worker_id="0", mock_url=None)
    yield gw
    access.close()
    loop.close()


def one_exchange(gw, stream=False, chunks=1, api_key="sk-test", paced=False):
    """Make a client connection with one idle upstream connection in the pool; return a runner. The reply
    arrives in `chunks` reads of equal size, or, `paced`, one upstream read per write of the provider (a
    paced stream: head, each event, [DONE], end)."""
    target = gw.router.wildcard.pick(None)
    pool = gw.pools.get(target)
    up = UpstreamConnection(pool)
    up_t = Transport()
    up.connection_made(up_t)
    pool.release(up)
    client = ClientConnection(gw)
    client_t = Transport()
    client.connection_made(client_t)
    req = request_bytes(stream, api_key)
    resp = sse_response_bytes() if stream else response_bytes()
    if paced:
        pieces = sse_response_writes()
    else:
        pieces = [resp] if chunks == 1 else [resp[i:i + len(resp) // chunks + 1]
                                               for i in range(0, len(resp), len(resp) // chunks + 1)]

    def run():
        client.data_received(req)
        for p in pieces:
            up.data_received(p)
        client_t.out.clear()
        up_t.out.clear()

    return run, client, up


def test_whole_request_is_relayed(gateway):
    """The harness really drives a request end to end (else the benchmark below would measure nothing)."""
    for stream, paced in ((False, False), (True, False), (True, True)):
        _relayed_once(gateway, stream, paced)


def _relayed_once(gateway, stream, paced):
    _, client, up = one_exchange(gateway, stream=stream, paced=paced)
    ct = client.transport
    client.data_received(request_bytes(stream))
    sent = b"".join(up.transport.out)
    assert sent.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n") and b"sk-test" not in sent
    for piece in (sse_response_writes() if paced else [sse_response_bytes() if stream else response_bytes()]):
        up.data_received(piece)
    out = b"".join(ct.out)
    assert out.startswith(b"HTTP/1.1 200 OK\r\n")
    if stream:
        assert out.count(b"data: {") == 14 and out.endswith(b"0\r\n\r\n")
    else:
        assert sent.endswith(CHAT) and out.endswith(RESPONSE_BODY)
        assert json.loads(out.split(b"\r\n\r\n", 1)[1])["usage"]["prompt_tokens"] > 0


def test_bench_proxied_chat_request(benchmark, gateway):
    run, _, _ = one_exchange(gateway)
    benchmark(run)


def test_bench_proxied_stream_14_events(benchmark, gateway):
    run, _, _ = one_exchange(gateway, stream=True, chunks=16)
    benchmark(run)


def test_bench_proxied_stream_14_events_one_per_read(benchmark, gateway):
    run, _, _ = one_exchange(gateway, stream=True, paced=True)
    benchmark(run)
