"""The compiled event splitter of translated streams (fastgw/providers/stream.pyx) against a plain-Python
reference of the WHATWG event-stream rules, on many bodies split at arbitrary points."""
import re

import pytest
from hypothesis import given, settings, strategies as st

from fastgw.errors import GatewayError
from fastgw.providers.stream import translated_stream


class Recorder:
    """A translator that records the events it is given and echoes them as blocks."""

    def __init__(self):
        self.seen = []
        self.prompt_tokens = self.completion_tokens = -1
        self.complete = False

    def event(self, name, data):
        self.seen.append((name, data))
        if name == "usage" and re.fullmatch(rb"\d+,\d+", data):
            self.prompt_tokens, self.completion_tokens = map(int, data.split(b","))
        if name == "end":
            self.complete = True
        return [b"<" + data + b">"]

    def finish(self):
        return [b"[end]"] if self.complete else []


def reference_events(body: bytes):
    """Events of a whole body by the spec: lines end in CRLF, LF or CR; a blank line dispatches; the data of an
    event without its blank line at the end of the body is discarded."""
    lines = re.split(rb"\r\n|\r|\n", body)
    lines.pop()          # the text after the last line end: not a complete line
    events, data, name = [], [], None
    for line in lines:
        if not line:
            if data:
                events.append((name, b"\n".join(data)))
            data, name = [], None
            continue
        field, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value.decode("utf-8", "replace")     # the stream is UTF-8 decoded, errors replaced
    return events


def run(body: bytes, cuts):
    rec = Recorder()
    s = translated_stream(rec)
    out, last = [], 0
    for c in sorted(set(cuts)) + [len(body)]:
        out.append(s.feed(body[last:c]))
        last = c
    try:
        out.append(s.finish())
    except GatewayError:
        pass
    return rec, s, b"".join(out)


_LINE = st.sampled_from([b"data: a", b"data:b", b"data", b"data: {\"x\": 1}", b"event: usage", b"event:end",
                         b": comment", b"id: 7", b"retry: 10", b"", b"data: 3,4", b"dat", b"data:  two spaces"])
_END = st.sampled_from([b"\n", b"\r\n", b"\r"])


@st.composite
def bodies(draw):
    parts = []
    for line in draw(st.lists(_LINE, max_size=30)):
        parts.append(line + draw(_END))
    body = b"".join(parts)
    cuts = draw(st.lists(st.integers(0, len(body)), max_size=10))
    return body, cuts


@settings(max_examples=600, deadline=None)
@given(bodies())
def test_events_match_the_reference_however_the_body_is_split(case):
    body, cuts = case
    rec, s, out = run(body, cuts)
    want = reference_events(body)
    # A CR at the very end of the body may still be waiting for its LF: it ends its line at finish().
    assert rec.seen == want
    assert s.events == len(want)
    if rec.complete:     # else finish() refused the stream: what it would have added is not sent
        assert out == b"".join(b"<" + d + b">" for _, d in want) + b"[end]"


def test_usage_and_completion_are_read_from_the_translator():
    rec, s, out = run(b"event: usage\ndata: 12,5\n\nevent: end\ndata: x\n\n", [3, 20])
    assert (s.usage_seen, s.prompt_tokens, s.completion_tokens, s.total_tokens) == (True, 12, 5, 17)
    assert s.done and out.endswith(b"[end]")


def test_a_stream_ending_before_its_end_event_is_an_upstream_error():
    s = translated_stream(Recorder())
    assert s.feed(b"data: a\n\n") == b"<a>"
    with pytest.raises(GatewayError) as e:
        s.finish()
    assert (e.value.status, e.value.code) == (502, "upstream_truncated")


def test_passthrough_forwards_the_bytes_unchanged_and_still_reads_them():
    rec = Recorder()
    s = translated_stream(rec, True)
    chunk = b"event: usage\ndata: 1,2\n\nevent: end\r\ndata: z\r\n\r\n"
    assert s.feed(chunk) is chunk
    assert s.finish() == b""
    assert rec.seen == [("usage", b"1,2"), ("end", b"z")] and s.prompt_tokens == 1


def test_a_bare_event_field_names_the_event_empty():
    # Found by fuzzing (tests/fuzz, translated_stream): a line "event" (no colon) is the field `event` with an
    # empty value (WHATWG), not ignored; an `event:` name is decoded with replacement, as the stream's text is.
    body = b"event: usage\nevent\ndata: 1,2\n\nevent:\xff\ndata: x\n\nevent: end\ndata: z\n\n"
    rec, s, out = run(body, [7, 13])
    assert rec.seen == reference_events(body) == [("", b"1,2"), ("\ufffd", b"x"), ("end", b"z")]
    assert s.prompt_tokens == -1 and out.endswith(b"[end]")
