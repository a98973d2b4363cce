"""Micro-benchmarks of the prompt-token estimate on a 4.4 KB chat body, against exact tiktoken counting.

Run: pytest perf/micro/test_tokens_bench.py --benchmark-enable
"""
import json
import os

os.environ.setdefault("FASTGW_SKIP_BUILD_CHECK", "1")

import orjson
import pytest

from fastgw.tokens import exact as tokenizer
from fastgw.tokens.estimate import estimate_chat_tokens, estimate_text_tokens

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "..", "..", "tests", "data", "tokens", "prose.txt"), encoding="utf-8") as f:
    PARAGRAPHS = [p.strip() for p in f.read().split("\n---\n")]

MESSAGES = [{"role": "system", "content": "You are a helpful assistant. Answer briefly."}]
for i, p in enumerate(PARAGRAPHS[:10]):
    MESSAGES.append({"role": "user" if i % 2 == 0 else "assistant", "content": p})
BODY = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES, "temperature": 0.7, "stream": True}).encode()
TEXT = "\n\n".join(m["content"] for m in MESSAGES).encode()


def test_sizes():
    assert 4300 <= len(BODY) <= 4800, len(BODY)


def test_estimate_chat_tokens(benchmark):
    est = benchmark(estimate_chat_tokens, BODY)
    exact = tokenizer.count_chat(MESSAGES, "gpt-4o-mini")
    assert abs(est - exact) / exact < 0.1


def test_estimate_text_tokens(benchmark):
    assert benchmark(estimate_text_tokens, TEXT) > 0


def exact_chat(body):
    """The exact path the estimate replaces: parse the body, BPE every message (no cache)."""
    messages = orjson.loads(body)["messages"]
    enc = tokenizer.get_encoding("o200k_base")
    return 3 + sum(3 + len(enc.encode_ordinary(m["role"])) + len(enc.encode_ordinary(m["content"]))
                   for m in messages)


def test_exact_tiktoken_chat(benchmark):
    tokenizer.get_encoding("o200k_base")  # load outside the timing
    assert benchmark(exact_chat, BODY) == tokenizer.count_chat(MESSAGES, "gpt-4o-mini")


def test_count_chat_cached(benchmark):
    tokenizer.cache_clear()
    tokenizer.count_chat(MESSAGES, "gpt-4o-mini")
    assert benchmark(lambda: tokenizer.count_chat(orjson.loads(BODY)["messages"], "gpt-4o-mini")) > 0


with open(os.path.join(HERE, "..", "..", "tests", "data", "tokens", "cjk.txt"), encoding="utf-8") as f:
    CJK = f.read().encode()


def test_estimate_text_tokens_cjk(benchmark):
    # non-ASCII text takes the slower path: copied through a buffer that drops UTF-8 continuation bytes
    assert benchmark(estimate_text_tokens, CJK) > 0
