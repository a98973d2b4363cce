# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""WebSocket frames (RFC 6455) read as they pass through a relay: sans-IO, nothing re-framed.

The Realtime relay (fastgw/proxy/realtime.pyx) forwards each side's bytes as they come and feeds the same bytes
to a FrameReader, which follows the frame boundaries across reads (a header split anywhere, continuation frames,
control frames between fragments) and hands back the complete text messages that contain its `needle` (the
relay's b'"response.done"'), unmasked and reassembled. It also tells whether the stream stands at a frame
boundary (`at_boundary`: the relay may insert a close frame of its own there) and the code of a close frame.

Compiled because it sees every relayed byte. It copies only the text messages it keeps (at most `max_message`
bytes each); binary payloads and oversized messages are skipped in place. What it checks is what websockets
checks (no extension is ever negotiated through the gateway): reserved bits clear, a known opcode, control
frames final and at most 125 bytes, continuation frames only inside a fragmented message, no new data frame
inside one, a 64-bit length with its top bit clear. A violation stops the reader (`error` says which); the relay
then ends the session. tests/core/test_websocket.py runs it against websockets' own parser on generated streams.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy

import base64
import hashlib
import os
import struct

cdef enum:
    OP_CONT = 0
    OP_TEXT = 1
    OP_BINARY = 2
    OP_CLOSE = 8
    OP_PING = 9
    OP_PONG = 10

# A kept message buffer that grew past this is freed when its message ends (an idle session stays small).
cdef Py_ssize_t _KEEP_AT_MOST = 64 * 1024
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


cdef class FrameReader:
    """One direction of a WebSocket connection. feed(data) -> the text messages completed by `data` that
    contain `needle` (all of them when needle is None), or None."""

    cdef unsigned char hdr[14]
    cdef int hlen                     # header bytes gathered for the frame being read
    cdef int hneed                    # its header length (2 until the second byte tells)
    cdef bint in_payload
    cdef unsigned long long rem       # payload bytes of this frame still to come
    cdef unsigned long long mpos      # payload bytes of this frame already read (the mask's phase)
    cdef int opcode
    cdef bint fin, masked
    cdef unsigned char mask[4]
    cdef int msg_op                   # opcode of the data message in progress (0: none)
    cdef bint collect                 # the message in progress is kept (a text message within max_message)
    cdef char* mbuf
    cdef Py_ssize_t mlen, mcap
    cdef unsigned char ctl[125]       # the payload of the control frame being read
    cdef int ctl_len
    cdef readonly Py_ssize_t max_message
    cdef readonly bytes needle
    cdef readonly long long frames, messages, skipped
    cdef readonly int close_code      # -1: no close frame yet; 1005: a close frame without a code
    cdef readonly str error
    cdef list found                   # what the current feed() found

    def __cinit__(self, bytes needle=None, Py_ssize_t max_message=16 * 1024 * 1024):
        self.needle = needle
        self.max_message = max_message
        self.hneed = 2
        self.close_code = -1

    def __dealloc__(self):
        free(self.mbuf)

    @property
    def at_boundary(self):
        """No frame is partly read: a whole frame of our own may be written here."""
        return not self.in_payload and self.hlen == 0

    cdef int _fail(self, str why):
        self.error = why
        return -1

    cpdef list feed(self, bytes data):
        """Read `data` (bytes) as the next bytes of the stream."""
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data), i = 0, take
        self.found = None
        if self.error is not None:
            return None
        while i < n:
            if not self.in_payload:
                while self.hlen < self.hneed and i < n:
                    self.hdr[self.hlen] = p[i]
                    self.hlen += 1
                    i += 1
                    if self.hlen == 2:
                        if self._check_first() < 0:
                            break
                        take = self.hdr[1] & 0x7F
                        self.hneed = 2 + (2 if take == 126 else 8 if take == 127 else 0) + (
                            4 if self.hdr[1] & 0x80 else 0)
                if self.error is not None or self.hlen < self.hneed:
                    break
                if self._start_frame() < 0:
                    break
                if self.rem == 0:
                    self._end_frame()
                continue
            take = n - i
            if <unsigned long long>take > self.rem:
                take = <Py_ssize_t>self.rem
            self._payload(p + i, take)
            i += take
            self.rem -= take
            self.mpos += take
            if self.rem == 0:
                self._end_frame()
        out = self.found
        self.found = None
        return out

    cdef int _check_first(self) except -2:
        """The rules the header's first two bytes decide, checked as soon as they are read."""
        cdef unsigned char b0 = self.hdr[0]
        cdef int op = b0 & 0x0F
        if b0 & 0x70:
            return self._fail("reserved bits must be 0")
        if op >= OP_CLOSE:
            if op > OP_PONG:
                return self._fail(f"invalid opcode {op}")
            if not b0 & 0x80:
                return self._fail("fragmented control frame")
        elif op == OP_CONT:
            if self.msg_op == 0:
                return self._fail("unexpected continuation frame")
        elif op <= OP_BINARY:
            if self.msg_op != 0:
                return self._fail(f"expected a continuation frame, got opcode {op}")
        else:
            return self._fail(f"invalid opcode {op}")
        return 0

    cdef int _start_frame(self) except -2:
        """The whole header is in (its first two bytes passed _check_first): the frame begins."""
        cdef unsigned char b0 = self.hdr[0], b1 = self.hdr[1]
        cdef unsigned long long length = b1 & 0x7F
        cdef int k, m = 2
        self.opcode = b0 & 0x0F
        self.fin = (b0 & 0x80) != 0
        self.masked = (b1 & 0x80) != 0
        if length == 126:
            length = (<unsigned long long>self.hdr[2] << 8) | self.hdr[3]
            m = 4
        elif length == 127:
            length = 0
            for k in range(8):
                length = (length << 8) | self.hdr[2 + k]
            if length >> 63:
                return self._fail("the payload length's most significant bit must be 0")
            m = 10
        if self.masked:
            for k in range(4):
                self.mask[k] = self.hdr[m + k]
        if self.opcode >= OP_CLOSE:
            if length > 125:
                return self._fail("control frame too long")
            self.ctl_len = 0
        elif self.opcode != OP_CONT:
            self.msg_op = self.opcode
            self.collect = self.opcode == OP_TEXT
            self.mlen = 0
        self.rem = length
        self.mpos = 0
        self.in_payload = True
        return 0

    cdef void _payload(self, const unsigned char* src, Py_ssize_t n) noexcept:
        cdef unsigned char* dst
        cdef Py_ssize_t j, need
        if self.opcode >= OP_CLOSE:
            dst = self.ctl + self.ctl_len
            self.ctl_len += <int>n
        elif self.collect:
            need = self.mlen + n
            if need > self.max_message:
                self.collect = False          # too large to be the event we look for: skipped, not kept
                self.skipped += 1
                return
            if need > self.mcap:
                if not self._grow(need):
                    self.collect = False
                    self.skipped += 1
                    return
            dst = <unsigned char*>self.mbuf + self.mlen
            self.mlen = need
        else:
            return
        if self.masked:
            for j in range(n):
                dst[j] = src[j] ^ self.mask[(self.mpos + j) & 3]
        else:
            memcpy(dst, src, n)

    cdef bint _grow(self, Py_ssize_t need) noexcept:
        cdef Py_ssize_t c = self.mcap * 2
        if c < need:
            c = need
        if c < 4096:
            c = 4096
        cdef char* q = <char*>realloc(self.mbuf, c)
        if q == NULL:
            return False
        self.mbuf = q
        self.mcap = c
        return True

    cdef void _end_frame(self) except *:
        cdef bytes msg
        self.in_payload = False
        self.hlen = 0
        self.hneed = 2
        self.frames += 1                      # frames read whole (a cut last one is not counted)
        if self.opcode >= OP_CLOSE:
            if self.opcode == OP_CLOSE:
                self.close_code = (self.ctl[0] << 8 | self.ctl[1]) if self.ctl_len >= 2 else 1005
            return
        if not self.fin:
            return
        self.messages += 1
        if self.collect:
            msg = PyBytes_FromStringAndSize(self.mbuf, self.mlen)
            if self.needle is None or msg.find(self.needle) >= 0:
                if self.found is None:
                    self.found = [msg]
                else:
                    self.found.append(msg)
        self.msg_op = 0
        self.collect = False
        self.mlen = 0
        if self.mcap > _KEEP_AT_MOST:
            free(self.mbuf)
            self.mbuf = NULL
            self.mcap = 0


def accept_key(bytes key):
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.strip() + _GUID).digest())


def valid_key(key):
    """A Sec-WebSocket-Key is the base64 of 16 bytes."""
    if key is None:
        return False
    try:
        return len(base64.b64decode(key.strip(), validate=True)) == 16
    except ValueError:
        return False


def new_key():
    return base64.b64encode(os.urandom(16))


def close_frame(int code, str reason="", bint masked=False):
    """A close frame with `code` and `reason` (masked: as a client sends it)."""
    payload = struct.pack("!H", code) + reason.encode()[:123]
    if not masked:
        return bytes((0x88, len(payload))) + payload
    mask = os.urandom(4)
    return bytes((0x88, 0x80 | len(payload))) + mask + bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
