"""Micro-benchmarks of fastgw.protocol.http against h11 (the pure-Python reference).

Run: pytest perf/micro/test_http_bench.py --benchmark-enable
"""
import json

import h11

from fastgw.protocol import http as H

BODY = json.dumps({
    "model": "gpt-4o-mini",
    "messages": [{"role": "system", "content": "You are a helpful assistant. " * 20}]
    + [{"role": "user" if i % 2 == 0 else "assistant", "content": "Tell me about the weather in Paris. " * 10}
       for i in range(9)],
    "temperature": 0.7,
    "stream": True,
}).encode()
# What the OpenAI Python SDK (httpx) sends, ~15 fields.
REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway.internal:8080\r\nAccept-Encoding: gzip, deflate\r\n"
    b"Connection: keep-alive\r\nAccept: application/json\r\nContent-Type: application/json\r\n"
    b"User-Agent: OpenAI/Python 1.54.4\r\nX-Stainless-Lang: python\r\nX-Stainless-Package-Version: 1.54.4\r\n"
    b"X-Stainless-OS: Linux\r\nX-Stainless-Arch: x64\r\nX-Stainless-Runtime: CPython\r\n"
    b"X-Stainless-Runtime-Version: 3.11.7\r\nAuthorization: Bearer sk-gw-0123456789abcdef0123456789abcdef\r\n"
    b"X-Stainless-Async: false\r\nx-stainless-retry-count: 0\r\nContent-Length: %d\r\n\r\n" % len(BODY)
) + BODY

SSE_EVENT = (b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1732380000,'
             b'"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":" word"},"finish_reason":null}]}\n\n')
SSE_HEAD = (b"HTTP/1.1 200 OK\r\nDate: Sat, 23 Nov 2024 17:00:00 GMT\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\nopenai-organization: org-x\r\n"
            b"openai-processing-ms: 120\r\nopenai-version: 2020-10-01\r\nx-request-id: req_0123456789\r\n"
            b"cf-cache-status: DYNAMIC\r\n\r\n")
# 50 SSE events, each in its own chunk and its own read, as a streaming upstream delivers them.
SSE_READS = [SSE_HEAD] + [b"%x\r\n%s\r\n" % (len(SSE_EVENT), SSE_EVENT)] * 50 + [b"0\r\n\r\n"]


def test_request_fastgw(benchmark):
    p = H.RequestParser()

    def parse():
        p.feed(REQUEST)
        assert p.next_event() == H.HEAD
        p.header(b"authorization")
        assert p.next_event() == H.END
        body = p.body
        p.start_next()
        return body

    assert benchmark(parse) == BODY


def test_request_fastgw_with_forward_head(benchmark):
    p = H.RequestParser()
    drop = frozenset({b"authorization", b"api-key", b"x-request-id"})

    def parse():
        p.feed(REQUEST)
        p.next_event()
        p.header(b"authorization")
        out = p.forward_head(b"POST /v1/chat/completions HTTP/1.1\r\n",
                             b"host: api.openai.com\r\nauthorization: Bearer sk-upstream\r\n", len(BODY), drop)
        p.next_event()
        p.start_next()
        return out

    assert b"content-length" in benchmark(parse)


def test_request_h11(benchmark):
    def parse():
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(REQUEST)
        req = conn.next_event()
        data = conn.next_event()
        conn.next_event()
        return req, data

    assert bytes(benchmark(parse)[1].data) == BODY


def test_sse_response_fastgw(benchmark):
    r = H.ResponseParser()

    def parse():
        r.start()
        n = 0
        for data in SSE_READS:
            r.feed(data)
            while True:
                ev = r.next_event()
                if ev == H.BODY:
                    n += len(r.take_body())
                elif ev == H.NEED_DATA or ev == H.END:
                    break
        return n

    assert benchmark(parse) == 50 * len(SSE_EVENT)


def test_sse_response_h11(benchmark):
    def parse():
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="POST", target="/v1/chat/completions", headers=[("Host", "up")]))
        conn.send(h11.EndOfMessage())
        n = 0
        for data in SSE_READS:
            conn.receive_data(data)
            while True:
                ev = conn.next_event()
                if type(ev) is h11.Data:
                    n += len(ev.data)
                elif ev is h11.NEED_DATA or type(ev) is h11.EndOfMessage:
                    break
        return n

    assert benchmark(parse) == 50 * len(SSE_EVENT)
