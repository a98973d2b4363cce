"""The cache key (fastgw/cache/key.pyx) against a plain-Python reference of the canonical form, and the entry
conversions (fastgw/cache/entry.py): a stream stored and served back, a JSON answer told as a stream."""
import json

import orjson
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgw.cache import entry as E
from fastgw.cache.key import request_key
from fastgw.protocol.jsonpeek import peek_request

IGNORED = {"model", "user", "stream", "stream_options", "store", "metadata", "safety_identifier", "prompt_cache_key"}
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.text(max_size=20))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c,
                                                                                             max_size=4)), max_leaves=12)
bodies = st.dictionaries(st.sampled_from(["model", "user", "stream", "messages", "max_tokens", "seed", "tools",
                                          "stream_options", "metadata", "response_format", "input", "top_p"]),
                         values, max_size=8)


def reference(body: dict, endpoint, model, scope):
    """Top-level members sorted by their JSON name, each value as orjson writes it."""
    if body.get("n") not in (None, 1) or body.get("temperature") not in (None, 0):
        return None
    members = sorted((orjson.dumps(k), orjson.dumps(v)) for k, v in body.items() if k not in IGNORED)
    text = b"".join(k + b":" + v + b"," for k, v in members)
    return xxhash.xxh3_128_digest(f"{endpoint}\0{model}\0{scope}\0".encode() + text)


@settings(max_examples=300)
@given(body=bodies, scope=st.sampled_from(["", "alice", "team"]))
def test_key_matches_reference_and_ignores_member_order_and_whitespace(body, scope):
    raw = orjson.dumps(body)
    key, why = request_key(raw, None, "/v1/chat/completions", "gpt", scope, False, frozenset())
    assert key == reference(body, "/v1/chat/completions", "gpt", scope)
    # from peek_request's member spans (the gateway's way), the same key as from walking the body
    assert request_key(raw, peek_request(raw), "/v1/chat/completions", "gpt", scope, False, frozenset())[0] == key
    # other member order and whitespace between members: the same key
    shuffled = b"{ " + b" ,\n ".join(orjson.dumps(k) + b" : " + orjson.dumps(v)
                                     for k, v in reversed(list(body.items()))) + b" }"
    assert request_key(shuffled, None, "/v1/chat/completions", "gpt", scope, False, frozenset())[0] == key
    assert request_key(shuffled, peek_request(shuffled), "/v1/chat/completions", "gpt", scope, False,
                       frozenset())[0] == key
    assert request_key(raw, None, "/v1/completions", "gpt", scope, False, frozenset())[0] != key
    assert request_key(raw, None, "/v1/chat/completions", "gpt", scope + "x", False, frozenset())[0] != key


def test_what_is_not_cacheable():
    k = lambda b, allow=False, tools=frozenset(): request_key(orjson.dumps(b), peek_request(orjson.dumps(b)), "/v1/chat/completions", "m", "",
                                                              allow, tools)
    assert k({"messages": [], "n": 2}) == (None, "n")
    assert k({"messages": [], "temperature": 0.3}) == (None, "temperature")
    assert k({"messages": [], "temperature": 0.3}, allow=True)[0] is not None
    assert k({"messages": [], "temperature": 0})[0] is not None
    tools = [{"type": "function", "function": {"name": "send_email"}}]
    assert k({"messages": [], "tools": tools}, tools=frozenset({"send_email"})) == (None, "tool")
    assert k({"messages": [], "tools": tools}, tools=frozenset({"other"}))[0] is not None
    assert request_key(b"[1]", None, "/v1/chat/completions", "m", "", False, frozenset()) == (None, "body")


CHUNK = {"id": "c1", "object": "chat.completion.chunk", "created": 7, "model": "m", "system_fingerprint": "fp"}


def sse(*objs):
    return b"".join(b"data: " + orjson.dumps(o) + b"\n\n" for o in objs) + b"data: [DONE]\n\n"


def test_stream_entry_round_trips():
    chunks = [{**CHUNK, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "finish_reason": None}], "usage": None},
              {**CHUNK, "choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}], "usage": None},
              {**CHUNK, "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}],
               "usage": None}]
    usage = {**CHUNK, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    raw = sse(*chunks, usage)
    e = E.encode_stream(raw, 3, 2)
    assert E.as_sse(e, "/v1/chat/completions", True) == raw
    assert E.as_sse(e, "/v1/chat/completions", False) == sse(*chunks)
    whole = orjson.loads(E.as_json(e, "/v1/chat/completions"))
    assert whole["id"] == "c1" and whole["created"] == 7 and whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"]["content"] == "Hello" and whole["usage"]["total_tokens"] == 5
    # and back: the assembled answer told as a stream has the same text, finish and usage
    j = E.encode_json(orjson.dumps(whole), 3, 2)
    told = [orjson.loads(ev[6:]) for ev in E.as_sse(j, "/v1/chat/completions", True).split(b"\n\n")[:-2]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in told if c["choices"]) == "Hello"
    assert told[-1]["usage"] == whole["usage"] and told[-2]["choices"][0]["finish_reason"] == "stop"


def test_error_events_are_never_stored():
    assert E.encode_stream(sse({**CHUNK, "choices": []}, {"error": {"message": "boom"}}), -1, -1) is None


def test_many_members_are_walked_and_give_the_same_key():
    # More top-level members than peek_request keeps spans for: the key walks the body, with the same result.
    body = {f"k{i:02d}": i for i in range(40)}
    raw = orjson.dumps(body)
    f = peek_request(raw)
    assert f.members == 40 and len(f.member_spans()) == 16
    assert request_key(raw, f, "/v1/chat/completions", "m", "", False, frozenset())[0] == reference(
        body, "/v1/chat/completions", "m", "")
