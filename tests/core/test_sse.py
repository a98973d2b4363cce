"""fastgw.protocol.sse.SSERelay against a plain-Python twin on generated OpenAI-like streams.

The twin splits the whole stream with the event-stream rules (lines end with CRLF, LF or CR; an empty line
ends an event; `data` lines joined with LF), json.loads each data payload (strict UTF-8, no NaN/Infinity, at
most 512 nested containers: what the relay calls JSON) and picks usage / [DONE] / text.
The relay must forward the same bytes (concatenated), count the same events and report the same usage and
text whether the stream is fed whole, byte by byte or in random pieces.
"""
import json
import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastgw.protocol.sse import MAX_TEXT_BYTES, SSERelay

# --------------------------------------------------------------------------------------------- the twin

_EOL = re.compile(rb"\r\n|\r|\n")


def _count(v):
    ok = isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 10**18
    return v if ok else -1


_PROMISE = re.compile(rb'"usage"[ \t\n\r]*:[ \t\n\r]*null')
MAX_DEPTH = 512     # fastgw/protocol/jsonskip.pxd JSON_MAX_DEPTH


def _not_json(name):
    raise ValueError(f"{name} is not JSON")


def _int(digits):
    # (a huge integer is no token count: a stand-in, not Python's 4300-digit ValueError)
    return int(digits) if len(digits) < 30 else (-1 if digits.startswith("-") else 1) * 10**30


def _depth(value):
    most, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, (dict, list)):
            most = max(most, d)
            todo.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return most


def event_json(payload: bytes):
    """The event's data as JSON, or None when it is not JSON (then nothing is read from it)."""
    try:
        obj = json.loads(payload.decode("utf-8"), parse_constant=_not_json, parse_int=_int)
    except (ValueError, RecursionError):
        return None
    return obj if _depth(obj) <= MAX_DEPTH else None


def twin(stream: bytes, strip: bool) -> dict:
    r = {"events": 0, "done": False, "usage_seen": False, "prompt": -1, "completion": -1, "total": -1,
         "usage_promised": False}
    text, fwd = [], []
    pos = block_start = 0
    data = []

    def dispatch():
        if not data:
            return False
        r["events"] += 1
        payload = b"\n".join(data)
        if payload == b"[DONE]":
            r["done"] = True
            return False
        if not r["usage_promised"] and _PROMISE.search(payload):
            r["usage_promised"] = True      # text is collected only until the stream promises its usage
        obj = event_json(payload)
        if not isinstance(obj, dict):
            return False
        choices = obj.get("choices")
        if isinstance(choices, list) and not r["usage_promised"]:
            for ch in choices:
                delta = ch.get("delta") if isinstance(ch, dict) else None
                content = delta.get("content") if isinstance(delta, dict) else None
                if isinstance(content, str):
                    text.append(content)
        if (obj.get("type") == "response.output_text.delta" and isinstance(obj.get("delta"), str)
                and not r["usage_promised"]):
            text.append(obj["delta"])
        usage = obj.get("usage")
        top = isinstance(usage, dict)
        if not top:
            resp = obj.get("response")
            usage = resp.get("usage") if isinstance(resp, dict) else None
        if isinstance(usage, dict):
            p1, p2 = _count(usage.get("prompt_tokens")), _count(usage.get("input_tokens"))
            c1, c2 = _count(usage.get("completion_tokens")), _count(usage.get("output_tokens"))
            r["prompt"] = p1 if p1 >= 0 else p2
            r["completion"] = c1 if c1 >= 0 else c2
            total = _count(usage.get("total_tokens"))
            if total < 0 and r["prompt"] >= 0 and r["completion"] >= 0:
                total = r["prompt"] + r["completion"]
            r["total"] = total
            r["usage_seen"] = True
        return strip and top and choices == []

    while True:
        m = _EOL.search(stream, pos)
        if not m:
            break
        line, pos = stream[pos:m.start()], m.end()
        if line == b"":
            if not dispatch():
                fwd.append(stream[block_start:pos])
            block_start, data = pos, []
        elif line.startswith(b"data:"):
            v = line[5:]
            data.append(v[1:] if v.startswith(b" ") else v)
        elif line == b"data":
            data.append(b"")
    fwd.append(stream[block_start:])  # an incomplete last event is forwarded, not counted
    r["forwarded"] = b"".join(fwd)
    r["text"] = "".join(text)
    return r


def run(stream: bytes, pieces, strip: bool, collect: bool = True) -> dict:
    relay = SSERelay(strip_usage_chunk=strip, collect_text=collect)
    out = []
    for piece in pieces:
        got = relay.feed(piece)
        if not strip:
            assert got is piece  # a plain relay forwards the chunk object itself
        out.append(got)
    tail = relay.finish()
    if not strip:
        assert tail == b""
    out.append(tail)
    return {
        "events": relay.events, "done": relay.done, "usage_seen": relay.usage_seen,
        "prompt": relay.prompt_tokens, "completion": relay.completion_tokens, "total": relay.total_tokens,
        "forwarded": b"".join(out), "text": relay.text() if collect else "",
        "usage_promised": relay.usage_promised,
    }


def splits(stream: bytes, cuts) -> list:
    cuts = sorted({c % (len(stream) + 1) for c in cuts})
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


# ---------------------------------------------------------------------------------------- generation

TRICKY = [
    'the "usage": field', '"usage":{"prompt_tokens":5}', '{"usage": {"total_tokens": 7}}', "data: [DONE]\n\n",
    "\\", '\\"', "\r\n\r\n", "\n\n", "\r", '"choices":[]', "[DONE]", "é日本🙂", "\u2028", "\x00\x1f", "usage",
]
content = st.one_of(st.text(max_size=24), st.sampled_from(TRICKY))
nat = st.integers(min_value=0, max_value=10**6)


@st.composite
def ordered(draw, items):
    """A dict with its keys in a drawn order (JSON keys may come in any order)."""
    keys = draw(st.permutations(list(items)))
    return {k: items[k] for k in keys}


@st.composite
def chat_chunk(draw):
    delta = draw(st.sampled_from(["content", "role", "none", "tool"]))
    if delta == "content":
        d = {"content": draw(content)}
    elif delta == "role":
        d = {"role": "assistant", "content": ""}
    elif delta == "none":
        d = {"content": None}
    else:
        d = {"tool_calls": [{"index": 0, "function": {"arguments": draw(content)}}]}
    choices = [draw(ordered({"index": i, "delta": d, "finish_reason": None})) for i in range(draw(st.integers(1, 2)))]
    obj = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini",
           "choices": choices}
    if draw(st.booleans()):
        obj["usage"] = None
    return draw(ordered(obj))


@st.composite
def usage_chunk(draw):
    p, c = draw(nat), draw(nat)
    usage = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
             "prompt_tokens_details": {"cached_tokens": 0, "note": draw(content)}}
    if draw(st.booleans()):
        del usage["total_tokens"]
    return draw(ordered({"id": "chatcmpl-1", "choices": [], "usage": draw(ordered(usage)), "model": "m"}))


@st.composite
def responses_event(draw):
    kind = draw(st.sampled_from(["delta", "created", "completed"]))
    if kind == "delta":
        return draw(ordered({"type": "response.output_text.delta", "item_id": "m1", "output_index": 0,
                             "delta": draw(content)}))
    if kind == "created":
        return {"type": "response.created", "response": {"id": "r1", "usage": None}}
    i, o = draw(nat), draw(nat)
    usage = draw(ordered({"input_tokens": i, "output_tokens": o, "total_tokens": i + o,
                          "input_tokens_details": {"cached_tokens": 0}}))
    return {"type": "response.completed", "response": draw(ordered({"id": "r1", "status": "completed",
                                                                     "usage": usage}))}


@st.composite
def stream(draw):
    eol = draw(st.sampled_from(["\n", "\r\n", "\r", "mixed"]))
    ascii_only = draw(st.booleans())
    sep = draw(st.sampled_from([(",", ":"), (", ", ": "), "indent"]))
    colon = draw(st.sampled_from(["data: ", "data:"]))
    out = []

    def line(s):
        out.append(s + (draw(st.sampled_from(["\n", "\r\n", "\r"])) if eol == "mixed" else eol))

    def event(obj):
        if sep == "indent":  # multi-line data: newlines only between JSON tokens
            text = json.dumps(obj, indent=1, ensure_ascii=ascii_only)
        else:
            text = json.dumps(obj, separators=sep, ensure_ascii=ascii_only)
        if draw(st.integers(0, 9)) == 0:
            line("event: message")
        for part in text.split("\n"):
            line(colon + part)
        line("")

    objs = draw(st.lists(st.one_of(chat_chunk(), responses_event()), max_size=8))
    if draw(st.booleans()):
        objs.insert(draw(st.integers(0, len(objs))), draw(usage_chunk()))
    for obj in objs:
        if draw(st.integers(0, 5)) == 0:
            line(": keep-alive")
            line("")
        event(obj)
    if draw(st.booleans()):
        line(colon + "[DONE]")
        line("")
    raw = "".join(out)
    if draw(st.integers(0, 5)) == 0:  # cut off mid-event
        raw = raw[: draw(st.integers(0, len(raw)))]
    return raw.encode("utf-8", "surrogatepass")


SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(stream(), st.booleans(), st.lists(st.integers(min_value=0), max_size=12))
def test_matches_twin(data, strip, cuts):
    expected = twin(data, strip)
    assert run(data, [data] if data else [], strip) == expected
    assert run(data, splits(data, cuts), strip) == expected


@settings(max_examples=60, deadline=None)
@given(stream(), st.booleans())
def test_byte_by_byte(data, strip):
    expected = twin(data, strip)
    assert run(data, [data[i:i + 1] for i in range(len(data))], strip) == expected


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300), st.booleans(), st.lists(st.integers(min_value=0), max_size=8))
def test_arbitrary_bytes(data, strip, cuts):
    # garbage must neither crash nor desynchronise the relay; counts still follow the twin
    expected = twin(data, strip)
    assert run(data, splits(data, cuts), strip) == expected


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([b"data: ", b"data:", b"data", b"\r", b"\n", b"\r\n", b": x", b"[DONE]",
                                 b'{"choices":[],"usage":{"prompt_tokens":1}}', b"id: 1", b"{}"]), max_size=40),
       st.booleans(), st.lists(st.integers(min_value=0), max_size=8))
def test_line_ending_soup(parts, strip, cuts):
    data = b"".join(parts)
    expected = twin(data, strip)
    assert run(data, splits(data, cuts), strip) == expected
    assert run(data, [data[i:i + 1] for i in range(len(data))], strip) == expected


# ------------------------------------------------------------------------------------ fixed examples

OPENAI = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
    b'"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}],"usage":null}\n\n'
    b': keep-alive\n\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
    b'"choices":[{"index":0,"delta":{"content":" the \\"usage\\": {\\"prompt_tokens\\": 99} field"},'
    b'"finish_reason":"stop"}],"usage":null}\n\n'
)
USAGE = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
    b'"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21,'
    b'"prompt_tokens_details":{"cached_tokens":0}}}\n\n'
)
DONE = b"data: [DONE]\n\n"


def test_openai_stream():
    s = OPENAI + USAGE + DONE
    relay = SSERelay(collect_text=True)
    assert relay.feed(s) is s
    assert relay.finish() == b""
    assert (relay.events, relay.done, relay.usage_seen) == (5, True, True)
    assert (relay.prompt_tokens, relay.completion_tokens, relay.total_tokens) == (9, 12, 21)
    # Its chunks say "usage": null (it will report usage): no text is collected, it is not needed.
    assert relay.usage_promised and relay.text() == ""
    # A stream whose chunks carry no usage key (an upstream that ignores include_usage): text is collected.
    bare = OPENAI.replace(b',"usage":null', b"") + DONE
    relay = SSERelay(collect_text=True)
    relay.feed(bare)
    assert not relay.usage_promised and not relay.usage_seen
    assert relay.text() == 'Hi the "usage": {"prompt_tokens": 99} field' == twin(bare, False)["text"]


def test_usage_in_content_is_not_usage():
    relay = SSERelay()
    relay.feed(OPENAI + DONE)
    assert not relay.usage_seen
    assert (relay.prompt_tokens, relay.completion_tokens, relay.total_tokens) == (-1, -1, -1)


def test_strip_removes_only_the_usage_chunk():
    s = OPENAI + USAGE + DONE
    for pieces in ([s], [s[i:i + 1] for i in range(len(s))], splits(s, range(7, len(s), 61))):
        relay = SSERelay(strip_usage_chunk=True)
        out = b"".join(relay.feed(p) for p in pieces) + relay.finish()
        assert out == OPENAI + DONE
        assert relay.prompt_tokens == 9 and relay.done


def test_strip_forwards_complete_events_promptly():
    relay = SSERelay(strip_usage_chunk=True)
    first, rest = OPENAI[:300], OPENAI[300:]
    event_end = OPENAI.index(b"\n\n") + 2
    assert relay.feed(first) == OPENAI[:event_end]  # the complete event goes now, the partial one waits
    assert relay.feed(rest) == OPENAI[event_end:]
    # a whole chunk of complete events, nothing held: the chunk object itself
    assert relay.feed(DONE) is DONE
    assert relay.finish() == b""


def test_strip_keeps_usage_when_choices_not_empty():
    ev = b'data: {"choices":[{"delta":{"content":"x"}}],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
    relay = SSERelay(strip_usage_chunk=True)
    assert relay.feed(ev) == ev
    assert (relay.prompt_tokens, relay.completion_tokens, relay.total_tokens) == (1, 2, 3)


def test_crlf_split_after_stripped_event():
    s = (OPENAI + USAGE + DONE).replace(b"\n", b"\r\n")
    cut = s.index(b"[DONE]") - len(b"data: ") - 1  # between the CR and LF that end the usage event
    assert s[cut - 1:cut + 1] == b"\r\n"
    relay = SSERelay(strip_usage_chunk=True)
    out = relay.feed(s[:cut]) + relay.feed(s[cut:]) + relay.finish()
    assert out == (OPENAI + DONE).replace(b"\n", b"\r\n")


def test_finish_returns_held_incomplete_event():
    relay = SSERelay(strip_usage_chunk=True)
    assert relay.feed(b"data: {\"choices\":[]") == b""
    assert relay.finish() == b"data: {\"choices\":[]"
    assert relay.events == 0


def test_text_is_collected_up_to_a_bound_and_the_rest_measured():
    # An upstream that streams on and on without usage: the text kept stops at MAX_TEXT_BYTES (memory, and the
    # CPU of counting it at the end), the bytes after it are measured, and the stream itself is relayed whole.
    piece = "word " * 200
    event = b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": piece}}]}).encode() + b"\n\n"
    per = len(json.dumps(piece))                    # collected per event: the JSON string, quotes included
    n = MAX_TEXT_BYTES // (per + 1) + 50
    relay = SSERelay(collect_text=True)
    for _ in range(n):
        assert relay.feed(event) == event
    kept = relay.text()
    assert len(kept) == (n - 50) * len(piece) and kept == piece * (n - 50)
    assert relay.text_skipped == 50 * per and relay.events == n


def test_responses_api_usage_and_text():
    s = (b'event: response.created\ndata: {"type":"response.created","response":{"id":"r","usage":null}}\n\n'
         b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"Hel"}\n\n'
         b'event: response.output_text.delta\ndata: {"delta":"lo \\u00e9","type":"response.output_text.delta"}\n\n'
         b'event: response.completed\ndata: {"type":"response.completed","response":{"id":"r","usage":'
         b'{"input_tokens":5,"input_tokens_details":{"cached_tokens":0},"output_tokens":2,"total_tokens":7}}}\n\n')
    relay = SSERelay(collect_text=True)
    relay.feed(s)
    assert (relay.prompt_tokens, relay.completion_tokens, relay.total_tokens) == (5, 2, 7)
    assert relay.usage_promised and relay.text() == ""     # response.created said "usage": null
    assert relay.events == 4 and not relay.done
    relay = SSERelay(collect_text=True)
    relay.feed(s.replace(b',"usage":null', b""))
    assert relay.text() == "Hello é"


def test_whitespace_and_key_order():
    s = b'data:  { "usage" : { "total_tokens" : 30 , "completion_tokens" : 20, "prompt_tokens":10 } , "choices" : [ ] }\r\n\r\n'
    relay = SSERelay(strip_usage_chunk=True)
    assert relay.feed(s) == b""
    assert (relay.prompt_tokens, relay.completion_tokens, relay.total_tokens) == (10, 20, 30)


def test_last_usage_wins_and_null_does_not_reset():
    a = b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}\n\n'
    b = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}\n\n'
    c = b'data: {"choices":[],"usage":null}\n\n'
    relay = SSERelay()
    relay.feed(a + b + c)
    assert (relay.prompt_tokens, relay.completion_tokens, relay.total_tokens) == (3, 4, 7)


def test_text_with_surrogate_pair_split_across_events():
    s = (b'data: {"choices":[{"delta":{"content":"a\\ud83d"}}]}\n\n'
         b'data: {"choices":[{"delta":{"content":"\\ude00b"}}]}\n\n')
    relay = SSERelay(collect_text=True)
    relay.feed(s)
    assert relay.text() == twin(s, False)["text"]


def test_bytearray_and_memoryview_chunks():
    relay = SSERelay()
    out = relay.feed(bytearray(USAGE[:50])) + relay.feed(memoryview(USAGE[50:]))
    assert out == USAGE and relay.total_tokens == 21


def test_large_event_random_splits():
    big = "x" * 200_000
    ev = ("data: " + json.dumps({"choices": [{"delta": {"content": big}}], "usage": None}) + "\n\n").encode()
    s = ev + USAGE + DONE
    rnd = random.Random(7)
    pieces = splits(s, [rnd.randrange(len(s)) for _ in range(50)])
    assert run(s, pieces, True) == twin(s, True)
    assert run(s, pieces, False) == twin(s, False)


@pytest.mark.parametrize("strip", [False, True])
def test_finish_resets_for_reuse(strip):
    relay = SSERelay(strip_usage_chunk=strip)
    relay.feed(b"data: {\"a\":")
    relay.finish()
    assert relay.feed(DONE) == DONE and relay.done and relay.events == 1


def test_text_survives_a_bad_escape_in_one_event():
    s = (b'data: {"choices":[{"delta":{"content":"one "}}]}\n\n'
         b'data: {"choices":[{"delta":{"content":"bad \\q"}}]}\n\n'
         b'data: {"choices":[{"delta":{"content":"two"}}]}\n\n')
    relay = SSERelay(collect_text=True)
    relay.feed(s)
    assert relay.text() == twin(s, False)["text"] == "one two"


# Found by fuzzing (tests/fuzz, sse_relay): usage was read from events that are not JSON (here an invalid UTF-8
# key, `"\x97\x97put_tokens"`), which no client can read; now an event must be JSON for anything to be read.
NOT_JSON = [
    b'{"choices":[],"usage":{"\x97\x97put_tokens":4,"output_tokens":2}}',     # invalid UTF-8 in a key
    b'{"choices":[],"usage":{"prompt_tokens":1},"x":tru}',                    # a literal cut short
    b'{"choices":[],"usage":{"prompt_tokens":01}}',                           # a leading zero
    b'{"choices":[],"usage":{"prompt_tokens":1}} x',                          # bytes after the object
    b'{"choices":[],"usage":{"prompt_tokens":1},"a":NaN}',                    # Python reads NaN; it is not JSON
    b'{"choices":[],"usage":{"prompt_tokens":1},"a":"\x01"}',                 # a raw control byte in a string
    b'{"choices":[],"usage":{"prompt_tokens":1},"a":"\xed\xa0\x80"}',         # an encoded surrogate
    b'{"choices":[],"usage":{"prompt_tokens":1},"a":"\\x"}',                  # an unknown escape
    b'{"choices":[],"usage":{"prompt_tokens":1},"a":' + b"[" * 512 + b"]" * 512 + b"}",   # 513 levels
]
STILL_JSON = [
    b'{"choices":[],"usage":{"prompt_tokens":1},"a":"\\ud800"}',              # a lone surrogate escape
    b'{"choices":[],"usage":{"prompt_tokens":1},"a":' + b"[" * 511 + b"]" * 511 + b"}",   # 512 levels
    b'{"choices":[],"usage":{"prompt_tokens":1},"a":[1e400,-0.5E-7,' + b"9" * 5000 + b']}',
    b' \t{"choices":[],"usage":{"prompt_tokens":1},"a":"caf\xc3\xa9 \xf0\x9f\x99\x82 \x7f"}\t',
]


@pytest.mark.parametrize("payload", NOT_JSON + STILL_JSON)
@pytest.mark.parametrize("strip", [False, True])
def test_usage_only_from_events_that_are_json(payload, strip):
    s = b"data: " + payload + b"\n\n" + DONE
    got = run(s, [s], strip)
    assert got == twin(s, strip)
    assert got["prompt"] == (-1 if payload in NOT_JSON else 1)
    assert got["forwarded"] == (DONE if strip and payload in STILL_JSON else s)


def test_usage_null_right_after_another_usage_key():
    # Found by fuzzing (tests/fuzz, sse_relay): after a match of `"usage"` the search went on past its closing
    # quote, which can open the next one, so `"usage"usage": null` did not promise usage as the twin says.
    s = b'data: {"a":"usage"usage": null}\n\ndata: {"choices":[{"delta":{"content":"x"}}]}\n\n'
    got = run(s, [s], False)
    assert got == twin(s, False) and got["usage_promised"] and got["text"] == ""
