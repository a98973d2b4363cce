"""Micro-benchmarks of jsonpeek against orjson.loads + dict lookups (the alternative it replaces).

Run: pytest perf/micro/test_jsonpeek_bench.py --benchmark-enable
"""
import json
import random

import orjson
import pytest

from fastgw.protocol.jsonpeek import peek_request, peek_usage, splice


def chat_body(size=4400, ascii_only=True):
    """A realistic chat request of about `size` bytes (as the OpenAI SDK sends it: ", " / ": ")."""
    text = ("You are a helpful assistant. Answer briefly and cite the \"source\" field when you can. "
            if ascii_only else "Réponds brièvement — 你好, 世界 😀, «citations» s'il te plaît. ")
    messages = [{"role": "system", "content": text * 4}]
    body = {"model": "gpt-4o-mini", "messages": messages, "temperature": 0.7, "max_tokens": 512,
            "stream": True, "user": "team-a"}
    i = 0
    while len(json.dumps(body, ensure_ascii=False).encode()) < size:
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text * 2})
        i += 1
    return json.dumps(body, ensure_ascii=False).encode()


BODY = chat_body()
BODY_UTF8 = chat_body(ascii_only=False)
RESPONSE = orjson.dumps({
    "id": "chatcmpl-abc123", "object": "chat.completion", "created": 1732380000, "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! " * 120},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1100, "completion_tokens": 120, "total_tokens": 1220,
              "prompt_tokens_details": {"cached_tokens": 0}}, "system_fingerprint": "fp_1"})


_rng = random.Random(1)
EMBEDDING = json.dumps({
    "object": "list", "data": [{"object": "embedding", "index": 0,
                                "embedding": [_rng.uniform(-0.1, 0.1) for _ in range(1536)]}],
    "model": "text-embedding-3-small", "usage": {"prompt_tokens": 8, "total_tokens": 8}}).encode()


def orjson_peek(body):
    d = orjson.loads(body)
    so = d.get("stream_options")
    return (d.get("model"), d.get("stream") is True, isinstance(so, dict) and so.get("include_usage") is True,
            d.get("max_tokens"), d.get("user"))


def test_sizes():
    assert 4300 <= len(BODY) <= 4600 and 4300 <= len(BODY_UTF8) <= 4700


@pytest.mark.parametrize("body", [BODY, BODY_UTF8], ids=["ascii", "utf8"])
def test_peek_request(benchmark, body):
    f = benchmark(peek_request, body)
    assert f.model == "gpt-4o-mini" and f.stream and f.max_tokens == 512


@pytest.mark.parametrize("body", [BODY, BODY_UTF8], ids=["ascii", "utf8"])
def test_orjson_loads_lookups(benchmark, body):
    assert benchmark(orjson_peek, body)[0] == "gpt-4o-mini"


def test_peek_usage(benchmark):
    assert benchmark(peek_usage, RESPONSE) == (1100, 120)


def _orjson_usage(body):
    u = orjson.loads(body)["usage"]
    return u["prompt_tokens"], u.get("completion_tokens", 0)


def test_orjson_usage(benchmark):
    assert benchmark(_orjson_usage, RESPONSE) == (1100, 120)


def test_peek_usage_embedding_33k(benchmark):
    assert benchmark(peek_usage, EMBEDDING) == (8, 0)


def test_orjson_usage_embedding_33k(benchmark):
    assert benchmark(_orjson_usage, EMBEDDING) == (8, 0)


def test_peek_and_splice(benchmark):
    """What the gateway does per streaming request: peek, rename the model, add stream_options."""
    def rewrite(body):
        f = peek_request(body)
        return splice(body, [(f.model_start, f.model_end, b'"gpt-4o-mini-2024-07-18"'),
                             (f.object_end, f.object_end, b',"stream_options":{"include_usage":true}')])
    out = benchmark(rewrite, BODY)
    assert orjson.loads(out)["stream_options"] == {"include_usage": True}


def test_orjson_roundtrip(benchmark):
    def rewrite(body):
        d = orjson.loads(body)
        d["model"] = "gpt-4o-mini-2024-07-18"
        d["stream_options"] = {"include_usage": True}
        return orjson.dumps(d)
    benchmark(rewrite, BODY)
