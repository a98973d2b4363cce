"""jsonpeek against orjson as the reference: same validity verdict, same field values, offsets that point at
the right bytes, and splice edits that load to the expected dict.

Deliberate divergence from orjson (each has a test below):
- nesting deeper than NESTING_LIMIT (512) containers is invalid for jsonpeek; orjson has no limit (it even
  crashes the interpreter around 100k levels). Request bodies never nest that deep; a bound keeps the
  scanner's stack fixed.
Everything else orjson rejects (lone surrogate escapes, invalid UTF-8, control bytes in strings, NaN,
numbers that overflow a double to infinity, leading zeros, BOM, trailing bytes) jsonpeek rejects too, and
what it accepts (integers beyond 64 bits as floats, underflow to 0.0, "\\u0000", DEL) jsonpeek accepts.
"""
import json
import random

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fastgw.protocol.jsonpeek import NESTING_LIMIT, RequestFields, peek_request, peek_response, peek_usage, splice

MAX = 2**63


# --------------------------------------------------------------------------------------------------------
# The reference: what the gateway would read from orjson's dict.

def orjson_or_none(body):
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def nonneg_int(v):
    return v if type(v) is int and 0 <= v < MAX else -1


def expected_max_tokens(d):
    for k in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        v = nonneg_int(d.get(k))
        if v >= 0:
            return v
    return -1


def check_request(body):
    """Assert peek_request(body) agrees with orjson on body; return the parsed dict or None."""
    f = peek_request(body)
    d = orjson_or_none(body)
    if type(d) is not dict:
        assert f is None, (body, d)
        return None
    assert isinstance(f, RequestFields), body
    model = d.get("model")
    assert f.model == (model if isinstance(model, str) else None)
    assert f.user == (d["user"] if isinstance(d.get("user"), str) else None)
    for key, start, end in (("model", f.model_start, f.model_end),
                            ("stream_options", f.stream_options_start, f.stream_options_end)):
        if key in d:
            assert 0 <= start < end <= len(body)
            assert orjson.loads(body[start:end]) == d[key]
        else:
            assert start == end == -1
    assert f.stream is (d.get("stream") is True)
    so = d.get("stream_options")
    assert f.include_usage is (isinstance(so, dict) and so.get("include_usage") is True)
    assert body[f.object_end:f.object_end + 1] == b"}"
    assert body[f.object_end + 1:].strip(b" \t\r\n") == b""
    assert f.has_n is ("n" in d)
    assert f.n == nonneg_int(d.get("n"))
    assert f.max_tokens == expected_max_tokens(d)
    check_member_spans(body, f, d)
    return d


def check_member_spans(body, f, d):
    """The top-level members' spans (the cache key's input): every member in body order, duplicates included."""
    pairs = json.loads(body, object_pairs_hook=lambda kv: kv)
    assert f.members == len(pairs)
    names = [k for k, _ in pairs]
    for (ks, vs, ve), name in zip(f.member_spans(), names):
        assert body[ks:ks + 1] == b'"'
        assert json.loads(body[ks:vs].rstrip(b" \t\r\n")[:-1]) == name
        value = orjson.loads(body[vs:ve])
        if names.count(name) == 1:
            assert value == d[name]


def check_response(body):
    """peek_response never refuses a body orjson reads as an object (it then gives peek_usage's counts); an
    invalid body it lets through is an object by its outline (its fault is inside: test_response_structure)."""
    got = peek_response(body)
    d = orjson_or_none(body)
    if type(d) is dict:
        assert got == peek_usage(body), body
    elif got is not None:
        t = body.strip(b" \t\r\n")
        assert t[:1] == b"{" and t[-1:] == b"}", body


def check_usage(body):
    check_response(body)
    got = peek_usage(body)
    assert type(got) is tuple and len(got) == 2 and all(type(v) is int for v in got)
    d = orjson_or_none(body)
    if d is None:
        # Not validated (the response is forwarded as is): (-1, -1) or counts read from it, never a crash.
        assert got == (-1, -1) or min(got) >= 0, body
        return
    if type(d) is not dict or not isinstance(d.get("usage"), dict):
        assert got == (-1, -1), body
        return
    u = d["usage"]
    p = nonneg_int(u.get("prompt_tokens"))
    if p < 0:
        p = nonneg_int(u.get("input_tokens"))
    c = nonneg_int(u.get("completion_tokens"))
    if c < 0:
        c = nonneg_int(u.get("output_tokens"))
    assert got == (max(p, 0), max(c, 0)), body


# --------------------------------------------------------------------------------------------------------
# JSON text generators (bytes, built by hand so whitespace, escapes and number shapes vary freely).

ws = st.sampled_from([b"", b"", b"", b" ", b"\n", b"\t", b"\r\n  ", b" \t"])

ESCAPES = [b'\\"', b"\\\\", b"\\/", b"\\b", b"\\f", b"\\n", b"\\r", b"\\t", b"\\u0000", b"\\u00e9",
           b"\\u00E9", b"\\ud83d\\ude00", b"\\uD834\\uDD1E", b"\\u2028", b"\\uffff", b"\\u007f"]


def _u_escape(cp, upper):
    def one(u):
        s = b"\\u%04x" % u
        return s.upper().replace(b"\\U", b"\\u") if upper else s
    if cp < 0x10000:
        return one(cp)
    cp -= 0x10000
    return one(0xD800 + (cp >> 10)) + one(0xDC00 + (cp & 0x3FF))


string_piece = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",), min_codepoint=0x20,
                          blacklist_characters='"\\'), max_size=6).map(lambda s: s.encode()),
    st.sampled_from(ESCAPES),
    # longer runs: plain ASCII after non-ASCII, mixed scripts
    st.text(st.sampled_from("ab é—你😀\x7f"), min_size=10, max_size=40).map(lambda s: s.encode()),
    st.builds(_u_escape, st.integers(0, 0x10FFFF).filter(lambda c: not 0xD800 <= c <= 0xDFFF),
              st.booleans()),
)
json_string = st.lists(string_piece, max_size=5).map(lambda ps: b'"' + b"".join(ps) + b'"')

digits = st.text("0123456789", min_size=1, max_size=4).map(str.encode)
# Long digit runs (up to past the 309 digits of a double's range), cheap to draw.
long_digits = st.builds(lambda a, n, b: a * n + b, st.sampled_from([b"0", b"9", b"1797", b"17976931348623159"]),
                        st.integers(1, 330), digits)
int_part = st.one_of(
    st.just(b"0"),
    st.builds(lambda a, b: a + b, st.sampled_from(list(b"123456789")).map(lambda c: bytes([c])),
              st.one_of(st.just(b""), digits, long_digits)),
    st.sampled_from([str(v).encode() for v in (2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**308, 10**309)]),
)
exponent = st.one_of(
    st.just(b""),
    st.builds(lambda e, s, d: e + s + d, st.sampled_from([b"e", b"E"]), st.sampled_from([b"", b"+", b"-"]),
              st.one_of(digits, st.sampled_from([b"307", b"308", b"309", b"310", b"0308", b"400",
                                                 b"99999999999999999999"]))),
)
json_number = st.builds(lambda s, i, f, e: s + i + f + e, st.sampled_from([b"", b"-"]), int_part,
                        st.one_of(st.just(b""), long_digits.map(lambda d: b"." + d)), exponent)
small_int = st.one_of(st.integers(-5, 5000), st.sampled_from([2**63 - 1, 2**63, 2**64])).map(
    lambda v: str(v).encode())
literal = st.sampled_from([b"true", b"false", b"null"])
scalar = st.one_of(json_string, json_number, small_int, literal)

# Keys the scanner looks for, plain and escaped (orjson decodes both to the same key).
WANTED = [b"model", b"stream", b"stream_options", b"include_usage", b"max_tokens", b"max_completion_tokens",
          b"max_output_tokens", b"n", b"user", b"usage", b"prompt_tokens", b"completion_tokens",
          b"input_tokens", b"output_tokens"]
ESCAPED_KEYS = [b'"mod\\u0065l"', b'"\\u006dodel"', b'"str\\u0065am"', b'"\\u006e"', b'"us\\u0061ge"',
                b'"stream\\u005foptions"', b'"include_usag\\u0065"', b'"prompt\\u005Ftokens"']
key = st.one_of(st.sampled_from([b'"' + k + b'"' for k in WANTED] + ESCAPED_KEYS), json_string)


def _array(items_ws):
    return b"[" + b",".join(a + v + b for a, v, b in items_ws) + b"]" if items_ws else b"[" + b"]"


def _object(members):
    return b"{" + b",".join(a + k + b + b":" + c + v + d for a, k, b, c, v, d in members) + b"}"


def containers(children):
    item = st.tuples(ws, children, ws)
    member = st.tuples(ws, key, ws, ws, children, ws)
    return st.one_of(st.lists(item, max_size=4).map(_array), st.lists(member, max_size=5).map(_object),
                     st.just(b"{ }"), st.just(b"[ ]"))


json_value = st.recursive(scalar, containers, max_leaves=12)

# Values that make the wanted members interesting.
stream_options_value = st.one_of(
    st.lists(st.tuples(ws, st.sampled_from([b'"include_usage"', b'"include_usag\\u0065"', b'"other"']),
                       ws, ws, st.one_of(literal, literal, json_value), ws), max_size=3).map(_object),
    st.lists(st.tuples(ws, st.sampled_from([b'"include_usage"', b'"other"']),
                       ws, ws, st.one_of(literal, literal, json_value), ws), max_size=3).map(_object),
    st.sampled_from([b'{"include_usage":true}', b'{ "include_usage" : true , "x":[1]}']),
    json_value)
usage_value = st.one_of(
    st.lists(st.tuples(ws, st.sampled_from([b'"prompt_tokens"', b'"completion_tokens"', b'"input_tokens"',
                                            b'"output_tokens"', b'"total_tokens"']),
                       ws, ws, st.one_of(small_int, json_number, literal), ws), max_size=5).map(_object),
    json_value)
int_like = st.one_of(small_int, small_int, json_number, literal, json_value)
string_like = st.one_of(json_string, json_string, json_string, json_value)
member_value = {"model": string_like, "user": string_like,
                "stream": st.one_of(literal, literal, json_value), "stream_options": stream_options_value,
                "usage": usage_value, "n": int_like, "max_tokens": int_like, "max_completion_tokens": int_like,
                "max_output_tokens": int_like}


@st.composite
def top_member(draw):
    k = draw(key)
    v = draw(member_value.get(json.loads(k), json_value))
    return (draw(ws), k, draw(ws), draw(ws), v, draw(ws))


@st.composite
def json_document(draw):
    if draw(st.integers(0, 9)) == 0:   # sometimes a valid document that is not an object
        return draw(ws) + draw(json_value) + draw(ws)
    return draw(ws) + _object(draw(st.lists(top_member(), max_size=8))) + draw(ws)


@st.composite
def request_document(draw):
    """An object that looks like a request: each wanted member likely present (plain or escaped key, maybe
    twice), mixed with random members, in random order."""
    members = []
    for name, escaped, value in (
            (b'"model"', b'"mod\\u0065l"', string_like),
            (b'"stream"', b'"str\\u0065am"', literal),
            (b'"stream_options"', b'"stream\\u005foptions"', stream_options_value),
            (b'"max_tokens"', b'"max_tokens"', int_like),
            (b'"max_completion_tokens"', b'"max_completion_tokens"', int_like),
            (b'"n"', b'"\\u006e"', int_like),
            (b'"user"', b'"user"', string_like),
            (b'"usage"', b'"us\\u0061ge"', usage_value)):
        for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2]))):
            k = draw(st.sampled_from([name, name, escaped]))
            members.append((draw(ws), k, draw(ws), draw(ws), draw(value), draw(ws)))
    members += draw(st.lists(top_member(), max_size=3))
    members = draw(st.permutations(members))
    return draw(ws) + _object(members) + draw(ws)


NASTY = [b'"', b"\\", b"{", b"}", b"[", b"]", b",", b":", b"0", b"1", b"-", b"+", b"e", b".", b"\x00",
         b"\x1f", b"\x7f", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90", b"\xe2\x82", b" ", b"u", b"t",
         b"\\u", b"\\ud800", b"NaN", b"\xef\xbb\xbf"]


@st.composite
def mutated_document(draw):
    doc = bytearray(draw(st.one_of(json_document(), request_document())))
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(doc)))
        op = draw(st.integers(0, 3))
        if op == 0:
            del doc[i:]
        elif op == 1:
            del doc[i:i + draw(st.integers(1, 3))]
        elif op == 2:
            doc[i:i] = draw(st.sampled_from(NASTY))
        else:
            doc[i:i + 1] = draw(st.sampled_from(NASTY))
    return bytes(doc)


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------------------
# Realistic OpenAI bodies.

def chat_request(**extra):
    body = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer with \"model\": and stream: true."},
            {"role": "user", "content": "Explain {\"stream\": true, \"model\": \"evil\"} in JSON — ünïcödé 😀"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
             "function": {"name": "lookup", "arguments": "{\"model\":\"x\",\"stream\":true}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "{\"usage\": {\"prompt_tokens\": 9}}"},
        ],
        "temperature": 0.7, "top_p": 1.0, "presence_penalty": -0.5, "logit_bias": {"1234": -100},
        "tools": [{"type": "function", "function": {"name": "lookup", "description": "d" * 200,
                   "parameters": {"type": "object", "properties": {"model": {"type": "string"}},
                                  "required": ["model"]}}}],
    }
    body.update(extra)
    return body


REALISTIC_REQUESTS = [
    chat_request(),
    chat_request(stream=True),
    chat_request(stream=True, stream_options={"include_usage": True}, max_tokens=256, user="user-1"),
    chat_request(stream=False, stream_options={"include_usage": False}, max_completion_tokens=1024, n=3),
    chat_request(stream=None, stream_options=None, max_tokens=2**63, n=1.0, user=5),
    {"model": "text-embedding-3-small", "input": ["a", "b"], "encoding_format": "float"},
    {"model": "gpt-4.1", "input": "hi", "max_output_tokens": 64, "stream": True},
    {"model": "gpt-3.5-turbo-instruct", "prompt": "Say this is a test", "max_tokens": 7, "stream": True},
    {"model": "m\u00e9\u0000\n\"x\"\U0001f600", "messages": []},
]

REALISTIC_RESPONSES = [
    {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "{\"usage\": {\"prompt_tokens\": 1}}"},
         "finish_reason": "stop"}],
     "usage": {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29,
               "prompt_tokens_details": {"cached_tokens": 0}}},
    {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.0023, -0.0093, 1e-7]}],
     "model": "text-embedding-3-small", "usage": {"prompt_tokens": 8, "total_tokens": 8}},
    {"id": "resp_1", "object": "response", "output": [{"type": "message", "content": [
        {"type": "output_text", "text": "hi"}]}],
     "usage": {"input_tokens": 36, "output_tokens": 87, "total_tokens": 123,
               "output_tokens_details": {"reasoning_tokens": 0}}},
    {"id": "x", "choices": [], "usage": None},
    {"id": "x", "choices": []},
    {"error": {"message": "bad", "type": "invalid_request_error"}},
]


def _dumps_variants(obj):
    yield orjson.dumps(obj)
    yield json.dumps(obj).encode()                       # ", " and ": " separators
    yield json.dumps(obj, indent=2).encode()             # pretty, with newlines
    yield json.dumps(obj, ensure_ascii=False).encode()   # raw UTF-8
    yield b"\r\n " + json.dumps(obj, indent="\t").encode() + b"\n"


@pytest.mark.parametrize("obj", REALISTIC_REQUESTS)
def test_realistic_requests(obj):
    for body in _dumps_variants(obj):
        d = check_request(body)
        assert d == obj
        check_request(bytearray(body))


def test_realistic_request_fields():
    f = peek_request(orjson.dumps(REALISTIC_REQUESTS[2]))
    assert (f.model, f.stream, f.include_usage, f.max_tokens, f.user, f.has_n) == (
        "gpt-4o-mini", True, True, 256, "user-1", False)
    f = peek_request(orjson.dumps(REALISTIC_REQUESTS[3]))
    assert (f.stream, f.include_usage, f.max_tokens, f.n, f.has_n) == (False, False, 1024, 3, True)


@pytest.mark.parametrize("obj", REALISTIC_RESPONSES)
def test_realistic_responses(obj):
    for body in _dumps_variants(obj):
        check_usage(body)
        check_request(body)


def test_realistic_usage_values():
    got = [peek_usage(orjson.dumps(o)) for o in REALISTIC_RESPONSES]
    assert got == [(19, 10), (8, 0), (36, 87), (-1, -1), (-1, -1), (-1, -1)]


# --------------------------------------------------------------------------------------------------------
# Edge cases of validity, each compared with orjson.

EDGE = [
    b"{}", b" {} ", b"{ }", b"{}\x00", b"{}\x0c", b"\xef\xbb\xbf{}", b"", b" ", b"{", b"}", b"[]", b"1", b'"s"',
    b"null", b'{"a":1,}', b'{"a":1 "b":2}', b'{"a" 1}', b'{a:1}', b"{'a':1}", b'{"a":[1,]}', b'{"a":[,1]}',
    b'{"a":01}', b'{"a":-01}', b'{"a":-0}', b'{"a":-}', b'{"a":1.}', b'{"a":.1}', b'{"a":1e}', b'{"a":1e+}',
    b'{"a":1E+2}', b'{"a":NaN}', b'{"a":Infinity}', b'{"a":-Infinity}', b'{"a":tru}', b'{"a":nul}',
    b'{"a":true }', b'{"a":1e400}', b'{"a":-1e400}', b'{"a":1e-400}', b'{"a":1e308}', b'{"a":10e308}',
    b'{"a":0.1e309}', b'{"a":0.1e310}', b'{"a":0e99999999999999999999}', b'{"a":1e-99999999999999999999}',
    b'{"a":1e99999999999999999999}', b'{"a":1e18446744073709551616}', b'{"a":1e-18446744073709551617}',
    b'{"a":0.001e18446744073709551619}', b'{"a":1e9223372036854775808}',
    b'{"a":0.0000001e315}', b'{"a":0.0000001e316}', b'{"a":17976931348623158e292}',
    b'{"a":17976931348623159e292}', b'{"a":18446744073709551616}', b'{"a":-9223372036854775809}',
    b'{"a":' + b"1" * 400 + b"}", b'{"a":0.' + b"1" * 400 + b"}", b'{"a":' + b"1" + b"0" * 308 + b"}",
    b'{"a":' + b"1" + b"0" * 309 + b"}",
    b'{"a":' + str(2**1024 - 2**970).encode() + b"}",
    b'{"a":' + str(2**1024 - 2**970 - 1).encode() + b".99999999999999999999}",
    b'{"a":0.' + str(2**1024 - 2**970).encode() + b"e309}",
    b'{"a":0.000' + str(2**1024 - 2**970 - 1).encode() + b"9999e312}",
    b'{"a":"\\ud800"}', b'{"a":"\\udc00"}', b'{"a":"\\ud800\\udc00"}', b'{"a":"\\ud800\\u0041"}',
    b'{"a":"\\ud800x"}', b'{"a":"\\ud800\\xdc00"}', b'{"a":"\\ud800\\\\udc00"}', b'{"a":"\\ud800\\n"}', b'{"a":"\\uDBFF\\uDFFF"}', b'{"a":"\\u12"}', b'{"a":"\\u12G4"}', b'{"a":"\\U0041"}',
    b'{"a":"\\x41"}', b'{"a":"\\\'"}', b'{"a":"\\', b'{"a":"\xed\xa0\x80"}', b'{"a":"\xf4\x90\x80\x80"}',
    b'{"a":"\xc0\x80"}', b'{"a":"\xc1\xbf"}', b'{"a":"\xe0\x80\x80"}', b'{"a":"\xf0\x80\x80\x80"}',
    b'{"a":"\xf5\x80\x80\x80"}', b'{"a":"\x80"}', b'{"a":"\xc3"}', b'{"a":"\xef\xbf\xbf"}',
    b'{"a":"\xf4\x8f\xbf\xbf"}', b'{"a":"\x7f"}', b'{"a":"\x1f"}', b'{"a":"\t"}', b'{"a":"\x00"}',
    b'{"a":"\\u0000"}', b'{"\\u0000":1}', b'{"a":"abcdefghijklmnop\x01qrstuvwxyz"}',
    b'{"a":"abcdefghijklmnopqrstuvwxyz\\"abcdefghij"}', b'{"a":"abcdefg\xc3\xa9hijklmnopqrs"}',
    # tails shorter than the 16-byte wide skip, ASCII runs after a non-ASCII character
    b'{"a":"\xc3\xa9' + b"x" * 40 + b'"}', b'{"a":"\xc3\xa9' + b"x" * 15 + b'","b":1}',
    b'{"a":"\xc3\xa9' + b"x" * 16 + b'"}', b'{"a":"\xc3\xa9' + b"x" * 17 + b'\xc3"}',
    b'{"a":"' + b"x" * 9 + b'\xc3"}', b'{"a":"' + b"x" * 9 + b'\x01"}', b'{"a":"' + b"x" * 9 + b'\\u0041"}',
    b'{"a":"' + b"x" * 9 + b'"}', b'{"a":"' + b"x" * 9 + b'\xff"}', b'{"a":"' + b"x" * 9 + b'\\"x"}',
    b'{"model":"gpt"', b'{"model":"gpt"}}', b'{"model":"gpt"}]', b'{"model":"gpt"} x', b'{"model":"gpt"}{}',
    b'{"model":"gpt",}', b'{"model":}', b'{"model"}', b'{"model":"gpt" , "stream" : true }',
    b'{"a":[{"b":[{"c":{}}]}],"model":"m"}', b'{"a":[[]],"b":{"c":[1,{"d":null}]}}', b'{"a":[}', b'{"a":{]}',
    b'{"a":{"b":1,}}', b'{"a":{"b"}}', b'{"a":{1:2}}',
]


@pytest.mark.parametrize("body", EDGE)
def test_edge_cases(body):
    check_request(body)
    check_usage(body)


def test_truncations_of_realistic_bodies():
    for obj in REALISTIC_REQUESTS + REALISTIC_RESPONSES:
        body = json.dumps(obj, ensure_ascii=False, indent=1).encode()
        for i in range(len(body)):
            assert peek_request(body[:i]) is None
            assert peek_usage(body[:i]) == (-1, -1)
            assert peek_response(body[:i]) is None


def test_nesting_limit():
    # Within the limit jsonpeek agrees with orjson, however the nesting mixes arrays and objects.
    for d in (1, 2, NESTING_LIMIT - 1, NESTING_LIMIT):
        for body in (b'{"a":' + b"[" * (d - 1) + b"0" + b"]" * (d - 1) + b"}",
                     b'{"a":' * d + b"1" + b"}" * d,
                     b'{"model":"m","stream_options":' + b'{"a":' * (d - 1) + b"1" + b"}" * d):
            assert check_request(body) is not None
    # Deliberate divergence: orjson accepts deeper documents, peek_request does not.
    for body in (b'{"a":' + b"[" * NESTING_LIMIT + b"]" * NESTING_LIMIT + b"}",
                 b'{"a":' * (NESTING_LIMIT + 1) + b"1" + b"}" * (NESTING_LIMIT + 1),
                 b'{"stream_options":' + b'{"a":' * NESTING_LIMIT + b"1" + b"}" * (NESTING_LIMIT + 1),
                 b'{"usage":' + b'{"a":' * NESTING_LIMIT + b"1" + b"}" * (NESTING_LIMIT + 1)):
        assert orjson.loads(body) is not None
        assert peek_request(body) is None
    # peek_usage and peek_response match brackets with a counter: any depth, same result as orjson.
    for body in (b'{"a":' + b"[" * 20000 + b"]" * 20000 + b',"usage":{"prompt_tokens":3}}',
                 b'{"usage":{"x":' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b',"completion_tokens":4}}'):
        check_usage(body)
    assert peek_usage(b'{"a":' + b"[" * 20000 + b"]" * 20000 + b',"usage":{"prompt_tokens":3}}') == (3, 0)


def test_duplicate_keys_last_wins():
    body = (b'{"model":"a","stream":true,"stream_options":{"include_usage":true},"max_tokens":5,"n":2,'
            b'"user":"u","model":7,"stream":false,"stream_options":{"include_usage":true,"include_usage":false},'
            b'"max_tokens":6,"n":"x","user":"v"}')
    f = check_request(body) and peek_request(body)
    assert (f.model, f.stream, f.include_usage, f.max_tokens, f.has_n, f.n, f.user) == (
        None, False, False, 6, True, -1, "v")
    assert body[f.model_start:f.model_end] == b"7"
    body = b'{"usage":{"prompt_tokens":1},"usage":{"completion_tokens":2}}'
    assert peek_usage(body) == (0, 2)
    body = b'{"usage":{"prompt_tokens":1},"usage":null}'
    assert peek_usage(body) == (-1, -1)


def test_response_structure():
    # What broken upstreams send is refused: an empty, truncated, HTML or text body, another JSON value, bytes
    # after the object (truncations of real bodies: test_truncations_of_realistic_bodies).
    good = orjson.dumps(REALISTIC_RESPONSES[0])
    for body in (b"", b"  ", b"<html><body>502 Bad Gateway</body></html>", b"upstream connect error", b"[]",
                 b'[{"usage":{}}]', b'"ok"', b"null", b"1", good + b"}", good + b"{}", good + b" x", good[:-1],
                 b'{"a":1,}', b'{"a" 1}', b'{a:1}', b'{"a":}', b'{"a":[1,{]}', b'{"a":"\\"}', b"{\"a\":1}\x00"):
        assert peek_response(body) is None, body
        assert peek_response(bytearray(body)) is None
    assert peek_response(b" \r\n" + good + b"\n") == peek_usage(good) == (19, 10)
    # The scan is light (no more than peek_usage): scalars, string bytes and what nested containers hold are
    # not checked, so these invalid bodies pass; no upstream breaks that way (they truncate, or send a page).
    for body in (b'{"a":tru}', b'{"a":01}', b'{"a":"\xff"}', b'{"a":"\\x"}', b'{"a":[1 2]}', b'{"a":{b}}'):
        assert orjson_or_none(body) is None and peek_response(body) == (-1, -1), body


def test_nested_lookalikes_do_not_count():
    body = (b'{"messages":[{"model":"x","stream":true,"content":"\\"model\\": \\"y\\", \\"stream\\": true"}],'
            b'"meta":{"max_tokens":9,"usage":{"prompt_tokens":3}},"model":"real"}')
    f = check_request(body) and peek_request(body)
    assert (f.model, f.stream, f.max_tokens) == ("real", False, -1)
    assert peek_usage(body) == (-1, -1)


def test_usage_lookalikes_in_strings_and_nested_objects_are_not_taken():
    """A model's output (a string) may hold \"usage\":{...}; only the real top-level member counts."""
    content = json.dumps({"usage": {"prompt_tokens": 1, "completion_tokens": 2}})
    tricky = ['\\', '\\\\', '\\"', '"}', '"}]}', '{', '[[', '\\u0022']
    for tail in tricky:
        text = content + tail + content
        for real in (None, {"prompt_tokens": 7, "completion_tokens": 8}):
            obj = {"choices": [{"message": {"content": text}}], "meta": {"usage": {"prompt_tokens": 5}},
                   "content": text}
            if real is not None:
                obj["usage"] = real
            for body in _dumps_variants(obj):
                check_usage(body)
                assert peek_usage(body) == ((7, 8) if real else (-1, -1))
    # A key that is a string holding a quote, and a string value right before the real member.
    body = json.dumps({'a":{"usage":{"prompt_tokens":1}}': "\\", "usage": {"prompt_tokens": 2}}).encode()
    check_usage(body)
    assert peek_usage(body) == (2, 0)


def test_stop_byte_at_every_offset_of_long_strings():
    """Strings are skipped 32 (AVX2), 16 (SSE2), 8 and 1 bytes at a time: a byte that ends or breaks the
    plain run, at every offset and string length across those steps, is seen exactly where it is."""
    for n in (31, 32, 33, 47, 64, 65, 100):
        for i in range(n):
            for stop in (b'\\"', b"\\\\", b"\x01", b"\xc3\xa9", b"\xff", b'"', b"\\u0041"):
                text = b"a" * i + stop + b"b" * (n - i)
                for body in (b'{"model":"' + text + b'","usage":{"prompt_tokens":5}}',
                             b'{"x":["' + text + b'"],"usage":{"prompt_tokens":5}}'):
                    check_request(body)
                    check_usage(body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_usage_random_bytes_never_crash(body):
    check_usage(body)
    check_usage(b'{"usage":{"prompt_tokens":1,' + body)
    check_usage(b'{"a":"' + body + b'","usage":{"prompt_tokens":1}}')


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_usage_mutated_responses_never_crash(data):
    obj = data.draw(st.sampled_from(REALISTIC_RESPONSES))
    body = bytearray(json.dumps(obj, indent=data.draw(st.sampled_from([None, 1]))).encode())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(body) - 1))
        body[i] = data.draw(st.sampled_from(b'"\\{}[],:0 x\x00\xff'))
    check_usage(bytes(body))
    check_usage(body)


def test_rejects_other_types():
    for bad in ("{}", memoryview(b"{}"), None, 1):
        with pytest.raises(TypeError):
            peek_request(bad)
        with pytest.raises(TypeError):
            peek_usage(bad)


# --------------------------------------------------------------------------------------------------------
# Generated documents.

@SETTINGS
@given(json_document())
@example(b'{"model":"\\ud83d\\ude00\\u0000","stream":true}')
def test_generated_documents(body):
    check_request(body)
    check_usage(body)


@SETTINGS
@given(request_document())
def test_generated_requests(body):
    check_request(body)
    check_usage(body)


@SETTINGS
@given(mutated_document())
def test_mutated_documents(body):
    check_request(body)
    check_usage(body)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40).map(lambda b: b'{"model":"' + b + b'"}'))
def test_arbitrary_string_bytes(body):
    check_request(body)


@settings(max_examples=200, deadline=None)
@given(st.text("0123456789-+.eE", min_size=1, max_size=12).map(lambda t: b'{"max_tokens":' + t.encode() + b"}"))
def test_arbitrary_number_text(body):
    check_request(body)


# --------------------------------------------------------------------------------------------------------
# splice

INCLUDE_USAGE = b'{"include_usage":true}'


def rewrite(body, new_model):
    """What the gateway does: rewrite the model and force stream_options.include_usage."""
    f = peek_request(body)
    edits = []
    if f.model_start >= 0:
        edits.append((f.model_start, f.model_end, orjson.dumps(new_model)))
    if f.stream_options_start >= 0:
        edits.append((f.stream_options_start, f.stream_options_end, INCLUDE_USAGE))
    else:
        edits.append((f.object_end, f.object_end, b',"stream_options":' + INCLUDE_USAGE))
    edits.sort()
    return splice(body, edits)


@SETTINGS
@given(request_document(), st.text(max_size=10))
def test_splice_generated(body, new_model):
    d = orjson_or_none(body)
    if type(d) is not dict or "model" not in d:   # an empty object would need no leading comma
        return
    out = rewrite(body, new_model)
    d["model"] = new_model
    d["stream_options"] = {"include_usage": True}
    assert orjson.loads(out) == d
    check_request(out)


@pytest.mark.parametrize("obj", REALISTIC_REQUESTS)
def test_splice_realistic(obj):
    for body in _dumps_variants(obj):
        out = rewrite(body, "azure/gpt-4o")
        assert orjson.loads(out) == {**obj, "model": "azure/gpt-4o", "stream_options": {"include_usage": True}}
        f = peek_request(body)
        only_model = splice(body, [(f.model_start, f.model_end, b'"m2"')])
        assert orjson.loads(only_model) == {**obj, "model": "m2"}


def test_splice_plain():
    assert splice(b"abcdef", []) == b"abcdef"
    assert splice(b"abcdef", [(0, 0, b"X"), (2, 4, b""), (4, 4, b"YY"), (6, 6, b"Z")]) == b"XabYYefZ"
    assert splice(b"", [(0, 0, b"x")]) == b"x"
    rng = random.Random(7)
    for _ in range(300):
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(20)))
        cuts = sorted(rng.randrange(len(body) + 1) for _ in range(2 * rng.randrange(4)))
        edits = [(cuts[i], cuts[i + 1], bytes(rng.randrange(3) * [65 + i])) for i in range(0, len(cuts), 2)]
        expected, last = b"", 0
        for s, e, data in edits:
            expected += body[last:s] + data
            last = e
        assert splice(body, edits) == expected + body[last:]


@pytest.mark.parametrize("edits", [[(2, 1, b"")], [(0, 7, b"")], [(-1, 0, b"")], [(3, 4, b""), (2, 5, b"")],
                                   [(1, 3, b""), (2, 4, b"")]])
def test_splice_rejects_bad_edits(edits):
    with pytest.raises(ValueError):
        splice(b"abcdef", edits)


def test_splice_rejects_non_bytes_data():
    with pytest.raises(TypeError):
        splice(b"abc", [(0, 0, "x")])
