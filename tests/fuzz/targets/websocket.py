"""websocket: fastgw.protocol.websocket.FrameReader (the Realtime relay's frame reader) on any byte stream.

Oracle: the plain-Python reference of tests/core/test_websocket.py, built on the websockets package's own sans-IO
frame parser: the text messages found, the frames and messages counted, the close code and whether the stream is
refused must be the reference's, whole, in pieces and byte by byte. The reader does not police the masking
direction (the relay leaves a client's unmasked frame to the upstream to refuse): the reference takes each frame
as its mask bit says. The input's first byte picks the message size cap.
"""
from tests.core.test_websocket import NEEDLE, reference
from tests.fuzz.common import BYTEWISE_MAX, bytewise, pieces, select
from fastgw.protocol.websocket import FrameReader

CAPS = [16 * 1024 * 1024, 300, 40]


def feed(chunks, cap):
    r = FrameReader(NEEDLE, cap)
    found = []
    for c in chunks:
        got = r.feed(c)
        if got:
            found += got
    return found, r.frames, r.messages, r.close_code, r.error is not None


def one_input(data: bytes) -> None:
    cap, stream = select(data, CAPS)
    want = reference(stream, None, NEEDLE, cap)
    assert feed([stream], cap) == want
    assert feed(pieces(stream), cap) == want
    if len(stream) <= BYTEWISE_MAX:
        assert feed(bytewise(stream), cap) == want
