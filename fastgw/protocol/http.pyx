# cython: boundscheck=False, wraparound=False, cdivision=True, language_level=3
"""Incremental, strict HTTP/1.1 parsers (sans-IO) and head writers for the gateway's hot path.

RequestParser reads client requests (whole message buffered: they are a few KB); ResponseParser
reads upstream responses and streams their bodies. Both read a fed bytes object where it is (a message
per read, the common case, is never copied) and copy into a C buffer of their own, compacted as it is
consumed, only what a read leaves incomplete; they record headers as offsets (no Python object per
header), and search for the end of a head only once across feed() calls, so a peer sending one byte at
a time costs O(n) in total. Buffers are allocated on first use and sized to what was needed, so an
idle connection holds a few hundred bytes, not kilobytes.

Events returned by next_event(): NEED_DATA, HEAD, BODY (responses only), END, ERROR.

Strictness (both parsers unless noted), chosen to shut request-smuggling and desync doors:
  * every line must end in CRLF; a bare LF or a bare CR anywhere in a head is an error;
  * obs-fold (a line starting with SP/HTAB), a space before the colon, names that are not tokens,
    control bytes (0x00-0x1F but HTAB, and 0x7F) in values: error;
  * Content-Length: digits only, at most 18; duplicates must be identical (a comma list is refused);
    Content-Length with Transfer-Encoding: error; Transfer-Encoding must be exactly one `chunked`
    (an unknown coding => 501, a malformed list or `chunked` twice => 400);
  * chunk sizes: hex, at most 15 significant digits, the size line at most 4096 bytes; chunk
    extensions are accepted only when they match RFC 9112's grammar (token [= token/quoted-string]);
    chunk data must be followed by CRLF; trailers are validated like header lines (no
    Content-Length / Transfer-Encoding among them) and dropped;
  * requests: method a token; target origin-form ("/..."), "*" only for OPTIONS, or absolute-form
    (http:// or https://); version HTTP/1.0 or HTTP/1.1 (other HTTP/d.d => 505; a chunked HTTP/1.0
    request is never kept alive, RFC 9112 section 6.1); HTTP/1.1 needs
    exactly one Host (more than one is refused for 1.0 too); Expect other than 100-continue => 417;
    head > max_head_bytes or more than max_headers fields => 431; body > max_body_bytes => 413
    (from Content-Length at once, and while de-chunking). Empty lines (CRLF) before a request line
    are skipped, as RFC 9112 section 2.2 recommends.
  * responses are more lenient only where real servers need it: the reason phrase may be missing
    ("HTTP/1.1 200"), and whitespace may trail a chunk size or extension. Any error is reported
    with error_status 502.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memchr, memcmp, memcpy, memmove

NEED_DATA = 0
HEAD = 1
BODY = 2
END = 3
ERROR = 4
LAST_CHUNK = b"0\r\n\r\n"

cdef enum:
    EV_NEED_DATA = 0
    EV_HEAD = 1
    EV_BODY = 2
    EV_END = 3
    EV_ERROR = 4

cdef enum:
    S_HEAD = 0      # looking for / parsing a head
    S_BODY = 1      # head returned, reading the body
    S_DONE = 2      # message complete; waiting for start_next()/start()
    S_ERROR = 3     # sticky

cdef enum:
    CK_SIZE = 0
    CK_DATA = 1
    CK_CRLF = 2
    CK_TRAILER = 3
    CK_END = 4

cdef enum:
    F_NONE = 0      # no body (HEAD request, 204, 304)
    F_LENGTH = 1
    F_CHUNKED = 2
    F_CLOSE = 3     # read until the connection closes

cdef enum:
    MAX_CHUNK_LINE = 4096     # a chunk-size line, extensions included
    MAX_CONN_TOKENS = 32      # Connection options (conn_tok holds 2 per option)
    MAX_DROP = 64             # names in forward_head's drop set
    MIN_BUF = 512             # the smallest buffer allocated (heads, bodies and events are rarely smaller)
    MIN_HEADERS = 16          # header slots allocated first (a request from an SDK has about 15 fields)
    KEEP_AT_MOST = 16384      # a buffer bigger than this is freed once its message is over

cdef long long NO_LIMIT = 0x7FFFFFFFFFFFFFFF
cdef char _NOTHING_BYTES[1]
cdef char* _NOTHING = _NOTHING_BYTES      # where buf points when there is nothing to read (never NULL)

# Byte classes (RFC 9110): token chars, field-value chars (HTAB, SP, VCHAR, obs-text), request-target
# chars (VCHAR, as h11), lower-casing, hex digit values (255 = not a hex digit).
cdef unsigned char TOKEN[256]
cdef unsigned char FIELD[256]
cdef unsigned char TARGET[256]
cdef unsigned char LOWER[256]
cdef unsigned char HEXV[256]


cdef void _init_tables():
    cdef int c
    cdef const char* tok = b"!#$%&'*+-.^_`|~"
    for c in range(256):
        LOWER[c] = c + 32 if 65 <= c <= 90 else c
        TOKEN[c] = (48 <= c <= 57) or (65 <= c <= 90) or (97 <= c <= 122)
        FIELD[c] = c == 9 or 32 <= c <= 126 or c >= 128
        TARGET[c] = 33 <= c <= 126
        if 48 <= c <= 57:
            HEXV[c] = c - 48
        elif 65 <= c <= 70:
            HEXV[c] = c - 55
        elif 97 <= c <= 102:
            HEXV[c] = c - 87
        else:
            HEXV[c] = 255
    while tok[0]:
        TOKEN[<unsigned char>tok[0]] = 1
        tok += 1


_init_tables()


cdef extern from *:
    """
    #if defined(__SSE2__)
    #include <emmintrin.h>
    #endif
    /* The first byte at or after p that is not a token char (per the table `token`). 16 bytes at a time
       while 16 are left before end: a block of letters, digits and '-' (nearly every name) passes with
       a few compares; at the first other byte the table decides. The caller knows a non-token byte
       (the line's CR) comes before end, so the byte-wise tail stops in bounds. */
    static inline const unsigned char* hp_token_end(const unsigned char* p, const unsigned char* end,
                                                    const unsigned char* token) {
    #if defined(__SSE2__)
        const __m128i a1 = _mm_set1_epi8('a' - 1), z1 = _mm_set1_epi8('z' + 1), d0 = _mm_set1_epi8('0' - 1),
                      d9 = _mm_set1_epi8('9' + 1), dash = _mm_set1_epi8('-'), bit = _mm_set1_epi8(0x20);
        while (end - p >= 16) {
            __m128i v = _mm_loadu_si128((const __m128i*)p);
            __m128i l = _mm_or_si128(v, bit);   /* ASCII lower case; bytes >= 0x80 stay negative */
            __m128i ok = _mm_or_si128(
                _mm_or_si128(_mm_and_si128(_mm_cmpgt_epi8(l, a1), _mm_cmpgt_epi8(z1, l)),
                             _mm_and_si128(_mm_cmpgt_epi8(v, d0), _mm_cmpgt_epi8(d9, v))),
                _mm_cmpeq_epi8(v, dash));
            unsigned mask = ~(unsigned)_mm_movemask_epi8(ok) & 0xFFFFu;
            if (mask) {
                p += __builtin_ctz(mask);
                if (!token[*p]) return p;
                p++;
                continue;
            }
            p += 16;
        }
    #endif
        while (token[*p]) p++;
        return p;
    }

    /* The first byte at or after p that is not a field-value char: a control byte other than HTAB, or
       DEL (per the table `field` for the tail). Same bounds contract as hp_token_end (the CR stops it). */
    static inline const unsigned char* hp_value_end(const unsigned char* p, const unsigned char* end,
                                                    const unsigned char* field) {
    #if defined(__SSE2__)
        const __m128i c1f = _mm_set1_epi8(0x1F), del = _mm_set1_epi8(0x7F), tab = _mm_set1_epi8(9);
        while (end - p >= 16) {
            __m128i v = _mm_loadu_si128((const __m128i*)p);
            __m128i bad = _mm_or_si128(_mm_cmpeq_epi8(_mm_max_epu8(v, c1f), c1f),   /* v <= 0x1F */
                                       _mm_cmpeq_epi8(v, del));
            bad = _mm_andnot_si128(_mm_cmpeq_epi8(v, tab), bad);
            int mask = _mm_movemask_epi8(bad);
            if (mask) return p + __builtin_ctz((unsigned)mask);
            p += 16;
        }
    #endif
        while (field[*p]) p++;
        return p;
    }
    """
    const unsigned char* hp_token_end(const unsigned char* p, const unsigned char* end,
                                      const unsigned char* token) noexcept nogil
    const unsigned char* hp_value_end(const unsigned char* p, const unsigned char* end,
                                      const unsigned char* field) noexcept nogil


cdef inline bint _ieq(const unsigned char* p, const char* lit, Py_ssize_t n) noexcept nogil:
    """p[:n] equals the lowercase literal lit, ignoring ASCII case in p."""
    cdef Py_ssize_t k
    for k in range(n):
        if LOWER[p[k]] != <unsigned char>lit[k]:
            return False
    return True


cdef inline bint _ieq2(const unsigned char* a, const unsigned char* b, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t k
    for k in range(n):
        if LOWER[a[k]] != LOWER[b[k]]:
            return False
    return True


cdef Py_ssize_t _field_line(const unsigned char* b, Py_ssize_t i, Py_ssize_t n, Py_ssize_t* ns_end,
                            Py_ssize_t* vs, Py_ssize_t* ve) noexcept nogil:
    """Validate the field line starting at b[i], which the caller knows ends in CRLF before b[n].

    Returns the index just past its CRLF, or -1 (obs-fold), -2 (bad name), -3 (bad value byte).
    """
    cdef Py_ssize_t j = i, e
    cdef unsigned char c = b[i]
    if c == 32 or c == 9:
        return -1
    j = hp_token_end(b + i, b + n, TOKEN) - b
    if j == i or b[j] != 58:     # ':' must follow a non-empty token directly (no space)
        return -2
    ns_end[0] = j
    j += 1
    while b[j] == 32 or b[j] == 9:
        j += 1
    vs[0] = j
    j = hp_value_end(b + j, b + n, FIELD) - b
    if b[j] != 13 or b[j + 1] != 10:
        return -3
    e = j
    while e > vs[0] and (b[e - 1] == 32 or b[e - 1] == 9):
        e -= 1
    ve[0] = e
    return j + 2


cdef bint _chunk_ext_ok(const unsigned char* b, Py_ssize_t i, Py_ssize_t e, bint lenient) noexcept nogil:
    """b[i:e] matches *( BWS ";" BWS name [ BWS "=" BWS ( token / quoted-string ) ] ); lenient
    also allows trailing whitespace (some servers send "5 \\r\\n")."""
    cdef Py_ssize_t s
    cdef unsigned char c
    while i < e:
        while i < e and (b[i] == 32 or b[i] == 9):
            i += 1
        if i == e:
            return lenient
        if b[i] != 59:
            return False
        i += 1
        while i < e and (b[i] == 32 or b[i] == 9):
            i += 1
        s = i
        while i < e and TOKEN[b[i]]:
            i += 1
        if i == s:
            return False
        s = i
        while i < e and (b[i] == 32 or b[i] == 9):
            i += 1
        if i < e and b[i] == 61:
            i += 1
            while i < e and (b[i] == 32 or b[i] == 9):
                i += 1
            if i < e and b[i] == 34:
                i += 1
                while True:
                    if i >= e:
                        return False
                    c = b[i]
                    if c == 34:
                        i += 1
                        break
                    if c == 92:
                        i += 1
                        if i >= e or not FIELD[b[i]]:
                            return False
                    elif not FIELD[c]:
                        return False
                    i += 1
            else:
                s = i
                while i < e and TOKEN[b[i]]:
                    i += 1
                if i == s:
                    return False
        else:
            i = s
    return True


cdef inline Py_ssize_t _dec_len(long long v) noexcept nogil:
    cdef Py_ssize_t n = 1
    while v >= 10:
        v //= 10
        n += 1
    return n


cdef inline char* _put_dec(char* p, long long v) noexcept nogil:
    cdef Py_ssize_t n = _dec_len(v), k
    for k in range(n - 1, -1, -1):
        p[k] = <char>(48 + v % 10)
        v //= 10
    return p + n


cdef inline char* _put(char* p, const char* s, Py_ssize_t n) noexcept nogil:
    memcpy(p, s, n)
    return p + n


cdef inline char* _put_length(char* w, long long content_length) noexcept nogil:
    """The content-length line of a head being written (the caller sized the buffer for it)."""
    w = _put(w, b"content-length: ", 16)
    w = _put_dec(w, content_length)
    return _put(w, b"\r\n", 2)


# What a field name is, worked out once at parse time and kept as hdr[5k+4]: the low bits say which field
# decides framing/connection handling, the DROP_* bits which names are never forwarded (hop-by-hop fields,
# and the ones the gateway writes itself).
cdef enum:
    HSTRIDE = 5         # slots per header in hdr: name off, name len, value off, value len, kind
    NK_OTHER = 0
    NK_CONTENT_LENGTH = 1
    NK_TRANSFER_ENCODING = 2
    NK_CONNECTION = 3
    NK_HOST = 4
    NK_EXPECT = 5
    NK_MASK = 15
    DROP_REQ = 16       # not forwarded upstream
    DROP_RESP = 32      # not forwarded to the client
    DROP_BOTH = 48
    SKIP = 64           # set by forward_head's first pass: not written this time


cdef int _name_kind(const unsigned char* n, Py_ssize_t l) noexcept nogil:
    """NK_* | DROP_* bits for the field name n[:l] (any case)."""
    if l == 2:
        return DROP_BOTH if _ieq(n, b"te", 2) else 0
    if l == 4:
        return NK_HOST | DROP_REQ if _ieq(n, b"host", 4) else 0
    if l == 6:
        return NK_EXPECT | DROP_REQ if _ieq(n, b"expect", 6) else 0
    if l == 7:
        return DROP_BOTH if _ieq(n, b"trailer", 7) or _ieq(n, b"upgrade", 7) else 0
    if l == 10:
        if _ieq(n, b"connection", 10):
            return NK_CONNECTION | DROP_BOTH
        return DROP_BOTH if _ieq(n, b"keep-alive", 10) else 0
    if l == 14:
        return NK_CONTENT_LENGTH | DROP_BOTH if _ieq(n, b"content-length", 14) else 0
    if l == 16:
        return DROP_BOTH if _ieq(n, b"proxy-connection", 16) else 0
    if l == 17:
        return NK_TRANSFER_ENCODING | DROP_BOTH if _ieq(n, b"transfer-encoding", 17) else 0
    if l == 18:
        return DROP_BOTH if _ieq(n, b"proxy-authenticate", 18) else 0
    if l == 19:
        return DROP_BOTH if _ieq(n, b"proxy-authorization", 19) else 0
    return 0


cdef char* _put_fields(char* w, const char* hb, const Py_ssize_t* hdr, int nhdr) noexcept nogil:
    """Write the fields not marked SKIP as "name: value\\r\\n". A line received in exactly that shape (one
    space after the colon, no trailing whitespace; nearly all) is copied from the head as it is, and a run
    of consecutive ones with a single memcpy."""
    cdef Py_ssize_t rs = 0, re = 0, ne, ve
    cdef const Py_ssize_t* h
    cdef int k
    for k in range(nhdr):
        h = hdr + HSTRIDE * k
        if h[4] & SKIP:
            continue
        ne = h[0] + h[1]
        ve = h[2] + h[3]
        if h[2] == ne + 2 and hb[ne + 1] == 32 and hb[ve] == 13:
            if re != h[0]:      # not right after the pending run: write that, start a new one
                w = _put(w, hb + rs, re - rs)
                rs = h[0]
            re = ve + 2
        else:
            w = _put(w, hb + rs, re - rs)
            rs = re = 0
            w = _put(w, hb + h[0], h[1])
            w = _put(w, b": ", 2)
            w = _put(w, hb + h[2], h[3])
            w = _put(w, b"\r\n", 2)
    return _put(w, hb + rs, re - rs)


cdef inline void _message_over(_Message m) noexcept:
    """A message ended (or the next one starts). With nothing unconsumed, let go of the fed object buf points
    into (freed now, not at the connection's next read) and of our buffer if a big message made it grow: an
    idle connection keeps at most KEEP_AT_MOST of it, whatever it was sent before."""
    if m.pos != m.end or (m.held is None and m.cap <= KEEP_AT_MOST):
        return          # bytes of the next message are buffered, or there is nothing to let go
    m.held = None
    if m.cap > KEEP_AT_MOST:
        free(m.own)
        m.own = NULL
        m.cap = 0
    m.buf = m.own if m.own != NULL else _NOTHING
    m.pos = m.end = 0


cdef class _Message:
    """Shared machinery: the input buffer, head search and field parsing, the chunked decoder."""

    def __cinit__(self, *args, **kwargs):
        # Nothing is allocated until a message needs it (see the buffers' notes in http.pxd): an idle
        # connection costs the object alone.
        self.buf = _NOTHING
        self.error_message = ""

    def __dealloc__(self):
        free(self.own)
        free(self.hbuf)
        free(self.bbuf)
        free(self.hdr)

    cdef int _alloc_headers(self, Py_ssize_t max_head, Py_ssize_t max_hdrs) except -1:
        if max_head < 64 or max_hdrs < 1:
            raise ValueError("max_head_bytes must be >= 64 and max_headers >= 1")
        self.max_head = max_head
        self.max_hdrs = max_hdrs
        self._reset_head()
        return 0

    cdef int _grow(self, char** p, Py_ssize_t* cap, Py_ssize_t need) except -1:
        """Make room for `need` bytes in the buffer *p (NULL: none yet), doubling, at least MIN_BUF."""
        cdef Py_ssize_t c = cap[0] * 2
        cdef char* q
        if c < need:
            c = need
        if c < MIN_BUF:
            c = MIN_BUF
        q = <char*>realloc(p[0], c)
        if q == NULL:
            raise MemoryError()
        p[0] = q
        cap[0] = c
        return 0

    cdef int _more_headers(self) except -1:
        """Room for more header slots: MIN_HEADERS at first, then doubling, up to max_headers."""
        cdef Py_ssize_t c = self.hdr_cap * 2
        cdef Py_ssize_t* q
        if c < MIN_HEADERS:
            c = MIN_HEADERS
        if c > self.max_hdrs:
            c = self.max_hdrs
        q = <Py_ssize_t*>realloc(self.hdr, HSTRIDE * sizeof(Py_ssize_t) * c)
        if q == NULL:
            raise MemoryError()
        self.hdr = q
        self.hdr_cap = c
        return 0

    cdef int _take(self, bytes data) except -1:
        """Add a fed bytes object: kept as it is (buf points into it) when nothing else is unconsumed, the
        common case of a message per read, else copied after the unconsumed bytes."""
        if self.pos != self.end:
            return self._append(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        self.held = data
        self.buf = PyBytes_AS_STRING(data)
        self.pos = 0
        self.end = PyBytes_GET_SIZE(data)
        return 0

    cdef int _append(self, const char* data, Py_ssize_t n) except -1:
        """Copy fed bytes into our own buffer after the unconsumed ones, compacting consumed space first
        (every position is relative to pos)."""
        cdef Py_ssize_t rest = self.end - self.pos
        if self.held is not None:
            # The unconsumed bytes are in a fed object: move them to our buffer, where the new ones can follow.
            if rest + n > self.cap:
                self._grow(&self.own, &self.cap, rest + n)
            memcpy(self.own, self.buf + self.pos, rest)
            self.held = None
            self.buf = self.own
            self.pos = 0
            self.end = rest
        else:
            if rest == 0:
                self.pos = self.end = 0
            if self.end + n > self.cap:
                if self.pos:
                    memmove(self.own, self.own + self.pos, rest)
                    self.end = rest
                    self.pos = 0
                if self.end + n > self.cap:
                    self._grow(&self.own, &self.cap, self.end + n)
                self.buf = self.own
        memcpy(self.buf + self.end, data, n)
        self.end += n
        return 0

    cdef int _fail(self, int status, str message):
        self.state = S_ERROR
        self.error_status = status
        self.error_message = message
        return -1

    cdef void _reset_head(self):
        self.state = S_HEAD
        self.scan = self.line_start = 0
        self.hlen = 0
        self.nhdr = 0
        self.nconn = 0
        self.http_version = 0
        self.keep_alive = False
        self.content_length = -1
        self.chunked = False
        self.conn_close = self.conn_keepalive = False
        self.host_count = self.te_count = self.flags = 0
        self.expect_100 = False
        self.ck_state = CK_SIZE
        self.ck_rem = 0
        self.ck_scan = self.ck_trailer_bytes = 0
        self.blen = 0
        if self.bcap > KEEP_AT_MOST:        # a big chunked body is over: give its buffer back
            free(self.bbuf)
            self.bbuf = NULL
            self.bcap = 0
        _message_over(self)

    cdef int _scan_head(self, bint skip_leading_crlf):
        """Find the end of a head in buf. 1: found, its length in self.scan; 0: need data; -1: error.

        Resumes where the previous call stopped, and insists on CRLF line ends as it goes, so a
        bare LF is refused as soon as it arrives. Never looks past max_head bytes: what lies beyond
        cannot change the verdict (431), whether it came in the same read or not.
        """
        cdef const char* b = self.buf + self.pos
        cdef Py_ssize_t n = self.end - self.pos
        cdef Py_ssize_t i = self.scan, ls = self.line_start, j
        cdef Py_ssize_t lim = n if n <= self.max_head else self.max_head
        cdef const char* p
        while i < lim:
            p = <const char*>memchr(b + i, 10, lim - i)
            if p == NULL:
                i = lim
                break
            j = p - b
            if j == 0 or b[j - 1] != 13 or j - 1 < ls:
                return self._fail(400, "line not terminated by CRLF")
            if j - 1 == ls:
                if ls == 0:
                    if skip_leading_crlf:
                        self.pos += 2
                        b += 2
                        n -= 2
                        lim = n if n <= self.max_head else self.max_head
                        i = 0
                        continue
                    return self._fail(400, "empty line where a start line was expected")
                self.scan = j + 1
                return 1
            ls = j + 1
            i = j + 1
        self.scan = i
        self.line_start = ls
        if n > self.max_head:
            return self._fail(431, "request header fields too large")
        return 0

    cdef int _take_head(self) except -1:
        """Copy the head just found out of buf (so the body can be consumed freely) and consume it."""
        cdef Py_ssize_t h = self.scan
        if h > self.hcap:
            self._grow(&self.hbuf, &self.hcap, h)
        memcpy(self.hbuf, self.buf + self.pos, h)
        self.hlen = h
        self.pos += h
        self.scan = self.line_start = 0
        return 0

    cdef int _parse_fields(self, Py_ssize_t i):
        """Validate and record the field lines of hbuf from i to the final empty line."""
        cdef const unsigned char* b = <const unsigned char*>self.hbuf
        cdef Py_ssize_t ne = 0, vs = 0, ve = 0, nxt
        cdef Py_ssize_t* h
        while True:
            if b[i] == 13:
                if b[i + 1] != 10:
                    return self._fail(400, "bare CR in header section")
                return 0
            nxt = _field_line(b, i, self.hlen, &ne, &vs, &ve)
            if nxt < 0:
                if nxt == -1:
                    return self._fail(400, "obsolete line folding is not accepted")
                if nxt == -2:
                    return self._fail(400, "invalid header name")
                return self._fail(400, "invalid character in header value")
            if self.nhdr >= self.hdr_cap:
                if self.nhdr >= self.max_hdrs:
                    return self._fail(431, "too many header fields")
                self._more_headers()
            h = self.hdr + HSTRIDE * self.nhdr
            h[0] = i
            h[1] = ne - i
            h[2] = vs
            h[3] = ve - vs
            h[4] = _name_kind(b + i, ne - i)
            self.nhdr += 1
            if h[4] & NK_MASK and self._special(i, ne - i, vs, ve - vs) < 0:
                return -1
            i = nxt

    cdef int _special(self, Py_ssize_t ns, Py_ssize_t nl, Py_ssize_t vs, Py_ssize_t vl):
        """Note the fields that decide framing and connection handling (the last header recorded, whose
        kind _parse_fields has worked out)."""
        cdef const unsigned char* b = <const unsigned char*>self.hbuf
        cdef const unsigned char* v = b + vs
        cdef Py_ssize_t k, s, e, t
        cdef long long cl = 0
        cdef int kind = self.hdr[HSTRIDE * (self.nhdr - 1) + 4] & NK_MASK
        if kind == NK_CONTENT_LENGTH:
            if vl == 0 or vl > 18:
                return self._fail(400, "invalid Content-Length")
            for k in range(vl):
                if v[k] < 48 or v[k] > 57:
                    return self._fail(400, "invalid Content-Length")
                cl = cl * 10 + (v[k] - 48)
            if self.content_length >= 0 and self.content_length != cl:
                return self._fail(400, "conflicting Content-Length fields")
            self.content_length = cl
        elif kind == NK_TRANSFER_ENCODING or kind == NK_CONNECTION:
            # Comma-separated lists; elements trimmed of OWS.
            k = 0
            while k <= vl:
                s = k
                while k < vl and v[k] != 44:
                    k += 1
                e = k
                k += 1
                while s < e and (v[s] == 32 or v[s] == 9):
                    s += 1
                while e > s and (v[e - 1] == 32 or v[e - 1] == 9):
                    e -= 1
                if kind == NK_TRANSFER_ENCODING:
                    if e == s:
                        return self._fail(400, "malformed Transfer-Encoding")
                    for t in range(s, e):
                        if not TOKEN[v[t]]:
                            return self._fail(400, "malformed Transfer-Encoding")
                    self.te_count += 1
                    if not (e - s == 7 and _ieq(v + s, b"chunked", 7)):
                        self.flags |= 2     # an unknown coding: 501
                elif e > s:
                    if e - s == 5 and _ieq(v + s, b"close", 5):
                        self.conn_close = True
                    elif e - s == 10 and _ieq(v + s, b"keep-alive", 10):
                        self.conn_keepalive = True
                    if self.nconn >= MAX_CONN_TOKENS:
                        return self._fail(400, "too many Connection options")
                    self.conn_tok[2 * self.nconn] = vs + s
                    self.conn_tok[2 * self.nconn + 1] = e - s
                    self.nconn += 1
        elif kind == NK_HOST:
            self.host_count += 1
        elif kind == NK_EXPECT:
            if vl == 12 and _ieq(v, b"100-continue", 12):
                self.expect_100 = True
            else:
                self.flags |= 1
        return 0

    cdef int _framing(self):
        """Decide chunked / Content-Length after all fields are seen."""
        if self.te_count:
            if self.content_length >= 0:
                return self._fail(400, "Content-Length together with Transfer-Encoding")
            if self.flags & 2:
                return self._fail(501, "unsupported Transfer-Encoding")
            if self.te_count != 1:
                return self._fail(400, "malformed Transfer-Encoding")
            self.chunked = True
        return 0

    cdef int _dechunk(self, long long limit, long long done) except -2:
        """Decode chunked framing from buf into bbuf until the input runs out or the message ends.

        limit: the most decoded bytes allowed (413 beyond), or -1. Returns 1 when the last chunk
        and the trailers have been read, 0 when more data is needed, -1 on error.
        """
        cdef const unsigned char* b
        cdef const unsigned char* p
        cdef Py_ssize_t n, j, k, sig, take, ne, vs, ve
        cdef long long size
        while True:
            b = <const unsigned char*>self.buf + self.pos
            n = self.end - self.pos
            if self.ck_state == CK_SIZE:
                p = <const unsigned char*>memchr(b + self.ck_scan, 10, n - self.ck_scan)
                if p == NULL:
                    self.ck_scan = n
                    if n > MAX_CHUNK_LINE:
                        return self._fail(400, "chunk size line too long")
                    return 0
                j = p - b
                if j > MAX_CHUNK_LINE:
                    return self._fail(400, "chunk size line too long")
                if j == 0 or b[j - 1] != 13:
                    return self._fail(400, "chunk size line not terminated by CRLF")
                k = 0
                sig = 0
                size = 0
                while k < j - 1 and HEXV[b[k]] != 255:
                    if size or HEXV[b[k]]:
                        sig += 1
                        if sig > 15:
                            return self._fail(400, "chunk size too large")
                    size = size * 16 + HEXV[b[k]]
                    k += 1
                if k == 0:
                    return self._fail(400, "invalid chunk size")
                if k < j - 1 and not _chunk_ext_ok(b, k, j - 1, self.lenient):
                    return self._fail(400, "invalid chunk extension")
                self.pos += j + 1
                self.ck_scan = 0
                if size == 0:
                    self.ck_state = CK_TRAILER
                    self.ck_trailer_bytes = 0
                else:
                    if limit >= 0 and done + self.blen + size > limit:
                        return self._fail(413, "request body too large")
                    self.ck_rem = size
                    self.ck_state = CK_DATA
            elif self.ck_state == CK_DATA:
                if n == 0:
                    return 0
                take = n if n < self.ck_rem else self.ck_rem
                if self.blen + take > self.bcap:
                    self._grow(&self.bbuf, &self.bcap, self.blen + take)
                memcpy(self.bbuf + self.blen, b, take)
                self.blen += take
                self.pos += take
                self.ck_rem -= take
                if self.ck_rem == 0:
                    self.ck_state = CK_CRLF
            elif self.ck_state == CK_CRLF:
                if n == 0:
                    return 0
                if b[0] != 13 or (n > 1 and b[1] != 10):
                    return self._fail(400, "missing CRLF after chunk data")
                if n < 2:
                    return 0
                self.pos += 2
                self.ck_state = CK_SIZE
            elif self.ck_state == CK_TRAILER:
                # The line is searched for only within what the trailer section may still take (max_head in
                # all), as the head is: past it the answer is 431 however the bytes were read.
                k = self.max_head - self.ck_trailer_bytes
                if k > n:
                    k = n
                p = NULL
                if k > self.ck_scan:
                    p = <const unsigned char*>memchr(b + self.ck_scan, 10, k - self.ck_scan)
                if p == NULL:
                    self.ck_scan = k
                    if self.ck_trailer_bytes + n > self.max_head:
                        return self._fail(431, "trailer section too large")
                    return 0
                j = p - b
                if j == 0 or b[j - 1] != 13:
                    return self._fail(400, "line not terminated by CRLF")
                self.ck_trailer_bytes += j + 1
                self.pos += j + 1
                self.ck_scan = 0
                if j == 1:
                    self.ck_state = CK_END
                    return 1
                # Framing fields are refused in trailers: nothing may re-frame a message after
                # the fact (h11 also validates them; we drop trailers, so refusing costs nothing).
                if _field_line(b, 0, j + 1, &ne, &vs, &ve) < 0 or (ne == 14 and _ieq(b, b"content-length", 14)) or (
                        ne == 17 and _ieq(b, b"transfer-encoding", 17)):
                    return self._fail(400, "invalid trailer field")
            else:
                return 1

    # -- public, shared --------------------------------------------------------------------------

    @property
    def buffered(self):
        """Bytes fed but not consumed yet (for backpressure and pipelining limits)."""
        return self.end - self.pos

    def take_buffered(self):
        """The bytes fed but not consumed yet, consumed: after a protocol switch (a WebSocket upgrade) they are
        the new protocol's, not HTTP."""
        cdef bytes out = PyBytes_FromStringAndSize(self.buf + self.pos, self.end - self.pos)
        self.pos = self.end
        return out

    @property
    def buffer_bytes(self):
        """Bytes of C buffers the parser holds now (its input copy, the head, the header slots, the de-chunked
        body); a fed object it reads in place is not counted: it is the caller's, and let go once consumed."""
        return self.cap + self.hcap + self.bcap + self.hdr_cap * HSTRIDE * sizeof(Py_ssize_t)

    cpdef object header(self, bytes name):
        """First value of the field `name` (matched case-insensitively), or None."""
        cdef const unsigned char* q = <const unsigned char*>PyBytes_AS_STRING(name)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(name), k
        cdef Py_ssize_t* h
        for k in range(self.nhdr):
            h = self.hdr + HSTRIDE * k
            if h[1] == n and _ieq2(<const unsigned char*>self.hbuf + h[0], q, n):
                return PyBytes_FromStringAndSize(self.hbuf + h[2], h[3])
        return None

    def headers(self):
        """All fields as received, in order: list of (lowercase name, value)."""
        cdef list out = []
        cdef Py_ssize_t k, m
        cdef Py_ssize_t* h
        cdef bytes name
        cdef char* w
        for k in range(self.nhdr):
            h = self.hdr + HSTRIDE * k
            name = PyBytes_FromStringAndSize(NULL, h[1])
            w = PyBytes_AS_STRING(name)
            for m in range(h[1]):
                w[m] = <char>LOWER[<unsigned char>self.hbuf[h[0] + m]]
            out.append((name, PyBytes_FromStringAndSize(self.hbuf + h[2], h[3])))
        return out

    cdef bint _conn_listed(self, const unsigned char* n, Py_ssize_t l):
        cdef int k
        for k in range(self.nconn):
            if self.conn_tok[2 * k + 1] == l and _ieq2(
                    n, <const unsigned char*>self.hbuf + self.conn_tok[2 * k], l):
                return True
        return False


cdef class RequestParser(_Message):
    """Incremental parser for the requests of one client connection (pipelining supported).

    feed(data) buffers; next_event() returns HEAD, then END with `body` set; ERROR with
    error_status/error_message. After END, call start_next() to parse the next request.

    Streamed bodies (uploads): with max_stream_bytes > 0, a head may announce a body up to that size; right after
    HEAD the caller either calls stream_body(), and then gets the body in BODY events (take_body() each time,
    at most max_stream_bytes in all) before END, or does not, and the body is read whole up to max_body_bytes
    (413 beyond, now). Without max_stream_bytes every body is read whole.
    """

    def __cinit__(self, Py_ssize_t max_head_bytes=16384, Py_ssize_t max_headers=100,
                  Py_ssize_t max_body_bytes=16 * 1024 * 1024, long long max_stream_bytes=0):
        self._alloc_headers(max_head_bytes, max_headers)
        if max_body_bytes < 0 or max_stream_bytes < 0:
            raise ValueError("max_body_bytes and max_stream_bytes must be >= 0")
        self.max_body = max_body_bytes
        self.max_stream = max_stream_bytes
        self.lenient = False
        self.body = b""

    cdef void _reset_head(self):
        _Message._reset_head(self)
        self.method_len = self.target_off = self.target_len = 0
        self.expect_continue = False
        self.streaming = self.announced = False
        self.streamed = self.body_left = 0

    cpdef void feed(self, data):
        """Buffer bytes from the client. Never raises on bad input (errors come from next_event)."""
        cdef const unsigned char[:] view
        if self.state == S_ERROR:
            return      # the connection is being closed: keep nothing
        if type(data) is bytes:
            self._take(data)
        else:
            view = data
            if view.shape[0]:
                self._append(<const char*>&view[0], view.shape[0])

    cdef int _parse_request_line(self):
        cdef const unsigned char* b = <const unsigned char*>self.hbuf
        cdef Py_ssize_t i = 0, t0
        while TOKEN[b[i]]:
            i += 1
        if i == 0 or b[i] != 32:
            return self._fail(400, "invalid request line")
        self.method_len = i
        i += 1
        t0 = i
        while TARGET[b[i]]:
            i += 1
        if i == t0 or b[i] != 32:
            return self._fail(400, "invalid request line")
        self.target_off = t0
        self.target_len = i - t0
        i += 1
        if (i + 10 > self.hlen or b[i] != 72 or b[i + 1] != 84 or b[i + 2] != 84 or b[i + 3] != 80
                or b[i + 4] != 47 or not (48 <= b[i + 5] <= 57) or b[i + 6] != 46
                or not (48 <= b[i + 7] <= 57) or b[i + 8] != 13 or b[i + 9] != 10):
            return self._fail(400, "invalid request line")
        if b[i + 5] != 49 or (b[i + 7] != 48 and b[i + 7] != 49):
            return self._fail(505, "HTTP version not supported")
        self.http_version = 10 if b[i + 7] == 48 else 11
        # Request-target form: origin-form, "*" for OPTIONS, or absolute-form.
        b = b + t0
        if b[0] == 47:
            pass
        elif self.target_len == 1 and b[0] == 42:
            if not (self.method_len == 7 and memcmp(self.hbuf, b"OPTIONS", 7) == 0):
                return self._fail(400, "invalid request target")
        elif not ((self.target_len > 7 and _ieq(b, b"http://", 7))
                  or (self.target_len > 8 and _ieq(b, b"https://", 8))):
            return self._fail(400, "invalid request target")
        return i + 10

    cpdef int next_event(self):
        """Advance: NEED_DATA, HEAD, END or ERROR (sticky). See the module doc for the rules."""
        cdef int r
        cdef long long cl
        if self.state == S_HEAD:
            r = self._scan_head(True)
            if r <= 0:
                return EV_NEED_DATA if r == 0 else EV_ERROR
            self._take_head()
            r = self._parse_request_line()
            if r < 0 or self._parse_fields(r) < 0 or self._framing() < 0:
                return EV_ERROR
            if self.host_count > 1 or (self.host_count == 0 and self.http_version == 11):
                self._fail(400, "a request needs exactly one Host field")
                return EV_ERROR
            if self.flags & 1:
                self._fail(417, "only Expect: 100-continue is supported")
                return EV_ERROR
            if self.content_length > self.max_body and self.content_length > self.max_stream:
                self._fail(413, "request body too large")
                return EV_ERROR
            self.expect_continue = self.expect_100 and self.http_version == 11
            if self.http_version == 11:
                self.keep_alive = not self.conn_close
            else:
                # A chunked HTTP/1.0 request has faulty framing (RFC 9112 6.1): answered, then the connection
                # closes, so no bytes after it are read as a request (a front proxy may have framed it otherwise).
                self.keep_alive = self.conn_keepalive and not self.conn_close and not self.chunked
            self.state = S_BODY
            return EV_HEAD
        if self.state == S_BODY and self.streaming:
            return self._next_piece()
        if self.state == S_BODY:
            if self.content_length > self.max_body:      # allowed at the head only to be streamed
                self._fail(413, "request body too large")
                return EV_ERROR
            if self.chunked:
                r = self._dechunk(self.max_body, 0)
                if r <= 0:
                    return EV_NEED_DATA if r == 0 else EV_ERROR
                self.body = PyBytes_FromStringAndSize(self.bbuf, self.blen)
                self.blen = 0
            else:
                cl = self.content_length
                if cl > 0:
                    if self.end - self.pos < cl:
                        return EV_NEED_DATA
                    self.body = PyBytes_FromStringAndSize(self.buf + self.pos, cl)
                    self.pos += cl
                else:
                    self.body = b""
            self.state = S_DONE
            _message_over(self)
            return EV_END
        if self.state == S_DONE:
            return EV_NEED_DATA
        return EV_ERROR

    cpdef void stream_body(self) except *:
        """Hand this request's body out in BODY events (take_body()) instead of reading it whole. Only valid
        right after HEAD, on a parser made with max_stream_bytes > 0."""
        if self.state != S_BODY or self.max_stream == 0 or self.streaming:
            raise RuntimeError("stream_body() is only valid right after HEAD, with max_stream_bytes")
        self.streaming = True
        self.body_left = self.content_length if self.content_length > 0 else 0

    cdef int _next_piece(self):
        """next_event() in a streamed body: BODY when bytes are there (once until take_body()), END after."""
        cdef int r
        cdef Py_ssize_t avail
        if self.chunked:
            r = self._dechunk(self.max_stream, self.streamed)
            if r < 0:
                return EV_ERROR
            if self.blen:
                if self.announced:
                    return EV_NEED_DATA
                self.announced = True
                return EV_BODY
            if r == 0:
                return EV_NEED_DATA
        else:
            avail = self.end - self.pos
            if avail and self.body_left:
                if self.announced:
                    return EV_NEED_DATA
                self.announced = True
                return EV_BODY
            if self.body_left:
                return EV_NEED_DATA
        self.state = S_DONE
        _message_over(self)
        return EV_END

    cpdef bytes take_body(self):
        """The body bytes of a streamed body available now (after a BODY event)."""
        cdef bytes out
        cdef Py_ssize_t n
        self.announced = False
        if not self.streaming:
            return b""
        if self.chunked:
            out = PyBytes_FromStringAndSize(self.bbuf, self.blen)
            self.blen = 0
        else:
            n = self.end - self.pos
            if n > self.body_left:
                n = self.body_left
            out = PyBytes_FromStringAndSize(self.buf + self.pos, n)
            self.pos += n
            self.body_left -= n
        self.streamed += PyBytes_GET_SIZE(out)
        return out

    cpdef void start_next(self):
        """Begin the next (pipelined) request; bytes already fed are kept. Only valid after END."""
        if self.state != S_DONE:
            raise RuntimeError("start_next() is only valid after END")
        self._reset_head()
        self.body = b""

    @property
    def method(self):
        return PyBytes_FromStringAndSize(self.hbuf, self.method_len)

    @property
    def target(self):
        return PyBytes_FromStringAndSize(self.hbuf + self.target_off, self.target_len)

    def forward_head(self, bytes request_line, bytes extra_headers, long long content_length,
                     drop=None):
        """request_line + client fields (minus hop-by-hop, Connection-listed, host, content-length,
        expect and the lowercase names in `drop`) + extra_headers + content-length + CRLF.

        One allocation; names and values are copied as received.
        """
        cdef const char* dp[MAX_DROP]
        cdef Py_ssize_t dl[MAX_DROP]
        cdef int nd = 0, k, d
        cdef Py_ssize_t total, nl
        cdef Py_ssize_t* h
        cdef const unsigned char* nm
        cdef bytes out
        cdef char* w
        cdef bint keep
        if drop:
            for name in drop:
                if nd == MAX_DROP:
                    raise ValueError("drop holds too many names")
                dp[nd] = PyBytes_AS_STRING(<bytes?>name)
                dl[nd] = PyBytes_GET_SIZE(name)
                nd += 1
        total = PyBytes_GET_SIZE(request_line) + PyBytes_GET_SIZE(extra_headers) + 2
        if content_length >= 0:
            total += 18 + _dec_len(content_length)
        for k in range(self.nhdr):
            h = self.hdr + HSTRIDE * k
            nm = <const unsigned char*>self.hbuf + h[0]
            nl = h[1]
            keep = not (h[4] & DROP_REQ or (self.nconn and self._conn_listed(nm, nl)))
            if keep:
                for d in range(nd):
                    if dl[d] == nl and _ieq2(nm, <const unsigned char*>dp[d], nl):
                        keep = False
                        break
            if keep:
                h[4] &= ~SKIP
                total += nl + h[3] + 4
            else:
                h[4] |= SKIP
        out = PyBytes_FromStringAndSize(NULL, total)
        w = PyBytes_AS_STRING(out)
        w = _put(w, PyBytes_AS_STRING(request_line), PyBytes_GET_SIZE(request_line))
        w = _put_fields(w, self.hbuf, self.hdr, self.nhdr)
        w = _put(w, PyBytes_AS_STRING(extra_headers), PyBytes_GET_SIZE(extra_headers))
        if content_length >= 0:
            w = _put_length(w, content_length)
        _put(w, b"\r\n", 2)
        return out


cdef class ResponseParser(_Message):
    """Incremental parser for the responses on one upstream connection; bodies are streamed.

    Call start(head_request) before each response. next_event(): HEAD, then BODY (take_body())
    any number of times, then END; ERROR (error_status 502) is sticky. 1xx interim responses
    other than 101 are skipped; 101 is an error (the gateway never asks to switch protocols).
    """

    def __cinit__(self, Py_ssize_t max_head_bytes=65536, Py_ssize_t max_headers=200):
        self._alloc_headers(max_head_bytes, max_headers)
        self.lenient = True
        self.pending = None

    cdef void _reset_head(self):
        _Message._reset_head(self)
        self.status = 0
        self.reason_off = self.reason_len = 0
        self.framing = F_NONE
        self.remaining = 0
        self.announced = False

    def start(self, bint head_request=False):
        """Expect a new response (to a HEAD request when head_request: no body). Leftover bytes stay."""
        if self.state == S_ERROR:
            return
        self._reset_head()
        self.head_request = head_request
        self.pending = None

    cpdef void feed(self, data):
        """Buffer bytes from upstream. When they are exactly (part of) a length-delimited body and
        nothing else is buffered, the object itself is kept and handed back by take_body()."""
        cdef const unsigned char[:] view
        cdef Py_ssize_t n
        if self.state == S_ERROR:
            return
        if type(data) is not bytes:
            view = data
            if view.shape[0] == 0:
                return
            data = PyBytes_FromStringAndSize(<const char*>&view[0], view.shape[0])
        n = PyBytes_GET_SIZE(data)
        if n == 0:
            return
        self.announced = False
        if (self.state == S_BODY and (self.framing == F_LENGTH or self.framing == F_CLOSE)
                and self.pending is None and self.pos == self.end and n <= self.remaining):
            self.pending = data
            return
        if self.pending is not None:
            self._take(self.pending)
            self.pending = None
        self._take(data)

    def feed_eof(self):
        """The upstream closed the connection: ends a close-delimited body; an error elsewhere."""
        self.eof = True

    @property
    def buffered(self):
        return self.end - self.pos + (PyBytes_GET_SIZE(self.pending) if self.pending is not None else 0)

    cdef int _parse_status_line(self):
        cdef const unsigned char* b = <const unsigned char*>self.hbuf
        cdef Py_ssize_t i
        if (self.hlen < 16 or b[0] != 72 or b[1] != 84 or b[2] != 84 or b[3] != 80 or b[4] != 47
                or b[5] != 49 or b[6] != 46 or (b[7] != 48 and b[7] != 49) or b[8] != 32
                or not (49 <= b[9] <= 53) or not (48 <= b[10] <= 57) or not (48 <= b[11] <= 57)):
            return self._fail(502, "invalid status line from upstream")
        self.http_version = 10 if b[7] == 48 else 11
        self.status = (b[9] - 48) * 100 + (b[10] - 48) * 10 + (b[11] - 48)
        i = 12
        if b[i] == 32:     # lenient: the reason phrase (and its space) may be missing
            i += 1
            self.reason_off = i
            while FIELD[b[i]]:
                i += 1
            self.reason_len = i - self.reason_off
        if b[i] != 13 or b[i + 1] != 10:
            return self._fail(502, "invalid status line from upstream")
        return i + 2

    cdef int _upstream_fail(self):
        """Turn a parse error into the response parser's 502, keeping the message."""
        self.error_status = 502
        if not self.error_message.startswith("upstream"):
            self.error_message = "upstream sent an invalid response: " + self.error_message
        return EV_ERROR

    cpdef int next_event(self):
        """Advance: NEED_DATA, HEAD, BODY, END or ERROR (sticky)."""
        cdef int r
        cdef Py_ssize_t avail
        if self.state == S_HEAD:
            while True:
                r = self._scan_head(False)
                if r < 0:
                    return self._upstream_fail()
                if r == 0:
                    if self.eof:
                        if self.end == self.pos:
                            self._fail(502, "upstream closed the connection before sending a response")
                        else:
                            self._fail(502, "upstream closed the connection early")
                        return EV_ERROR
                    return EV_NEED_DATA
                self._take_head()
                r = self._parse_status_line()
                if r < 0 or self._parse_fields(r) < 0 or self._framing() < 0:
                    return self._upstream_fail()
                if self.status == 101:
                    self._fail(502, "upstream switched protocols (101)")
                    return EV_ERROR
                if self.status >= 200:
                    break
                r = self.head_request      # 1xx: skip it, keep waiting for the final response
                self._reset_head()
                self.head_request = r
            if self.head_request or self.status == 204 or self.status == 304:
                self.framing = F_NONE
            elif self.chunked:
                self.framing = F_CHUNKED
            elif self.content_length >= 0:
                self.framing = F_LENGTH
                self.remaining = self.content_length
            else:
                self.framing = F_CLOSE
                self.remaining = NO_LIMIT
            if self.framing == F_CLOSE:
                self.keep_alive = False
            elif self.http_version == 11:
                self.keep_alive = not self.conn_close
            else:
                self.keep_alive = self.conn_keepalive and not self.conn_close
            self.state = S_BODY
            self.announced = False
            return EV_HEAD
        if self.state == S_BODY:
            if self.framing == F_NONE:
                self.state = S_DONE
                _message_over(self)
                return EV_END
            if self.framing == F_CHUNKED:
                r = self._dechunk(-1, 0)
                if r < 0:
                    return self._upstream_fail()
                if self.blen and not self.announced:
                    self.announced = True
                    return EV_BODY
                if r == 1:
                    self.state = S_DONE
                    _message_over(self)
                    return EV_END
            else:
                if self.pending is not None:
                    avail = PyBytes_GET_SIZE(self.pending)
                else:
                    avail = self.end - self.pos
                    if avail > self.remaining:
                        avail = self.remaining
                if avail and not self.announced:
                    self.announced = True
                    return EV_BODY
                if self.remaining - avail == 0:
                    self.state = S_DONE
                    _message_over(self)
                    return EV_END
                if self.eof and self.framing == F_CLOSE:
                    self.state = S_DONE
                    _message_over(self)
                    return EV_END
            if self.eof:
                self._fail(502, "upstream closed the connection early")
                return EV_ERROR
            return EV_NEED_DATA
        if self.state == S_DONE:
            return EV_NEED_DATA
        return EV_ERROR

    def take_body(self):
        """All decoded body bytes available now (b"" if none); the fed object itself when possible."""
        cdef object out
        cdef Py_ssize_t k
        self.announced = False
        if self.pending is not None:
            out = self.pending
            self.pending = None
            self.remaining -= PyBytes_GET_SIZE(out)
            return out
        if self.framing == F_CHUNKED:
            if not self.blen:
                return b""
            out = PyBytes_FromStringAndSize(self.bbuf, self.blen)
            self.blen = 0
            return out
        if self.framing == F_LENGTH or self.framing == F_CLOSE:
            k = self.end - self.pos
            if k > self.remaining:
                k = self.remaining
            if k:
                out = PyBytes_FromStringAndSize(self.buf + self.pos, k)
                self.pos += k
                self.remaining -= k
                return out
        return b""

    @property
    def reason(self):
        return PyBytes_FromStringAndSize(self.hbuf + self.reason_off, self.reason_len)

    def forward_head(self, bytes extra_headers, bint chunked_to_client, long long content_length):
        """b"HTTP/1.1 <status> <reason>" + upstream fields (minus hop-by-hop, content-length,
        transfer-encoding, Connection-listed) + extra_headers + framing + CRLF. With neither
        chunked_to_client nor content_length >= 0, no framing field is written (close-delimited)."""
        cdef Py_ssize_t total, nl, k
        cdef Py_ssize_t* h
        cdef const unsigned char* nm
        cdef bytes out
        cdef char* w
        total = 9 + 4 + self.reason_len + 2 + PyBytes_GET_SIZE(extra_headers) + 2
        if chunked_to_client:
            total += 28
        elif content_length >= 0:
            total += 18 + _dec_len(content_length)
        for k in range(self.nhdr):
            h = self.hdr + HSTRIDE * k
            nm = <const unsigned char*>self.hbuf + h[0]
            nl = h[1]
            if not (h[4] & DROP_RESP or (self.nconn and self._conn_listed(nm, nl))):
                h[4] &= ~SKIP
                total += nl + h[3] + 4
            else:
                h[4] |= SKIP
        out = PyBytes_FromStringAndSize(NULL, total)
        w = PyBytes_AS_STRING(out)
        w = _put(w, b"HTTP/1.1 ", 9)
        w = _put_dec(w, self.status)
        w = _put(w, b" ", 1)
        w = _put(w, self.hbuf + self.reason_off, self.reason_len)
        w = _put(w, b"\r\n", 2)
        w = _put_fields(w, self.hbuf, self.hdr, self.nhdr)
        w = _put(w, PyBytes_AS_STRING(extra_headers), PyBytes_GET_SIZE(extra_headers))
        if chunked_to_client:
            w = _put(w, b"transfer-encoding: chunked\r\n", 28)
        elif content_length >= 0:
            w = _put_length(w, content_length)
        _put(w, b"\r\n", 2)
        return out


cdef const char* HEXDIGITS = b"0123456789abcdef"


def frame_chunk(bytes data):
    """One chunk of a chunked body: b"<hex len>\\r\\n" + data + b"\\r\\n". Empty data gives b""
    (an empty chunk would end the stream)."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data), digits = 0, m = n, k
    cdef bytes out
    cdef char* w
    if n == 0:
        return b""
    while m:
        digits += 1
        m >>= 4
    out = PyBytes_FromStringAndSize(NULL, digits + n + 4)
    w = PyBytes_AS_STRING(out)
    m = n
    for k in range(digits - 1, -1, -1):
        w[k] = HEXDIGITS[m & 15]
        m >>= 4
    w += digits
    w = _put(w, b"\r\n", 2)
    w = _put(w, PyBytes_AS_STRING(data), n)
    _put(w, b"\r\n", 2)
    return out


def response_head(int status, bytes reason, list headers_lines, long long content_length):
    """b"HTTP/1.1 <status> <reason>\\r\\n" + the pre-formatted lines + content-length (when >= 0)
    + CRLF: a head for the gateway's own responses, in one allocation."""
    cdef Py_ssize_t total
    cdef bytes out, line
    cdef char* w
    if not 100 <= status <= 999:
        raise ValueError("status must have three digits")
    total = 9 + 4 + PyBytes_GET_SIZE(reason) + 2 + 2
    for line in headers_lines:
        total += PyBytes_GET_SIZE(line)
    if content_length >= 0:
        total += 18 + _dec_len(content_length)
    out = PyBytes_FromStringAndSize(NULL, total)
    w = PyBytes_AS_STRING(out)
    w = _put(w, b"HTTP/1.1 ", 9)
    w = _put_dec(w, status)
    w = _put(w, b" ", 1)
    w = _put(w, PyBytes_AS_STRING(reason), PyBytes_GET_SIZE(reason))
    w = _put(w, b"\r\n", 2)
    for line in headers_lines:
        w = _put(w, PyBytes_AS_STRING(line), PyBytes_GET_SIZE(line))
    if content_length >= 0:
        w = _put_length(w, content_length)
    _put(w, b"\r\n", 2)
    return out
