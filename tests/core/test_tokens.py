"""fastgw.tokens.estimate: the estimate against tiktoken on the corpus (documented tolerances), and
estimate_chat_tokens against a plain-Python walk of json.loads(body) applying estimate_text_tokens."""
import importlib.util
import json
import math
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastgw.tokens.estimate import estimate_chat_tokens, estimate_text_tokens
from fastgw.tokens.exact import count_chat, count_text

_spec = importlib.util.spec_from_file_location(
    "token_measure", os.path.join(os.path.dirname(__file__), "..", "data", "tokens", "measure.py"))
measure = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(measure)
SAMPLES = measure.load_samples()
ENCODINGS = measure.ENCODINGS

# class: (max |relative error| of any sample, max mean |relative error|) — docs/token-estimate.md
TOLERANCE = {
    "prose": (0.10, 0.04),
    "reference": (0.25, 0.07),
    "code": (0.30, 0.12),
    "json": (0.25, 0.10),
    "cjk": (0.30, 0.12),
    "mixed": (0.35, 0.15),
}


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("name", list(TOLERANCE))
def test_estimate_within_tolerance(name, encoding):
    worst, mean_bound = TOLERANCE[name]
    errors = measure.relative_errors(SAMPLES[name], encoding)
    assert max(abs(e) for e in errors) <= worst, errors
    assert sum(abs(e) for e in errors) / len(errors) <= mean_bound, errors


def test_text_basics():
    assert estimate_text_tokens(b"") == 0
    assert estimate_text_tokens(b"1234567") == 3  # digits go in groups of three, exactly
    assert estimate_text_tokens("hello") == estimate_text_tokens(b"hello") == 1
    assert estimate_text_tokens(b"\xff\xfe\x80") == 0  # invalid UTF-8 costs nothing and does not crash
    with pytest.raises(ValueError):
        estimate_text_tokens(b"x", "p50k_base")
    # the encodings differ where they should: CJK is cheaper in o200k_base
    cjk = "人工智能正在改变我们的生活方式。".encode()
    assert estimate_text_tokens(cjk, "o200k_base") < estimate_text_tokens(cjk, "cl100k_base")


def test_long_text_scales():
    text = " ".join(SAMPLES["prose"]).encode()
    for enc in ENCODINGS:
        exact = count_text(text.decode(), enc)
        assert abs(estimate_text_tokens(text, enc) - exact) / exact < 0.05


# ----------------------------------------------------------------------------- chat bodies: reference

TEXT_KEYS = {"content", "text", "role", "name", "arguments", "refusal", "output"}
TOP = {"messages": ("text", True), "input": ("tokens", True), "prompt": ("tokens", False),
       "instructions": ("text", False), "system": ("text", False)}


def reference_chat(body: bytes, encoding: str) -> int:
    obj = json.loads(body)
    if not isinstance(obj, dict):
        return 0
    acc = {"total": 0, "messages": 0}

    def walk(v, kind, msg_array=False, is_msg=False):
        if isinstance(v, str):
            if kind != "other":
                acc["total"] += estimate_text_tokens(v.encode("utf-8", "surrogatepass"), encoding)
        elif isinstance(v, bool) or v is None or isinstance(v, float):
            pass
        elif isinstance(v, int):
            if kind == "tokens" and v >= 0:
                acc["total"] += 1
        elif isinstance(v, list):
            for x in v:
                walk(x, kind, False, msg_array)
        elif isinstance(v, dict):
            if is_msg:
                acc["total"] += 3 + (1 if "name" in v else 0)
                acc["messages"] += 1
            for k, x in v.items():
                walk(x, "text" if k in TEXT_KEYS else "other")

    for key, (kind, msg_array) in TOP.items():
        if key in obj:
            walk(obj[key], kind, msg_array)
    return acc["total"] + (3 if acc["messages"] else 0)


TRICKY = ["\ud83d", "a\udc00b", "\u2028", "\\n", '"quoted"', "\\u0041", "日本語", "🙂👍🏽", "\x00\x1f", "é", "CamelCaseWord"]
text = st.one_of(st.text(max_size=40), st.sampled_from(TRICKY), st.text(alphabet="ab Z1,.\n\"\\", max_size=30))
part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": text}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": text})}),
    st.fixed_dictionaries({"type": st.just("input_text"), "text": text}),
)
tool_call = st.fixed_dictionaries({"id": text, "type": st.just("function"),
                                   "function": st.fixed_dictionaries({"name": text, "arguments": text})})
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "developer"]),
     "content": st.one_of(text, st.none(), st.lists(part, max_size=3))},
    optional={"name": text, "tool_calls": st.lists(tool_call, max_size=2), "tool_call_id": text, "output": text,
              "input": text, "system": text},
)
scalar = st.one_of(st.integers(-5, 10**12), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                   st.none(), text)
body = st.fixed_dictionaries(
    {"model": st.sampled_from(["gpt-4o-mini", "gpt-4", "text-embedding-3-small"])},
    optional={
        "messages": st.lists(message, max_size=5),
        "prompt": st.one_of(text, st.lists(text, max_size=3), st.lists(st.integers(-3, 200_000), max_size=6)),
        "input": st.one_of(text, st.lists(text, max_size=3), st.lists(st.lists(scalar, max_size=4), max_size=3),
                           st.lists(message, max_size=3)),
        "instructions": text,
        "system": st.one_of(text, st.lists(part, max_size=2)),
        "temperature": st.floats(0, 2),
        "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
            {"name": text, "description": text})}), max_size=2),
        "metadata": st.dictionaries(st.sampled_from(["content", "text", "note"]), text, max_size=3),
    },
)


def dumps(obj, style: int) -> bytes:
    if style == 0:
        s = json.dumps(obj)
    elif style == 1:
        s = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    else:
        s = json.dumps(obj, ensure_ascii=False, indent=2)
    return s.encode("utf-8", "surrogatepass")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body, st.integers(0, 2), st.sampled_from(ENCODINGS))
def test_chat_matches_reference(obj, style, encoding):
    raw = dumps(obj, style)
    assert estimate_chat_tokens(raw, encoding) == reference_chat(raw, encoding)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_chat_garbage_does_not_crash(raw):
    n = estimate_chat_tokens(raw)
    try:
        json.loads(raw)
    except ValueError:
        return  # the scan is lenient; -1 or a count are both acceptable for invalid JSON
    assert n == reference_chat(raw, "o200k_base")


def test_chat_examples():
    b = b'{"model":"gpt-4o","temperature":0.2,"messages":[{"role":"user","content":"Hello there"}]}'
    assert estimate_chat_tokens(b) == 3 + 1 + 2 + 3
    named = b'{"messages":[{"role":"user","name":"bob","content":"Hello there"}]}'
    assert estimate_chat_tokens(named) == 3 + 1 + 1 + 1 + 2 + 3
    # token-id prompts: one token per id; non-prompt keys are never priced
    assert estimate_chat_tokens(b'{"model":"x","prompt":[1,2,3,40000]}') == 4
    assert estimate_chat_tokens(b'{"model":"a long model name that is not counted"}') == 0
    # escapes decode before pricing
    assert estimate_chat_tokens(b'{"input":"caf\\u00e9 \\"x\\"\\n"}') == estimate_text_tokens('café "x"\n'.encode())
    for bad in (b'{"messages":[', b'{"input":"x"', b'{"input":"\\q"}', b'{"a":1} x', b""):
        assert estimate_chat_tokens(bad) == -1


def test_chat_close_to_exact():
    msgs = [{"role": "system", "content": SAMPLES["prose"][0]}] + [
        {"role": "user" if i % 2 else "assistant", "content": s} for i, s in enumerate(SAMPLES["prose"][1:8])]
    raw = json.dumps({"model": "gpt-4o-mini", "messages": msgs}).encode()
    exact = count_chat(msgs, "gpt-4o-mini")
    assert math.isclose(estimate_chat_tokens(raw, "o200k_base"), exact, rel_tol=0.05)


# ------------------------------------------------------------- the run model, byte at a time, in Python
# The compiled estimator works on 64-byte blocks of bit masks; this is the model it implements, written the
# plain way (a state machine over runs), so any difference at block edges, in carries or in UTF-8 handling shows.

PRICES = {  # hundredths of a token, as in tokens.pyx
    "cl100k_base": dict(camel=10, u2l=120, u2x=35, punc=90, punc_more=15, spaces=100, newlines=60, cjk=110,
                        hangul=125, other3=140, char4=200),
    "o200k_base": dict(camel=55, u2l=0, u2x=5, punc=85, punc_more=25, spaces=100, newlines=70, cjk=70,
                       hangul=65, other3=115, char4=200),
}
WORD = [0, 100, 100, 100, 100, 100, 100, 105, 110, 110, 110, 125, 145, 150, 160, 220, 260]


def byte_class(c: int) -> str:
    if 97 <= c <= 122:
        return "lower"
    if 65 <= c <= 90:
        return "upper"
    if 48 <= c <= 57:
        return "digit"
    if c in (32, 9):
        return "space"
    if c in (10, 13):
        return "nl"
    if c < 128:
        return "punct"
    if c < 0xC0 or c in (0xC0, 0xC1) or c > 0xF4:
        return "skip"        # continuation and invalid bytes: transparent
    if c == 0xC2:
        return "punct"
    if c <= 0xC9:
        return "u2l"
    if c <= 0xDF:
        return "u2x"
    if 0xE3 <= c <= 0xE9:
        return "cjk"
    if 0xEA <= c <= 0xED:
        return "hangul"
    if c <= 0xEF:
        return "other3"
    return "char4"


def reference_text(b: bytes, encoding: str) -> int:
    P = PRICES[encoding]
    total = 0
    run, length, extra, newlines, prev_lower = None, 0, 0, 0, False

    def close():
        nonlocal total
        if run == "word":
            total += (WORD[length] if length < 17 else 20 * length) + extra
        elif run == "digit":
            total += (length + 2) // 3 * 100
        elif run == "ws":
            total += P["newlines"] if newlines else (P["spaces"] if length > 1 else 0)
        elif run == "punct":
            total += P["punc"] + (length - 1) * P["punc_more"]

    for c in b:
        k = byte_class(c)
        if k == "skip":
            continue
        kind = {"lower": "word", "upper": "word", "u2l": "word", "u2x": "word", "digit": "digit", "space": "ws",
                "nl": "ws", "punct": "punct"}.get(k)
        if kind != run:
            close()
            run, length, extra, newlines, prev_lower = kind, 0, 0, 0, False
        if kind is None:              # a character priced alone
            total += P[k]
            continue
        length += 1
        if k == "lower":
            prev_lower = True
        elif k == "upper":
            extra += P["camel"] if prev_lower else 0
            prev_lower = False
        elif k in ("u2l", "u2x"):
            extra += P[k]
        elif k == "nl":
            newlines += 1
    close()
    return (total + 50) // 100


# Pieces that make runs of every kind long enough to cross 64-byte blocks.
PIECES = ["a", "Z", "camelCase", "x" * 20, "supercalifragilistic", "7", "1234567890" * 3, " ", "  ", "\t", "\n",
          " \n  ", "   \n\n ", ".", ",", "!?", "'\"\\", "é", "Ünïcödé", "привет", "日本語", "한국어", "—", "…", "🙂",
          "°", "\x00", "\x7f"]
texts = st.one_of(st.text(max_size=300), st.lists(st.sampled_from(PIECES), max_size=120).map("".join))


@settings(max_examples=300, deadline=None)
@given(texts, st.sampled_from(ENCODINGS))
def test_text_matches_run_model(s, encoding):
    b = s.encode("utf-8", "surrogatepass")
    assert estimate_text_tokens(b, encoding) == reference_text(b, encoding)


@pytest.mark.parametrize("variant", ["generic", "popcnt", "avx2", "avx512"])
def test_every_code_variant(variant):
    # The block pricer is compiled three times (baseline x86-64, +POPCNT, +AVX2) and picked by CPU at import;
    # each must give the model's figures, the ones this CPU does not run included when it can.
    from fastgw.tokens import estimate as tokens
    if not tokens._use_variant(variant):
        pytest.skip(f"this CPU has no {variant}")
    try:
        samples = [s.encode() for group in SAMPLES.values() for s in group]
        samples += [("".join(PIECES) * 3).encode(), b"\xff\x80abc\xc3", "x" * 200 + "1" * 70 + " " * 65 + "\n" * 3]
        for b in samples:
            b = b if isinstance(b, bytes) else b.encode()
            for enc in ENCODINGS:
                assert estimate_text_tokens(b, enc) == reference_text(b, enc)
        # JSON strings with escapes: their plain text is copied while the next '"' or '\' is looked for, in
        # lanes of 16 or 64 bytes; an escape or the closing quote at every offset of a lane, and truncations.
        for off in range(0, 140):
            text = "w" * off + "\n" + "x y" * (off % 7) + '"' + "z" * (off % 70)
            raw = json.dumps({"prompt": text}).encode()
            assert estimate_chat_tokens(raw) == reference_text(text.encode(), "o200k_base"), off
            assert estimate_chat_tokens(raw[:len(raw) - 2]) == -1, off    # no closing quote
    finally:
        tokens._best_variant()


def test_words_of_every_length_at_every_block_offset():
    # A long word is priced where it ends, from its length: words that cross one or more 64-byte blocks, end
    # exactly at a block's end, or end the text (in a whole block, in a short last one, in a JSON string).
    for length in (1, 6, 7, 8, 16, 17, 18, 63, 64, 65, 127, 128, 129, 200):
        for offset in range(0, 70):
            for after in ("", " ", "é", "1"):
                text = ("." * offset + "w" * length + after).encode()
                for enc in ENCODINGS:
                    assert estimate_text_tokens(text, enc) == reference_text(text, enc), (length, offset, after)
            raw = b'{"prompt":"' + b"." * offset + b"w" * length + b'"}'
            assert estimate_chat_tokens(raw) == reference_text(b"." * offset + b"w" * length, "o200k_base")


def test_long_strings_with_escapes_across_the_decode_buffer():
    # A string with escapes is decoded into a 4 KB buffer and priced in pieces: escapes (1 to 4 decoded bytes)
    # and plain text landing on either side of a piece's end must not change the estimate.
    base = "Lighthouses marked harbours; keepers logged every ship. " * 200      # 11.2 KB
    for at in range(4086, 4100):
        for esc, ch in (("\\n", "\n"), ("\\u00e9", "é"), ("\\u65e5", "日"), ("\\ud83d\\ude42", "🙂")):
            text = base[:at] + ch + base[at:8190] + ch + base[8190:]
            raw = ('{"messages":[{"role":"user","content":"' + base[:at] + esc + base[at:8190] + esc + base[8190:]
                   + '"}]}').encode()
            assert estimate_chat_tokens(raw) == estimate_text_tokens(text.encode()) + 3 + 1 + 3, (at, esc)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(ENCODINGS))
def test_bytes_match_run_model(b, encoding):
    # stray continuation bytes, truncated and invalid sequences included
    assert estimate_text_tokens(b, encoding) == reference_text(b, encoding)


@settings(max_examples=200, deadline=None)
@given(texts, st.lists(st.integers(0, 400), max_size=12))
def test_string_split_by_escapes(s, cuts):
    # In a JSON string, escapes cut the text into pieces fed one after another: escaping any characters,
    # anywhere (here as \\uXXXX), must not change the estimate.
    cut = set(cuts)
    parts = []
    for i, ch in enumerate(s):
        if i in cut and ord(ch) < 0x10000:
            parts.append("\\u%04x" % ord(ch))
        else:
            parts.append(json.dumps(ch, ensure_ascii=False)[1:-1])
    raw = ('{"prompt":"' + "".join(parts) + '"}').encode("utf-8", "surrogatepass")
    assert estimate_chat_tokens(raw) == estimate_text_tokens(s.encode("utf-8", "surrogatepass"))
