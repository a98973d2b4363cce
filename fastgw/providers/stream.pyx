# cython: language_level=3
"""The per-chunk relay of a stream in another provider's event format: split into events, translated.

A TranslatedStream is the SSERelay the relay gets from a translating provider's open_stream(). It splits the
upstream body into events by the WHATWG event-stream rules (lines end with CRLF, LF or CR; a blank line ends an
event; `data` lines are joined with LF; `event` names it; comments and other fields are ignored) and hands each
complete event to a translator from fastgw.providers.wire:

  translator.event(name, data) -> [client SSE blocks]     one upstream event, as it arrives (no buffering)
  translator.finish() -> [client SSE blocks]              the upstream body ended
  translator.prompt_tokens, completion_tokens             -1 until the upstream reported them
  translator.complete                                     the upstream's normal end was seen

The relay reads it like any SSERelay (events, usage_seen, prompt_tokens, completion_tokens). A body that ends
before the upstream's end event raises GatewayError 502 from finish(): the relay then breaks the client's
stream off rather than sending a made-up end. With `passthrough` (the client speaks the upstream's format) the
upstream's bytes go out unchanged and the translator only reads the usage.
"""
from fastgw.errors import GatewayError


cpdef TranslatedStream translated_stream(object translator, bint passthrough=False):
    # Made with __new__: SSERelay's __cinit__ takes the constructor's arguments, which are not its own here.
    cdef TranslatedStream s = TranslatedStream.__new__(TranslatedStream)
    s.translator = translator
    s.passthrough = passthrough
    s.tail = b""
    s.data = []
    s.name = None
    s.usage_promised = True     # no text is collected: a stream without usage leaves its counts unknown
    return s


cdef class TranslatedStream(SSERelay):

    cpdef object feed(self, object chunk):
        cdef bytes buf = self.tail + bytes(chunk) if self.tail else bytes(chunk)
        # A CR at the very end may be the first half of a CRLF: keep it until the next chunk tells.
        cdef Py_ssize_t end = len(buf) - 1 if buf.endswith(b"\r") else len(buf)
        out = self._lines(buf[:end] if end < len(buf) else buf)
        self.tail = self.tail + (b"\r" if end < len(buf) else b"")
        self._take_usage()
        if self.passthrough:
            return chunk
        return b"".join(out) if out else b""

    cdef list _lines(self, bytes buf):
        """Process the complete lines of buf (keeping the incomplete last one in self.tail)."""
        cdef list out = []
        cdef Py_ssize_t i = 0, n = len(buf), j, k, nl, cr
        while i < n:
            nl = buf.find(b"\n", i)
            cr = buf.find(b"\r", i)
            if nl < 0 and cr < 0:
                break
            j = nl if cr < 0 or (0 <= nl < cr) else cr
            k = j + 2 if buf[j] == 13 and j + 1 < n and buf[j + 1] == 10 else j + 1
            line = buf[i:j]
            i = k
            if not line:
                if self.data:
                    self.events += 1
                    out.extend(self.translator.event(self.name, b"\n".join(self.data)))
                self.data = []
                self.name = None
            elif line.startswith(b"data"):
                if len(line) == 4:
                    self.data.append(b"")
                elif line[4] == 58:                             # "data:" value, one leading space dropped
                    self.data.append(line[6:] if line[5:6] == b" " else line[5:])
            elif line.startswith(b"event"):
                if len(line) == 5:                              # a bare "event": the field with no value
                    self.name = ""
                elif line[5] == 58:
                    self.name = (line[7:] if line[6:7] == b" " else line[6:]).decode("utf-8", "replace")
        self.tail = buf[i:]
        return out

    cpdef bytes finish(self):
        out = self._lines(self.tail + b"\n") if self.tail else []   # a last line without its end
        out.extend(self.translator.finish())
        self._take_usage()
        self.done = self.translator.complete
        if not self.done:
            raise GatewayError(502, "The upstream's stream ended before its end event.", type="upstream_error",
                               code="upstream_truncated")
        return b"" if self.passthrough else b"".join(out)

    cdef void _take_usage(self) noexcept:
        t = self.translator
        try:
            p, c = t.prompt_tokens, t.completion_tokens
            if p >= 0 or c >= 0:
                self.usage_seen = True
                self.prompt_tokens = p
                self.completion_tokens = c
                self.total_tokens = (p if p > 0 else 0) + (c if c > 0 else 0)
        except Exception:
            pass
