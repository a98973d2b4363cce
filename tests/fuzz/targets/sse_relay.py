"""sse_relay: fastgw.protocol.sse.SSERelay on any upstream stream bytes, plain and in strip mode.

Oracle: the plain-Python twin of tests/core/test_sse.py (WHATWG line and event rules, json.loads per event):
the bytes forwarded (the very chunk objects in normal mode), the events counted, [DONE], the usage read and the
text collected must be the twin's, whole, in pieces and byte by byte.
"""
from tests.core.test_sse import run, twin
from tests.fuzz.common import BYTEWISE_MAX, bytewise, pieces


def one_input(data: bytes) -> None:
    for strip in (False, True):
        expected = twin(data, strip)
        assert run(data, [data] if data else [], strip) == expected
        assert run(data, [p for p in pieces(data) if p], strip) == expected
        if len(data) <= BYTEWISE_MAX:
            assert run(data, bytewise(data), strip) == expected
