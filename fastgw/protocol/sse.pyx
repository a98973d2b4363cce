# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Relay of a streaming (text/event-stream) upstream body: forward it, and learn from it on the way.

Per upstream chunk, `SSERelay.feed(chunk)` returns what to forward to the client and keeps count of
events, `data: [DONE]`, the last non-null `usage` object (Chat Completions `prompt_tokens`/
`completion_tokens`/`total_tokens`, Responses API `input_tokens`/`output_tokens`, also when nested in
`response.usage`) and optionally the generated text.

Cost per chunk is linear in the chunk and independent of what streamed before: the only state kept is the
current partial line and the current event's data (C buffers). Events are parsed when their blank line
arrives: a memmem for `"usage"` decides whether the event can carry usage at all (`"usage":null` cannot);
only then, or when text is collected, the event is checked to be JSON (as Python's json.loads reads it, see
jsonskip.json_valid: nothing is read from an event that is not) and walked by a minimal scanner of its
top-level object (strings skipped with their escapes, so `"usage"` inside content text is never mistaken for
a key).

Line and event rules are the WHATWG event-stream ones: a line ends with CRLF, LF or CR; an empty line ends an
event; `data` lines (`data:value`, `data: value` or a bare `data`) are joined with LF; other fields and
`:` comments pass through untouched. A block without a data line is not an event (it is not counted). An
incomplete event at the end of the body is discarded as in the spec (but its bytes are still forwarded).

Text is collected only until an event shows `"usage": null` (`usage_promised`): an upstream that honours
stream_options.include_usage sends it on every chunk and the real usage at the end, so the text (a fallback
for upstreams that send no usage) is not needed, and walking every event for it would cost more than the
rest of the relay.

Normal mode never holds bytes back: feed() returns the very `chunk` object it was given. With
strip_usage_chunk=True (the gateway asked for `stream_options.include_usage` on its own behalf), the event
carrying a non-null top-level `usage` and `"choices": []` is removed: to decide, the bytes of an event still
incomplete at the end of a chunk are held back until its blank line comes. Everything else is forwarded
byte-identical and in order.
"""
from libc.stdlib cimport free, realloc
from libc.string cimport memchr, memcmp, memcpy
from fastgw.protocol.jsonskip cimport json_valid, skip_string, skip_value, skip_ws
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE

import json
import re

import orjson

cdef enum:
    USAGE_NULL = 1
    USAGE_VALUE = 2

_JSON_STRING = re.compile(b'"(?:[^"\\\\]|\\\\.)*"', re.S)  # one JSON string token

cdef extern from "string.h":
    void* memmem(const void* haystack, size_t hlen, const void* needle, size_t nlen) nogil

# An event's data larger than this is relayed but not parsed (nothing real comes close); in strip mode an
# event larger than this is no longer held back (so it cannot be stripped either).
cdef enum:
    MAX_EVENT = 8 * 1024 * 1024
# Text collected (collect_text) up to this many bytes of JSON strings, far beyond any model's output: a stream that
# goes on and on costs neither memory nor, when its tokens are counted at the end, seconds of the worker's CPU.
# What comes after is only measured (text_skipped).
cdef enum:
    MAX_TEXT = 4 * 1024 * 1024
MAX_TEXT_BYTES = MAX_TEXT

# ---------------------------------------------------------------------------------------------- buffers

cdef int buf_reserve(Buf* b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t need = b.len + extra
    cdef Py_ssize_t cap
    cdef unsigned char* p
    if need <= b.cap:
        return 0
    cap = b.cap * 2
    if cap < need:
        cap = need
    if cap < 256:
        cap = 256
    p = <unsigned char*>realloc(b.data, cap)
    if p == NULL:
        raise MemoryError()
    b.data = p
    b.cap = cap
    return 0


cdef inline int buf_add(Buf* b, const unsigned char* p, Py_ssize_t n) except -1:
    if n <= 0:
        return 0
    if b.len + n > b.cap:
        buf_reserve(b, n)
    memcpy(b.data + b.len, p, n)
    b.len += n
    return 0


cdef inline int buf_byte(Buf* b, unsigned char c) except -1:
    if b.len + 1 > b.cap:
        buf_reserve(b, 1)
    b.data[b.len] = c
    b.len += 1
    return 0


cdef inline void buf_free(Buf* b) noexcept:
    free(b.data)
    b.data = NULL
    b.len = b.cap = 0

# ----------------------------------------------------------------------------- minimal JSON scanning
# (skip_ws, skip_string, skip_value: fastgw/protocol/jsonskip.pxd)

cdef Py_ssize_t obj_find(const unsigned char* d, Py_ssize_t s, Py_ssize_t e, const char* key,
                         Py_ssize_t klen, Py_ssize_t* vend) noexcept nogil:
    """Start of the value of member `key` of the object d[s:e] (the last one, as json.loads keeps), or -1."""
    cdef Py_ssize_t i = skip_ws(d, s + 1, e)
    cdef Py_ssize_t ks, ke, vs, found = -1
    if i < e and d[i] == 125:
        return -1
    while i < e:
        if d[i] != 34:
            return -1
        ks = i + 1
        i = skip_string(d, i, e)
        if i < 0:
            return -1
        ke = i - 1
        i = skip_ws(d, i, e)
        if i >= e or d[i] != 58:
            return -1
        vs = skip_ws(d, i + 1, e)
        i = skip_value(d, vs, e)
        if i < 0:
            return -1
        if ke - ks == klen and memcmp(d + ks, key, klen) == 0:
            found = vs
            vend[0] = i
        i = skip_ws(d, i, e)
        if i < e and d[i] == 44:
            i = skip_ws(d, i + 1, e)
            continue
        break
    return found


cdef long long parse_count(const unsigned char* d, Py_ssize_t s, Py_ssize_t e) noexcept nogil:
    """A non-negative JSON integer d[s:e] (below 10**18), else -1 (null, float, negative, string...)."""
    cdef long long v = 0
    if s >= e or e - s > 18:
        return -1
    while s < e:
        if d[s] < 48 or d[s] > 57:
            return -1
        v = v * 10 + (d[s] - 48)
        s += 1
    return v


cdef struct Top:
    Py_ssize_t usage_s, usage_e        # top-level "usage" when it is an object
    Py_ssize_t resp_s, resp_e          # top-level "response" when it is an object (Responses API)
    Py_ssize_t choices_s, choices_e    # top-level "choices" when it is an array
    Py_ssize_t type_s, type_e          # top-level "type" string body
    Py_ssize_t delta_s, delta_e        # top-level "delta" string body (Responses API text delta)


cdef int scan_top(const unsigned char* d, Py_ssize_t n, Top* t) noexcept nogil:
    """Record the interesting members of the event's top-level object; -1 if it is not one JSON object."""
    cdef Py_ssize_t i, ks, ke, vs, ve, kl
    t.usage_s = t.resp_s = t.choices_s = t.type_s = t.delta_s = -1
    t.usage_e = t.resp_e = t.choices_e = t.type_e = t.delta_e = 0
    i = skip_ws(d, 0, n)
    if i >= n or d[i] != 123:
        return -1
    i = skip_ws(d, i + 1, n)
    if i < n and d[i] == 125:
        return 0 if skip_ws(d, i + 1, n) == n else -1
    while True:
        if i >= n or d[i] != 34:
            return -1
        ks = i + 1
        i = skip_string(d, i, n)
        if i < 0:
            return -1
        ke = i - 1
        kl = ke - ks
        i = skip_ws(d, i, n)
        if i >= n or d[i] != 58:
            return -1
        vs = skip_ws(d, i + 1, n)
        ve = skip_value(d, vs, n)
        if ve < 0 or ve == vs:
            return -1
        if kl == 5 and memcmp(d + ks, b"usage", 5) == 0:
            t.usage_s = vs if d[vs] == 123 else -1
            t.usage_e = ve
        elif kl == 7 and memcmp(d + ks, b"choices", 7) == 0:
            t.choices_s = vs if d[vs] == 91 else -1
            t.choices_e = ve
        elif kl == 8 and memcmp(d + ks, b"response", 8) == 0:
            t.resp_s = vs if d[vs] == 123 else -1
            t.resp_e = ve
        elif kl == 4 and memcmp(d + ks, b"type", 4) == 0:
            t.type_s = vs + 1 if d[vs] == 34 else -1
            t.type_e = ve - 1
        elif kl == 5 and memcmp(d + ks, b"delta", 5) == 0:
            t.delta_s = vs + 1 if d[vs] == 34 else -1
            t.delta_e = ve - 1
        i = skip_ws(d, ve, n)
        if i < n and d[i] == 44:
            i = skip_ws(d, i + 1, n)
            continue
        if i < n and d[i] == 125:
            return 0 if skip_ws(d, i + 1, n) == n else -1
        return -1


cdef int usage_values(const unsigned char* d, Py_ssize_t n) noexcept nogil:
    """What follows the `"usage":` keys in d: USAGE_NULL when one is `null` (the stream promises its usage for
    the end), USAGE_VALUE when one is something else (this event may carry usage); 0 when there is none. A
    match inside a string cannot be a key, and is told apart later by scan_top."""
    cdef const unsigned char* q
    cdef Py_ssize_t i = 0, j
    cdef int found = 0
    while i < n:
        q = <const unsigned char*>memmem(d + i, n - i, b'"usage"', 7)
        if q == NULL:
            break
        j = skip_ws(d, (q - d) + 7, n)
        if j < n and d[j] == 58:
            j = skip_ws(d, j + 1, n)
            found |= USAGE_NULL if n - j >= 4 and memcmp(d + j, b"null", 4) == 0 else USAGE_VALUE
        i = (q - d) + 6     # the closing quote may open the next one: "usage"usage": null
    return found

# ---------------------------------------------------------------------------------------------- relay

cdef class SSERelay:
    """Relay one upstream event stream; see the module docstring.

    SSERelay(strip_usage_chunk=False, collect_text=False)
      feed(chunk: bytes) -> bytes   what to forward now (`chunk` itself unless something is held or stripped)
      finish() -> bytes             at the end of the upstream body: the bytes still held back (strip mode)
      text() -> str                 collected choices[].delta.content / response.output_text.delta text (the first
                                    MAX_TEXT bytes; text_skipped: the bytes of text past them)
      events, done, usage_seen, prompt_tokens, completion_tokens, total_tokens (-1 when unknown)
    """

    def __cinit__(self, bint strip_usage_chunk=False, bint collect_text=False):
        self.strip_usage_chunk = strip_usage_chunk
        self.collect_text = collect_text
        self.prompt_tokens = self.completion_tokens = self.total_tokens = -1

    def __dealloc__(self):
        buf_free(&self.line)
        buf_free(&self.ev)
        buf_free(&self.hold)
        buf_free(&self.out)
        buf_free(&self.txt)

    cpdef object feed(self, object chunk):
        cdef const unsigned char* s
        cdef const unsigned char* p
        cdef const unsigned char* nl
        cdef const unsigned char* cr
        cdef const unsigned char* lim
        cdef const unsigned char* eol
        cdef Py_ssize_t n, pos, after, fwd = 0, ev_start
        cdef int term
        cdef bint strip = self.strip_usage_chunk, drop, blank
        if not PyBytes_CheckExact(chunk):
            chunk = bytes(chunk)
        s = <const unsigned char*>PyBytes_AS_STRING(chunk)
        n = PyBytes_GET_SIZE(chunk)
        if n == 0:
            return chunk
        p = s
        # where the current event began in this chunk; -1: in an earlier chunk (its bytes are in self.hold)
        ev_start = -1 if self.hold.len > 0 else 0
        if self.pending_cr:
            # a CR ended the previous chunk's last line: an LF here completes that CRLF
            self.pending_cr = False
            if s[0] == 10:
                p += 1
                if ev_start == 0:  # the CRLF ended an event: this LF belongs to it
                    ev_start = 1
                    if self.last_stripped:
                        fwd = 1
        # the next LF is searched again only once passed (so CR-only streams do not rescan to the end per line)
        nl = <const unsigned char*>memchr(p, 10, s + n - p)
        while p < s + n:
            if nl != NULL and nl < p:
                nl = <const unsigned char*>memchr(p, 10, s + n - p)
            lim = nl if nl != NULL else s + n
            cr = <const unsigned char*>memchr(p, 13, lim - p)
            if cr != NULL:
                eol = cr
                if cr + 1 < s + n:
                    term = 2 if cr[1] == 10 else 1
                else:
                    term = 1
                    self.pending_cr = True
            elif nl != NULL:
                eol = nl
                term = 1
            else:  # the line goes on in the next chunk
                buf_add(&self.line, p, s + n - p)
                break
            if self.line.len:
                buf_add(&self.line, p, eol - p)
                blank = False
                self._line(self.line.data, self.line.len)
                self.line.len = 0
            else:
                blank = eol == p
                if not blank:
                    self._line(p, eol - p)
            p = eol + term
            if not blank:
                continue
            # ---- blank line: the event ends here
            drop = self._dispatch()
            if not strip:
                continue
            after = p - s
            if ev_start < 0:  # began in an earlier chunk
                if drop:
                    fwd = after
                else:
                    buf_add(&self.out, self.hold.data, self.hold.len)
                self.hold.len = 0
            elif drop:
                buf_add(&self.out, s + fwd, ev_start - fwd)
                fwd = after
            self.last_stripped = drop
            ev_start = after
        if not strip:
            return chunk
        # ---- strip mode: forward s[fwd:ev_start] (after self.out), hold the incomplete event s[ev_start:]
        if ev_start != n:  # an event is in progress: a CRLF split after this chunk is not a stripped event's
            self.last_stripped = False
        if ev_start < 0:
            ev_start = 0
            if self.hold.len + n > MAX_EVENT:
                self.ev_passthrough = True
        elif self.hold.len + n - ev_start > MAX_EVENT:
            self.ev_passthrough = True
        if self.ev_passthrough:  # too big to hold: give up stripping this event, forward as it comes
            buf_add(&self.out, self.hold.data, self.hold.len)
            self.hold.len = 0
            ev_start = n
        else:
            buf_add(&self.hold, s + ev_start, n - ev_start)
        if self.out.len == 0:
            if fwd == 0 and ev_start == n:
                return chunk
            return PyBytes_FromStringAndSize(<const char*>s + fwd, ev_start - fwd if ev_start > fwd else 0)
        buf_add(&self.out, s + fwd, ev_start - fwd)
        out = PyBytes_FromStringAndSize(<const char*>self.out.data, self.out.len)
        self.out.len = 0
        return out

    cpdef bytes finish(self):
        """End of the upstream body: the held-back bytes of an incomplete event (forwarded as they are; the
        event itself is discarded, as an event-stream parser does), and the relay is reset for reuse."""
        cdef bytes tail = PyBytes_FromStringAndSize(<const char*>self.hold.data, self.hold.len)
        self.hold.len = self.line.len = self.ev.len = 0
        self.data_lines = 0
        self.ev_overflow = self.ev_passthrough = self.pending_cr = self.last_stripped = False
        return tail

    cdef int _line(self, const unsigned char* p, Py_ssize_t n) except -1:
        # a non-empty line: only `data` fields matter to us
        if n < 4 or memcmp(p, b"data", 4) != 0:
            return 0
        if n == 4:
            p += 4
            n = 0
        elif p[4] == 58:
            p += 5
            n -= 5
            if n and p[0] == 32:
                p += 1
                n -= 1
        else:  # e.g. "database: x"
            return 0
        if self.data_lines:
            n += 1  # the LF that joins data lines
        if self.ev.len + n > MAX_EVENT:
            self.ev_overflow = True
        elif not self.ev_overflow:
            if self.data_lines:
                buf_byte(&self.ev, 10)
                n -= 1
            buf_add(&self.ev, p, n)
        self.data_lines += 1
        return 0

    cdef int _dispatch(self) except -1:
        """The current event is complete: count and parse it. Returns 1 when it is to be stripped."""
        cdef int drop = 0
        if self.data_lines == 0:
            self.ev_passthrough = False
            return 0
        self.events += 1
        if not self.ev_overflow:
            if self.ev.len == 6 and memcmp(self.ev.data, b"[DONE]", 6) == 0:
                self.done = True
            else:
                drop = self._parse_event(self.ev.data, self.ev.len)
        if self.ev_passthrough or not self.strip_usage_chunk:
            drop = 0
        self.ev.len = 0
        self.data_lines = 0
        self.ev_overflow = self.ev_passthrough = False
        return drop

    cdef int _parse_event(self, const unsigned char* d, Py_ssize_t n) except -1:
        cdef Top t
        cdef Py_ssize_t i, e, vs, ve, cs, ce, ts, te
        cdef bint strip = False
        cdef bint collect = self.collect_text and not self.usage_promised
        cdef int usage = usage_values(d, n)
        if collect and usage & USAGE_NULL:
            self.usage_promised = True
            collect = False
        if not collect and not usage & USAGE_VALUE:
            return 0
        # Only an event that is JSON is read (its client could not read anything else); the scanners below
        # assume as much. Checked here, where an event is read at all: not for the "usage": null majority.
        if not json_valid(d, n) or scan_top(d, n, &t) < 0:
            return 0
        if collect:
            if t.choices_s >= 0:  # choices[].delta.content, in order
                e = t.choices_e
                i = skip_ws(d, t.choices_s + 1, e)
                while i < e and d[i] != 93:
                    ve = skip_value(d, i, e)
                    if ve < 0:
                        break
                    if d[i] == 123:
                        vs = obj_find(d, i, ve, b"delta", 5, &ce)
                        if vs >= 0 and d[vs] == 123:
                            cs = obj_find(d, vs, ce, b"content", 7, &te)
                            if cs >= 0 and d[cs] == 34:
                                self._keep_text(d + cs, te - cs)
                    i = skip_ws(d, ve, e)
                    if i < e and d[i] == 44:
                        i = skip_ws(d, i + 1, e)
            if (t.delta_s >= 0 and t.type_s >= 0 and t.type_e - t.type_s == 26
                    and memcmp(d + t.type_s, b"response.output_text.delta", 26) == 0):
                self._keep_text(d + t.delta_s - 1, t.delta_e - t.delta_s + 2)
        if t.usage_s >= 0:
            self._usage(d, t.usage_s, t.usage_e)
            if t.choices_s >= 0:
                i = skip_ws(d, t.choices_s + 1, t.choices_e)
                strip = d[i] == 93
        elif t.resp_s >= 0:
            vs = obj_find(d, t.resp_s, t.resp_e, b"usage", 5, &ve)
            if vs >= 0 and d[vs] == 123:
                self._usage(d, vs, ve)
        return strip

    cdef int _keep_text(self, const unsigned char* p, Py_ssize_t n) except -1:
        """Collect one JSON string (quotes included) of text, up to MAX_TEXT in all."""
        if self.txt.len + n > MAX_TEXT:
            self.text_skipped += n
            return 0
        buf_add(&self.txt, p, n)
        return buf_byte(&self.txt, 44)

    cdef void _usage(self, const unsigned char* d, Py_ssize_t s, Py_ssize_t e) noexcept:
        cdef Py_ssize_t vs, ve
        cdef long long p1 = -1, p2 = -1, c1 = -1, c2 = -1, tot = -1
        vs = obj_find(d, s, e, b"prompt_tokens", 13, &ve)
        if vs >= 0:
            p1 = parse_count(d, vs, ve)
        vs = obj_find(d, s, e, b"input_tokens", 12, &ve)
        if vs >= 0:
            p2 = parse_count(d, vs, ve)
        vs = obj_find(d, s, e, b"completion_tokens", 17, &ve)
        if vs >= 0:
            c1 = parse_count(d, vs, ve)
        vs = obj_find(d, s, e, b"output_tokens", 13, &ve)
        if vs >= 0:
            c2 = parse_count(d, vs, ve)
        vs = obj_find(d, s, e, b"total_tokens", 12, &ve)
        if vs >= 0:
            tot = parse_count(d, vs, ve)
        self.prompt_tokens = p1 if p1 >= 0 else p2
        self.completion_tokens = c1 if c1 >= 0 else c2
        if tot < 0 and self.prompt_tokens >= 0 and self.completion_tokens >= 0:
            tot = self.prompt_tokens + self.completion_tokens
        self.total_tokens = tot
        self.usage_seen = True

    def text(self):
        """The text collected so far (collect_text=True), decoded once here rather than per event."""
        if self.txt.len == 0:
            return ""
        raw = b"[" + PyBytes_FromStringAndSize(<const char*>self.txt.data, self.txt.len - 1) + b"]"
        try:
            return "".join(orjson.loads(raw))
        except orjson.JSONDecodeError:
            pass
        # lone surrogates (a pair split across two events) or raw control characters: the stdlib decoder
        # accepts both; a piece it still refuses (a bad escape) is left out rather than losing all the text
        parts = []
        for piece in _JSON_STRING.findall(raw):
            try:
                parts.append(json.loads(piece, strict=False))
            except ValueError:
                pass
        return "".join(parts)
