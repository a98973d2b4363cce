"""translated_stream: the event splitter of translated streams (fastgw.providers.stream) on any bytes.

Oracle: the plain-Python WHATWG reference of tests/unit/test_translated_stream.py: the events handed to the
translator (name, data), the count, and the bytes sent on, whole, in pieces and byte by byte; in passthrough
mode every chunk is forwarded as it came.
"""
from fastgw.errors import GatewayError
from fastgw.providers.stream import translated_stream
from tests.fuzz.common import BYTEWISE_MAX, bytewise, pieces
from tests.unit.test_translated_stream import Recorder, reference_events


def feed(reads, passthrough=False):
    rec = Recorder()
    s = translated_stream(rec, passthrough)
    out = []
    for chunk in reads:
        got = s.feed(chunk)
        if passthrough:
            assert got is chunk
        out.append(got)
    try:
        out.append(s.finish())
        ended = True
    except GatewayError as exc:
        assert (exc.status, exc.code) == (502, "upstream_truncated")
        ended = False
    assert ended == rec.complete
    return rec.seen, s.events, b"".join(out), (s.usage_seen, s.prompt_tokens, s.completion_tokens), ended


def one_input(data: bytes) -> None:
    whole = feed([data])
    want = reference_events(data)
    assert whole[0] == want and whole[1] == len(want)
    if whole[4]:
        assert whole[2] == b"".join(b"<" + d + b">" for _, d in want) + b"[end]"
    assert feed(pieces(data)) == whole
    if len(data) <= BYTEWISE_MAX:
        assert feed(bytewise(data)) == whole
    seen, events, out, usage, ended = feed(pieces(data), passthrough=True)
    assert (seen, events, usage, ended) == (whole[0], whole[1], whole[3], whole[4]) and out == data
