"""Micro-benchmarks of SSERelay.feed on a 100-event OpenAI stream, against a plain-Python relay that does the
same job (buffer, split events, json.loads data, pick usage/[DONE]/text).

Run: pytest perf/micro/test_sse_bench.py --benchmark-enable
"""
import os

os.environ.setdefault("FASTGW_SKIP_BUILD_CHECK", "1")

import orjson
import pytest

from fastgw.protocol.sse import SSERelay

WORDS = "The harbor was quiet in the early morning , and the \"usage\" of nets was discussed at length .".split()


def make_stream(n=100):
    """`n` events as OpenAI sends them with stream_options.include_usage: content chunks, the usage chunk,
    [DONE]; returned as the list of chunks a socket would deliver (one event per read)."""
    head = {"id": "chatcmpl-AbC123", "object": "chat.completion.chunk", "created": 1732380000,
            "model": "gpt-4o-mini-2024-07-18", "system_fingerprint": "fp_0ba0d124f1"}
    chunks = []
    for i in range(n - 2):
        ev = dict(head, choices=[{"index": 0, "delta": {"content": " " + WORDS[i % len(WORDS)]},
                                  "logprobs": None, "finish_reason": None}], usage=None)
        chunks.append(b"data: " + orjson.dumps(ev) + b"\n\n")
    usage = {"prompt_tokens": 969, "completion_tokens": n - 2, "total_tokens": 969 + n - 2,
             "prompt_tokens_details": {"cached_tokens": 0}}
    chunks.append(b"data: " + orjson.dumps(dict(head, choices=[], usage=usage)) + b"\n\n")
    chunks.append(b"data: [DONE]\n\n")
    return chunks


CHUNKS = make_stream()
STREAM = b"".join(CHUNKS)
# the same bytes cut at arbitrary places (as TCP reads of a proxied stream often are)
SPLIT = [STREAM[i:i + 1000] for i in range(0, len(STREAM), 1000)]


class PyRelay:
    """What a straightforward Python relay does per chunk."""

    def __init__(self):
        self.buf = b""
        self.events = 0
        self.done = False
        self.usage = None
        self.text = []

    def feed(self, chunk):
        self.buf += chunk
        *complete, self.buf = self.buf.replace(b"\r\n", b"\n").split(b"\n\n")
        for ev in complete:
            data = [line[5:].lstrip(b" ") for line in ev.split(b"\n") if line.startswith(b"data:")]
            if not data:
                continue
            self.events += 1
            payload = b"\n".join(data)
            if payload == b"[DONE]":
                self.done = True
                continue
            obj = orjson.loads(payload)
            if obj.get("usage"):
                self.usage = obj["usage"]
            for ch in obj.get("choices") or ():
                c = (ch.get("delta") or {}).get("content")
                if c:
                    self.text.append(c)
        return chunk


def relay_all(make, chunks):
    r = make()
    for c in chunks:
        r.feed(c)
    return r


@pytest.mark.parametrize("chunks", [CHUNKS, SPLIT], ids=["per-event", "1000B-reads"])
def test_sse_relay(benchmark, chunks):
    r = benchmark(relay_all, SSERelay, chunks)
    assert r.events == 100 and r.done and r.total_tokens == 969 + 98


@pytest.mark.parametrize("chunks", [CHUNKS, SPLIT], ids=["per-event", "1000B-reads"])
def test_sse_relay_strip(benchmark, chunks):
    r = benchmark(relay_all, lambda: SSERelay(strip_usage_chunk=True), chunks)
    assert r.events == 100 and r.usage_seen


def test_sse_relay_collect_text(benchmark):
    def run():
        r = relay_all(lambda: SSERelay(collect_text=True), CHUNKS)
        return r, r.text()
    r, text = benchmark(run)
    assert text.startswith(" The harbor")


@pytest.mark.parametrize("chunks", [CHUNKS, SPLIT], ids=["per-event", "1000B-reads"])
def test_python_relay(benchmark, chunks):
    r = benchmark(relay_all, PyRelay, chunks)
    assert r.events == 100 and r.done and r.usage["total_tokens"] == 969 + 98
