"""fastgw.protocol.websocket.FrameReader against a plain-Python reference built on websockets' own sans-IO frame
parser (websockets.frames.Frame.parse), on generated streams.

The reference parses the whole stream frame by frame, reassembles messages with RFC 6455's continuation rules
(what websockets' Protocol checks) and keeps the text messages that contain the needle and fit max_message. The
reader must find the same messages, count the same frames and messages, see the same close code and refuse the
same streams, whether the stream is fed whole, byte by byte or in random pieces.
"""
import random
import struct

import pytest
from websockets.exceptions import ProtocolError
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from fastgw.protocol.websocket import FrameReader, accept_key, close_frame, valid_key

NEEDLE = b'"response.done"'

# --------------------------------------------------------------------------------------------- the reference


def reference(stream: bytes, masked: bool | None, needle: bytes, max_message: int):
    """(found messages, frames, messages, close code, error?) of a whole stream, by websockets' parser."""
    reader = StreamReader()
    reader.feed_data(stream)
    reader.feed_eof()
    found, frames, messages, close_code, error = [], 0, 0, -1, False
    msg_op, parts = None, []
    while reader.buffer:
        # masked None: each frame as its mask bit says (the reader does not police the direction)
        mask = masked if masked is not None else len(reader.buffer) > 1 and bool(reader.buffer[1] & 0x80)
        rest = bytes(reader.buffer)                 # this frame on (parse consumes what it reads)
        gen = Frame.parse(reader.read_exact, mask=mask)
        try:
            next(gen)
            raise AssertionError("the whole stream was fed: the parser cannot wait")
        except StopIteration as stop:
            frame = stop.value
        except EOFError:
            # A truncated last frame: nothing more completes. Its header alone may break RFC 6455's rules: a
            # reader that sees the header refuses it there (websockets checks a frame once it is whole).
            error = _header_refused(rest, msg_op is not None)
            break
        except (ProtocolError, ValueError):
            error = True
            break
        if frame.opcode in (Opcode.CLOSE, Opcode.PING, Opcode.PONG):
            frames += 1
            if frame.opcode is Opcode.CLOSE:
                close_code = struct.unpack("!H", frame.data[:2])[0] if len(frame.data) >= 2 else 1005
            continue
        if frame.opcode is Opcode.CONT:
            if msg_op is None:
                error = True
                break
        elif msg_op is not None:
            error = True
            break
        else:
            msg_op, parts = frame.opcode, []
        frames += 1
        parts.append(bytes(frame.data))
        if frame.fin:
            messages += 1
            msg = b"".join(parts)
            if msg_op is Opcode.TEXT and len(msg) <= max_message and needle in msg:
                found.append(msg)
            msg_op, parts = None, []
    return found, frames, messages, close_code, error


def _header_refused(rest: bytes, in_message: bool) -> bool:
    """Does the header at the start of `rest` (a frame the stream cuts short) break RFC 6455 section 5 in what
    it holds? The rules of its first two bytes as soon as both are there; the length's once it is complete."""
    if len(rest) < 2:
        return False
    b0, b1 = rest[0], rest[1]
    opcode, fin, length = b0 & 0x0F, b0 & 0x80, b1 & 0x7F
    if b0 & 0x70 or opcode in (3, 4, 5, 6, 7, 11, 12, 13, 14, 15) or (opcode >= 8 and not fin) or (
            opcode == 0 and not in_message) or (opcode in (1, 2) and in_message):
        return True
    if len(rest) < 2 + (2 if length == 126 else 8 if length == 127 else 0) + (4 if b1 & 0x80 else 0):
        return False
    if length == 126:
        length = int.from_bytes(rest[2:4], "big")
    elif length == 127:
        length = int.from_bytes(rest[2:10], "big")
    return length >> 63 != 0 or (opcode >= 8 and length > 125)


def run_reader(stream: bytes, cuts, needle: bytes, max_message: int):
    r = FrameReader(needle, max_message)
    found = []
    prev = 0
    for c in list(cuts) + [len(stream)]:
        got = r.feed(stream[prev:c])
        prev = c
        if got:
            found += got
    return found, r.frames, r.messages, r.close_code, r.error is not None, r


# --------------------------------------------------------------------------------------------- generated streams

SIZES = [0, 1, 2, 5, 40, 125, 126, 127, 300, 65535, 65536, 70001]


def _text(rng, size, with_needle):
    body = b'{"type":"response.done","response":{"usage":{"input_tokens":3}}}' if with_needle else b'{"type":"x"}'
    pad = bytes(rng.choice(b"abcdefghij \"{}:,") for _ in range(max(0, size - len(body))))
    return body + pad if rng.random() < 0.5 else pad + body


def _frame(opcode, data, fin, masked, rsv1=False):
    return Frame(opcode, data, fin, rsv1=rsv1).serialize(mask=masked)


def _raw_header(b0, length, masked):
    """A frame header built by hand (for frames websockets refuses to serialize)."""
    m = 0x80 if masked else 0
    if length < 126:
        h = bytes((b0, m | length))
    elif length < 65536:
        h = bytes((b0, m | 126)) + struct.pack("!H", length)
    else:
        h = bytes((b0, m | 127)) + struct.pack("!Q", length)
    return h + (b"\x01\x02\x03\x04" if masked else b"")


def gen_stream(rng: random.Random, masked: bool, broken: bool) -> bytes:
    out = []
    for _ in range(rng.randint(1, 6)):
        kind = rng.random()
        if kind < 0.2:
            op = rng.choice([Opcode.PING, Opcode.PONG])
            out.append(_frame(op, bytes(rng.randrange(256) for _ in range(rng.choice([0, 3, 125]))), True, masked))
            continue
        size = rng.choice(SIZES) if rng.random() < 0.7 else rng.randrange(0, 2000)
        if kind < 0.7:
            op, data = Opcode.TEXT, _text(rng, size, rng.random() < 0.6)
        else:
            op, data = Opcode.BINARY, bytes(rng.randrange(256) for _ in range(min(size, 3000))) * (
                1 if size <= 3000 else size // 3000)
        nfrag = rng.choice([1, 1, 2, 3, 5])
        cuts = sorted(rng.randrange(len(data) + 1) for _ in range(nfrag - 1))
        pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
        for i, piece in enumerate(pieces):
            out.append(_frame(op if i == 0 else Opcode.CONT, piece, i == len(pieces) - 1, masked))
            if i < len(pieces) - 1 and rng.random() < 0.3:   # a control frame between fragments is allowed
                out.append(_frame(Opcode.PING, b"hi", True, masked))
    if rng.random() < 0.3:
        code = rng.choice([1000, 1001, 4000])
        out.append(_frame(Opcode.CLOSE, struct.pack("!H", code) + b"bye", True, masked) if rng.random() < 0.8
                   else _frame(Opcode.CLOSE, b"", True, masked))
    if broken:
        bad = rng.choice(["rsv", "opcode", "cont", "nested", "ctl_long", "ctl_frag"])
        if bad == "rsv":
            b = _frame(Opcode.TEXT, b"x", True, masked)
            b = bytes((b[0] | 0x40,)) + b[1:]
        elif bad == "opcode":
            b = _raw_header(0x80 | rng.choice([3, 7, 11, 15]), 1, masked) + b"x"
        elif bad == "cont":
            b = _frame(Opcode.CONT, b"x", True, masked)
        elif bad == "nested":
            b = _frame(Opcode.TEXT, b"a", False, masked) + _frame(Opcode.BINARY, b"b", True, masked)
        elif bad == "ctl_long":
            b = _raw_header(0x89, 126, masked) + b"p" * 126
        else:
            b = _raw_header(0x09, 2, masked) + b"pp"
        out.insert(rng.randrange(len(out) + 1), b)
    return b"".join(out)


def _cuts(rng, n, how):
    if how == "whole" or n == 0:
        return []
    if how == "bytes":
        return list(range(1, n))
    return sorted(set(rng.randrange(1, n) for _ in range(rng.randint(1, 12)))) if n > 1 else []


@pytest.mark.parametrize("seed", range(400))
def test_reader_matches_websockets(seed):
    rng = random.Random(seed)
    masked = rng.random() < 0.5
    broken = rng.random() < 0.25
    max_message = rng.choice([16 * 1024 * 1024, 300, 70000])
    stream = gen_stream(rng, masked, broken)
    want = reference(stream, masked, NEEDLE, max_message)
    hows = ["whole", "pieces", "pieces"] + (["bytes"] if len(stream) < 3000 else [])
    for how in hows:
        got = run_reader(stream, _cuts(rng, len(stream), how), NEEDLE, max_message)
        assert got[:5] == want, (seed, how)


def test_truncated_stream_stops_mid_frame_and_resumes():
    msg = b'{"type":"response.done"}' * 10
    stream = _frame(Opcode.TEXT, msg, True, False)
    r = FrameReader(NEEDLE)
    assert r.feed(stream[:3]) is None and not r.at_boundary
    assert r.feed(stream[3:]) == [msg] and r.at_boundary


def test_a_cut_last_frame_is_not_counted():
    # Found by fuzzing: frames were counted at their header, so a stream cut inside its last frame counted one
    # frame more than it holds whole (the reference's count).
    stream = _frame(Opcode.TEXT, b"a", True, True) + _frame(Opcode.PONG, b"12345678", True, True)[:-3]
    r = FrameReader(NEEDLE)
    r.feed(stream)
    assert (r.frames, r.messages) == (1, 1) == reference(stream, True, NEEDLE, 1 << 24)[1:3]


def test_length_with_top_bit_set_is_refused():
    r = FrameReader(NEEDLE)
    r.feed(bytes((0x82, 127)) + struct.pack("!Q", 1 << 63))
    assert r.error and "most significant bit" in r.error
    assert r.feed(b"more") is None          # stopped: nothing after an error is read


def test_needle_none_keeps_every_text_message_but_not_binary():
    r = FrameReader(None)
    s = _frame(Opcode.TEXT, b"one", True, True) + _frame(Opcode.BINARY, b"two", True, True)
    assert r.feed(s) == [b"one"] and r.messages == 2


def test_close_frame_helper_is_read_back():
    for masked in (False, True):
        r = FrameReader(None)
        r.feed(close_frame(1001, "going away", masked))
        assert r.close_code == 1001 and r.frames == 1 and r.error is None
        reader = StreamReader()                 # websockets reads ours too
        reader.feed_data(close_frame(1001, "going away", masked))
        gen = Frame.parse(reader.read_exact, mask=masked)
        with pytest.raises(StopIteration) as stop:
            next(gen)
        assert stop.value.value.data[:2] == b"\x03\xe9"


def test_accept_key_is_rfc6455s_example():
    assert accept_key(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert valid_key(b"dGhlIHNhbXBsZSBub25jZQ==")
    assert not valid_key(b"short") and not valid_key(None) and not valid_key(b"!!!!")
