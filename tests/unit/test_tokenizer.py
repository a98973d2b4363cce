"""fastgw.tokens.exact: offline, hash-verified tiktoken encodings; counts; the content-count cache."""
import gzip
import os

import bpe_openai
import pytest

from fastgw.tokens import exact as tokenizer
from fastgw.tokens.exact import (
    TokenizerDataError,
    cache_clear,
    cache_info,
    count_chat,
    count_text,
    encoding_for_model,
    get_encoding,
    load_ranks,
)

ENCODINGS = ("cl100k_base", "o200k_base")

# (text, cl100k_base count, o200k_base count): computed once with the hash-verified encodings, and
# cross-checked below against bpe-openai's independent (Rust) tokenizer.
KNOWN = [
    ("hello world", 2, 2),
    ("Hello, world! The quick brown fox jumps over the lazy dog.", 14, 14),
    ("日本語のテキストです。", 10, 8),
    ("def f(x):\n    return x**2\n", 10, 10),
    ('{"role": "user", "content": "What is 2+2?"}', 18, 18),
    ("<|endoftext|> is just text here", 11, 11),
]

# OpenAI cookbook "How to count tokens with tiktoken", example_messages: it reports 129 prompt tokens for
# gpt-3.5-turbo/gpt-4 and 124 for gpt-4o/gpt-4o-mini, which the API returned as usage.prompt_tokens.
COOKBOOK = [
    {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
    {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."},
    {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."},
]


@pytest.mark.parametrize("text,cl100k,o200k", KNOWN)
def test_known_counts(text, cl100k, o200k):
    assert count_text(text, "cl100k_base") == cl100k
    assert count_text(text, "o200k_base") == o200k


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_agrees_with_bpe_openai(encoding):
    ours = get_encoding(encoding)
    theirs = bpe_openai.get_encoding(encoding)
    texts = [t for t, _, _ in KNOWN] + [m["content"] for m in COOKBOOK]
    texts.append("Mixed: naïve café — 3.14159 × 2 = 6.28318; emoji 🙂🚀; 中文混合 English; Ωμέγα.")
    for text in texts:
        assert ours.encode_ordinary(text) == theirs.encode_ordinary(text), text


def test_encodings_have_the_right_size():
    assert get_encoding("cl100k_base").n_vocab == 100277
    assert get_encoding("o200k_base").n_vocab == 200019


@pytest.mark.parametrize("model,expected", [("gpt-4o-mini", 124), ("gpt-4o", 124), ("gpt-4", 129), ("gpt-3.5-turbo", 129)])
def test_count_chat_matches_cookbook(model, expected):
    assert count_chat(COOKBOOK, model) == expected


@pytest.mark.parametrize(
    "model,encoding",
    [
        ("gpt-4o-mini", "o200k_base"), ("gpt-4o-2024-08-06", "o200k_base"), ("o1-mini", "o200k_base"),
        ("o3", "o200k_base"), ("o4-mini", "o200k_base"), ("gpt-4.1-nano", "o200k_base"),
        ("gpt-5", "o200k_base"), ("openai/gpt-4o", "o200k_base"), ("ft:gpt-4o-mini:acme::x1", "o200k_base"),
        ("gpt-4", "cl100k_base"), ("gpt-4-turbo", "cl100k_base"), ("gpt-3.5-turbo", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"), ("llama-3-70b", "cl100k_base"), ("", "cl100k_base"),
    ],
)
def test_encoding_for_model(model, encoding):
    assert encoding_for_model(model) == encoding


def test_count_chat_content_parts_and_tool_calls():
    parts = [{"type": "text", "text": "Describe "}, {"type": "image_url", "image_url": {"url": "x"}},
             {"type": "text", "text": "this image."}]
    enc = "o200k_base"
    expected = 3 + 3 + count_text("user", enc) + count_text("Describe this image.", enc)
    assert count_chat([{"role": "user", "content": parts}], "gpt-4o") == expected
    # None content (assistant tool call turn) counts nothing; tool_calls count as their JSON text
    msg = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]}
    expected = 3 + 3 + count_text("assistant", enc) + count_text('[{"id":"c1","type":"function"}]', enc)
    assert count_chat([msg], "gpt-4o") == expected


def test_cache_hit_returns_same_count():
    cache_clear()
    system = "You are a meticulous assistant. " * 20
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "hi"}]
    first = count_chat(messages, "gpt-4o-mini")
    info = cache_info()
    assert info["misses"] == 1 and info["hits"] == 0 and info["size"] == 1
    second = count_chat(messages, "gpt-4o-mini")
    assert second == first
    assert cache_info()["hits"] == 1
    # the cache is keyed per encoding too: a cl100k model misses, and its count is its own
    assert count_chat(messages, "gpt-4") == 3 + 2 * 3 + sum(
        count_text(t, "cl100k_base") for t in ("system", system, "user", "hi"))
    assert cache_info()["misses"] == 2


def test_cache_is_bounded(monkeypatch):
    cache_clear()
    monkeypatch.setattr(tokenizer, "CACHE_SIZE", 8)
    for i in range(20):
        count_chat([{"role": "user", "content": f"message number {i} " * 10}], "gpt-4o")
    assert cache_info()["size"] == 8
    cache_clear()


def _rank_file(encoding):
    return tokenizer._find_rank_file(encoding)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_rank_files_are_verified(encoding):
    ranks = load_ranks(_rank_file(encoding), encoding)
    assert len(ranks) == {"cl100k_base": 100256, "o200k_base": 199998}[encoding]
    assert sorted(ranks.values()) == list(range(len(ranks)))


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_corrupted_copy_is_refused(encoding, tmp_path):
    src = _rank_file(encoding)
    with open(src, "rb") as f:
        raw = f.read()
    if src.endswith(".gz"):
        raw = gzip.decompress(raw)
    # flip one rank digit: still a well-formed rank file, but not the verified vocabulary
    i = raw.index(b" ") + 1
    bad = raw[:i] + (b"1" if raw[i:i + 1] != b"1" else b"2") + raw[i + 1:]
    plain = tmp_path / f"{encoding}.tiktoken"
    plain.write_bytes(bad)
    with pytest.raises(TokenizerDataError, match="SHA-256"):
        load_ranks(str(plain), encoding)
    gz = tmp_path / f"{encoding}.tiktoken.gz"
    gz.write_bytes(gzip.compress(bad))
    with pytest.raises(TokenizerDataError, match="SHA-256"):
        load_ranks(str(gz), encoding)
    # and the untouched bytes are accepted
    good = tmp_path / "good.tiktoken"
    good.write_bytes(raw)
    assert load_ranks(str(good), encoding) == load_ranks(src, encoding)


def test_truncated_gzip_is_refused(tmp_path):
    path = tmp_path / "o200k_base.tiktoken.gz"
    with open(_rank_file("o200k_base"), "rb") as f:
        path.write_bytes(f.read()[:1000])
    with pytest.raises(TokenizerDataError):
        load_ranks(str(path), "o200k_base")


def test_unknown_encoding():
    with pytest.raises(ValueError):
        get_encoding("p50k_base")


def test_count_prompt_of_a_request_body_when_a_stream_reported_no_usage():
    import orjson

    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there, tokens"}]
    body = orjson.dumps({"model": "gpt-4o", "messages": msgs})
    assert tokenizer.count_prompt(body, "/v1/chat/completions", "gpt-4o") == tokenizer.count_chat(msgs, "gpt-4o")
    enc = tokenizer.encoding_for_model("gpt-4o")
    body = orjson.dumps({"model": "gpt-4o", "prompt": "once upon a time"})
    assert tokenizer.count_prompt(body, "/v1/completions", "gpt-4o") == tokenizer.count_text("once upon a time", enc)
    body = orjson.dumps({"model": "gpt-4o", "input": ["a b", "c"]})
    assert tokenizer.count_prompt(body, "/v1/responses", "gpt-4o") == (
        tokenizer.count_text("a b", enc) + tokenizer.count_text("c", enc))
    assert tokenizer.count_prompt(b"[1,2]", "/v1/chat/completions", "gpt-4o") == -1
    assert tokenizer.count_prompt(b"{bad", "/v1/chat/completions", "gpt-4o") == -1
