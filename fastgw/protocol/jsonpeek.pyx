# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Read the few top-level fields the gateway needs from a JSON body, in one validating pass over the bytes.

The gateway moves bodies as bytes and must not json.loads/dumps them per request. `peek_request` walks
the raw bytes once, validating the whole document as strictly as orjson does (strings, escapes, UTF-8, the
number grammar and doubles that overflow to infinity, literals, trailing bytes), skips nested values without
building anything, and notes only the spans of the wanted top-level members. `peek_usage` reads an
upstream's response, which is forwarded unchanged: it only tells strings, containers and the top level
apart (no validation), which is all it takes to find the top-level "usage" object; `peek_response` does the
same and says whether the body is one JSON object by that structure (a success the relay may pass on). Python
objects are made only for the returned fields. `splice` rewrites spans (model, stream_options) with one
allocation.

Deliberate difference from orjson: nesting deeper than NESTING_LIMIT (512) containers is rejected; orjson has
no limit (and crashes the interpreter around 100k levels).

Bounds: every scanner relies on the NUL byte that CPython keeps after the data of a bytes/bytearray
object. A NUL is invalid at every place a scanner stops to look at a byte (it is neither whitespace, nor a
token, nor allowed raw in a string), so reaching the end reads that NUL and fails, and every multi-byte test
short-circuits at the first mismatch: no read goes past it. The wide skips (16 or 8 bytes at a time over
string contents and digits) check `end`.
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE, PyBytes_CheckExact
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_CheckExact
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uint64_t, int64_t
from fastgw.protocol.jsonskip cimport put_utf8
from libc.string cimport memcpy, memcmp, memchr
from libc.stdlib cimport malloc, free

ctypedef unsigned char uchar

cdef enum:
    MAX_DEPTH = 512   # containers a document may nest (the top-level object counts); deeper is invalid
NESTING_LIMIT = MAX_DEPTH

# Key ids, one namespace for every object kind we look into.
cdef enum:
    K_NONE = 0
    K_MODEL, K_STREAM, K_STREAM_OPTIONS, K_MAX_TOKENS, K_MAX_COMPLETION_TOKENS, K_MAX_OUTPUT_TOKENS
    K_N, K_USER
    K_INCLUDE_USAGE
    K_USAGE
    K_PROMPT_TOKENS, K_COMPLETION_TOKENS, K_INPUT_TOKENS, K_OUTPUT_TOKENS

# Which keys an object is searched for.
cdef enum:
    MODE_REQUEST = 0      # top level of a request body
    MODE_STREAM_OPTIONS   # the top-level "stream_options" object
    MODE_RESPONSE         # top level of a response body
    MODE_USAGE            # the top-level "usage" object of a response

# Everything the scan records; offsets are pointers into the body until the edge.
cdef struct Fields:
    const uchar* base
    const uchar* model_s
    const uchar* model_e
    const uchar* user_s
    const uchar* user_e
    const uchar* so_s
    const uchar* so_e
    const uchar* object_end
    bint stream
    bint include_usage
    bint has_n
    int64_t n
    int64_t max_tokens
    int64_t max_completion_tokens
    int64_t max_output_tokens
    bint usage_is_object
    int64_t prompt_tokens
    int64_t completion_tokens
    int64_t input_tokens
    int64_t output_tokens
    int members                     # top-level members seen (MODE_REQUEST), the first KEPT_MEMBERS kept:
    const uchar* member_name[KEPT_MEMBERS]    # each name's opening quote,
    const uchar* member_value[KEPT_MEMBERS]   # its value's first byte
    const uchar* member_end[KEPT_MEMBERS]     # and the byte after it

cdef signed char HEX[256]
cdef int _i
for _i in range(256):
    HEX[_i] = -1
for _i in range(10):
    HEX[48 + _i] = _i
for _i in range(6):
    HEX[65 + _i] = 10 + _i
    HEX[97 + _i] = 10 + _i

# Bytes that stand for themselves inside a string: printable ASCII but the quote and the backslash.
cdef bint PLAIN[256]
for _i in range(256):
    PLAIN[_i] = 0x20 <= _i < 0x80 and _i != 34 and _i != 92

# 2**1024 - 2**970: the smallest decimal value that rounds to +inf as a double (the halfway point above
# DBL_MAX; ties round to even, i.e. up to 2**1024). orjson rejects numbers that parse to infinity.
cdef bytes _INF_EDGE = (
    b"1797693134862315807937289714053034150799341327100378269361737789804449682927647509466490179775872070"
    b"9633028641669288791094655554785194040263065748867150582068190890200070838367627385484581771153176447"
    b"5730270069855571366959622842914819860834936475292719074168444365510704342711559699508093042880177904"
    b"174497792"
)   # 309 digits
cdef const uchar* INF_EDGE = <const uchar*>PyBytes_AS_STRING(_INF_EDGE)
cdef Py_ssize_t INF_EDGE_LEN = PyBytes_GET_SIZE(_INF_EDGE)


# JSON whitespace: one table load per byte instead of four compares.
cdef bint WS[256]
WS[32] = WS[10] = WS[13] = WS[9] = True


cdef inline const uchar* skip_ws(const uchar* p) noexcept nogil:
    while WS[p[0]]:
        p += 1
    return p


cdef inline int hex4(const uchar* p) noexcept nogil:
    """Value of 4 hex digits at p, or -1 (short-circuits at the first non-hex byte)."""
    cdef int a, b, c, d
    a = HEX[p[0]]
    if a < 0:
        return -1
    b = HEX[p[1]]
    if b < 0:
        return -1
    c = HEX[p[2]]
    if c < 0:
        return -1
    d = HEX[p[3]]
    if d < 0:
        return -1
    return (a << 12) | (b << 8) | (c << 4) | d


cdef const uchar* scan_escape(const uchar* p, int* cp) noexcept nogil:
    """p just after a backslash. Returns the byte after the escape (NULL if invalid); *cp gets the code
    point. A \\u high surrogate must be followed by a \\u low surrogate; a lone surrogate is invalid (as in
    orjson)."""
    cdef uchar c = p[0]
    cdef int u, lo
    if c == 34 or c == 92 or c == 47:   # " \ /
        cp[0] = c
    elif c == 98:
        cp[0] = 8
    elif c == 102:
        cp[0] = 12
    elif c == 110:
        cp[0] = 10
    elif c == 114:
        cp[0] = 13
    elif c == 116:
        cp[0] = 9
    elif c == 117:   # u
        u = hex4(p + 1)
        if u < 0:
            return NULL
        p += 5
        if 0xD800 <= u <= 0xDBFF:
            if p[0] != 92 or p[1] != 117:
                return NULL
            lo = hex4(p + 2)
            if lo < 0xDC00 or lo > 0xDFFF:
                return NULL
            cp[0] = 0x10000 + ((u - 0xD800) << 10) + (lo - 0xDC00)
            return p + 6
        if 0xDC00 <= u <= 0xDFFF:
            return NULL
        cp[0] = u
        return p
    else:
        return NULL
    return p + 1


cdef inline const uchar* scan_utf8(const uchar* p) noexcept nogil:
    """p at a byte >= 0x80. Returns the byte after one valid UTF-8 sequence, or NULL (overlongs,
    surrogates and code points above U+10FFFF are invalid)."""
    cdef uchar c = p[0]
    cdef uchar c1 = p[1]
    if 0xC2 <= c <= 0xDF:
        return p + 2 if (c1 & 0xC0) == 0x80 else NULL
    if 0xE0 <= c <= 0xEF:
        if c == 0xE0:
            if c1 < 0xA0 or c1 > 0xBF:
                return NULL
        elif c == 0xED:
            if c1 < 0x80 or c1 > 0x9F:
                return NULL
        elif (c1 & 0xC0) != 0x80:
            return NULL
        return p + 3 if (p[2] & 0xC0) == 0x80 else NULL
    if 0xF0 <= c <= 0xF4:
        if c == 0xF0:
            if c1 < 0x90 or c1 > 0xBF:
                return NULL
        elif c == 0xF4:
            if c1 < 0x80 or c1 > 0x8F:
                return NULL
        elif (c1 & 0xC0) != 0x80:
            return NULL
        if (p[2] & 0xC0) != 0x80:
            return NULL
        return p + 4 if (p[3] & 0xC0) == 0x80 else NULL
    return NULL


cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #if defined(__SSE2__)
    #include <emmintrin.h>
    #endif
    /* Long strings 32 bytes per step with AVX2 when the CPU has it (checked once at import): VEX's
       three-operand compares take a third of SSE2's instructions per byte. Each returns at the first stop
       byte, or with fewer than 32 bytes left (the SSE2 and word loops finish). */
    #if defined(__GNUC__) && defined(__x86_64__)
    #include <immintrin.h>
    #define JP_HAVE_AVX2_PATH 1
    static int jp_avx2 = 0;
    static void jp_detect(void) { __builtin_cpu_init(); jp_avx2 = __builtin_cpu_supports("avx2"); }
    __attribute__((target("avx2")))
    static const unsigned char* jp_plain_avx2(const unsigned char* p, const unsigned char* end) {
        const __m256i quote = _mm256_set1_epi8(0x22), bslash = _mm256_set1_epi8(0x5C),
                      space = _mm256_set1_epi8(0x20);
        while (end - p >= 32) {
            __m256i v = _mm256_loadu_si256((const __m256i*)p);
            __m256i m = _mm256_or_si256(_mm256_or_si256(_mm256_cmpeq_epi8(v, quote), _mm256_cmpeq_epi8(v, bslash)),
                                        _mm256_cmpgt_epi8(space, v));
            unsigned mask = (unsigned)_mm256_movemask_epi8(m);
            if (mask) return p + __builtin_ctz(mask);
            p += 32;
        }
        return p;
    }
    __attribute__((target("avx2")))
    static const unsigned char* jp_qb_avx2(const unsigned char* p, const unsigned char* end) {
        const __m256i quote = _mm256_set1_epi8(0x22), bslash = _mm256_set1_epi8(0x5C);
        while (end - p >= 32) {
            __m256i v = _mm256_loadu_si256((const __m256i*)p);
            unsigned mask = (unsigned)_mm256_movemask_epi8(
                _mm256_or_si256(_mm256_cmpeq_epi8(v, quote), _mm256_cmpeq_epi8(v, bslash)));
            if (mask) return p + __builtin_ctz(mask);
            p += 32;
        }
        return p;
    }
    #else
    static void jp_detect(void) {}
    #endif
    /* First byte at or after p that is a quote, a backslash, a control byte (< 0x20) or non-ASCII
       (>= 0x80); or, when none is found, a p with fewer than 8 bytes left before end. */
    static inline const unsigned char* jp_skip_plain(const unsigned char* p, const unsigned char* end) {
    #if defined(__SSE2__)
        const __m128i quote = _mm_set1_epi8(0x22), bslash = _mm_set1_epi8(0x5C), space = _mm_set1_epi8(0x20);
        /* signed compare: 0x20 > v holds for 0x00..0x1f and for 0x80..0xff (negative) */
    #define JP_PLAIN_STOP(v) _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, bslash)), \
                                          _mm_cmpgt_epi8(space, v))
    #ifdef JP_HAVE_AVX2_PATH
        /* most strings (keys, short values) end within 16 bytes: test those inline before the call */
        if (jp_avx2 && end - p >= 48) {
            int mask = _mm_movemask_epi8(JP_PLAIN_STOP(_mm_loadu_si128((const __m128i*)p)));
            if (mask) return p + __builtin_ctz((unsigned)mask);
            p = jp_plain_avx2(p + 16, end);
            if (end - p >= 32) return p;
        }
    #endif
        while (end - p >= 16) {
            __m128i v = _mm_loadu_si128((const __m128i*)p);
            int mask = _mm_movemask_epi8(JP_PLAIN_STOP(v));
            if (mask) return p + __builtin_ctz((unsigned)mask);
            p += 16;
        }
    #endif
        while (end - p >= 8) {
            uint64_t w, t, x, y;
            memcpy(&w, p, 8);
            x = w ^ 0x2222222222222222ULL;
            y = w ^ 0x5C5C5C5C5C5C5C5CULL;
            /* the lowest flagged byte is exact (borrows only flag bytes above a true hit) */
            t = (((w - 0x2020202020202020ULL) & ~w) | ((x - 0x0101010101010101ULL) & ~x)
                 | ((y - 0x0101010101010101ULL) & ~y) | w) & 0x8080808080808080ULL;
            if (t) return p + (__builtin_ctzll(t) >> 3);
            p += 8;
        }
        return p;
    }

    /* First byte at or after p that is not an ASCII digit. A digit byte b has high nibble 3 and so has
       b + 6; per byte that makes 0x33. Carries only spoil bytes above the first non-digit. */
    static inline const unsigned char* jp_skip_digits(const unsigned char* p, const unsigned char* end) {
        /* short runs (small integers) byte by byte; each test reads at most the NUL after the data */
        if ((unsigned)(p[0] - 48) >= 10) return p;
        if ((unsigned)(p[1] - 48) >= 10) return p + 1;
        if ((unsigned)(p[2] - 48) >= 10) return p + 2;
        p += 3;
        while (end - p >= 8) {
            uint64_t w, t;
            memcpy(&w, p, 8);
            t = ((w & 0xF0F0F0F0F0F0F0F0ULL) | (((w + 0x0606060606060606ULL) & 0xF0F0F0F0F0F0F0F0ULL) >> 4))
                ^ 0x3333333333333333ULL;
            if (t) return p + (__builtin_ctzll(t) >> 3);
            p += 8;
        }
        while ((unsigned)(*p - 48) < 10) p++;   /* stops at the NUL after the data at the latest */
        return p;
    }

    /* Non-validating skips for peek_usage: the first byte at or after p (before end) that is a quote or a
       backslash / that is a quote or a bracket ({ } [ ]); end when there is none. */
    static inline const unsigned char* jp_find_qb(const unsigned char* p, const unsigned char* end) {
    #if defined(__SSE2__)
        const __m128i quote = _mm_set1_epi8(0x22), bslash = _mm_set1_epi8(0x5C);
    #define JP_QB_STOP(v) _mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, bslash))
    #ifdef JP_HAVE_AVX2_PATH
        if (jp_avx2 && end - p >= 48) {
            int mask = _mm_movemask_epi8(JP_QB_STOP(_mm_loadu_si128((const __m128i*)p)));
            if (mask) return p + __builtin_ctz((unsigned)mask);
            p = jp_qb_avx2(p + 16, end);
            if (end - p >= 32) return p;
        }
    #endif

        while (end - p >= 16) {
            __m128i v = _mm_loadu_si128((const __m128i*)p);
            int mask = _mm_movemask_epi8(JP_QB_STOP(v));
            if (mask) return p + __builtin_ctz((unsigned)mask);
            p += 16;
        }
    #endif
        while (p < end && *p != 0x22 && *p != 0x5C) p++;
        return p;
    }

    static inline const unsigned char* jp_find_struct(const unsigned char* p, const unsigned char* end) {
    #if defined(__SSE2__)
        /* b | 0x20 is 0x7B for { and [, 0x7D for } and ] (and for no other byte) */
        const __m128i quote = _mm_set1_epi8(0x22), open = _mm_set1_epi8(0x7B), close = _mm_set1_epi8(0x7D),
                      bit = _mm_set1_epi8(0x20);
    #define JP_STRUCT_STOP(v) _mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_or_si128( \
            _mm_cmpeq_epi8(_mm_or_si128(v, bit), open), _mm_cmpeq_epi8(_mm_or_si128(v, bit), close)))

        while (end - p >= 16) {
            __m128i v = _mm_loadu_si128((const __m128i*)p);
            int mask = _mm_movemask_epi8(JP_STRUCT_STOP(v));
            if (mask) return p + __builtin_ctz((unsigned)mask);
            p += 16;
        }
    #endif
        while (p < end && *p != 0x22 && (*p | 0x20) != 0x7B && (*p | 0x20) != 0x7D) p++;
        return p;
    }
    """
    void jp_detect() nogil
    const uchar* jp_skip_plain(const uchar* p, const uchar* end) nogil
    const uchar* jp_skip_digits(const uchar* p, const uchar* end) nogil
    const uchar* jp_find_qb(const uchar* p, const uchar* end) nogil
    const uchar* jp_find_struct(const uchar* p, const uchar* end) nogil


jp_detect()   # use AVX2 for long strings when the CPU has it


cdef const uchar* scan_string(const uchar* p, const uchar* end, bint* esc) noexcept nogil:
    """p just after the opening quote. Returns the byte after the closing quote, or NULL. Sets *esc when
    the string holds a backslash escape (it then needs decoding)."""
    cdef uchar c
    cdef int cp, run
    while True:
        p = jp_skip_plain(p, end)   # fast path over plain ASCII, 16 or 8 bytes at a time
        c = p[0]
        if c == 34:
            return p + 1
        if c < 0x20:
            return NULL
        if c == 92:
            esc[0] = True
            p = scan_escape(p + 1, &cp)
            if p == NULL:
                return NULL
        elif c < 0x80:
            p += 1
        else:
            # Non-ASCII text (accents, CJK, emoji) interleaves short ASCII runs with multi-byte
            # characters: walk it here byte by byte rather than re-entering the wide skip per character.
            run = 0
            while True:
                c = p[0]
                if c >= 0x80:
                    p = scan_utf8(p)
                    if p == NULL:
                        return NULL
                    run = 0
                elif PLAIN[c]:
                    p += 1
                    run += 1
                    if run == 16:
                        break
                else:
                    break


cdef bint number_is_inf(const uchar* s, const uchar* e) noexcept nogil:
    """Whether a grammatical JSON number (s..e) parses to +-infinity as a double. Write it 0.D x 10**E
    with D its significant digits; it is infinite iff E > 309, or E == 309 and D >= INF_EDGE."""
    cdef const uchar* p = s
    cdef int64_t E = 0, x = 0
    cdef int xsign = 1
    cdef bint seen_nonzero = False, in_frac = False
    cdef const uchar* first = NULL   # first significant digit
    if p[0] == 45:
        p += 1
    # Position of the first significant digit relative to the decimal point.
    while p < e and p[0] != 101 and p[0] != 69:
        if p[0] == 46:
            in_frac = True
        elif not seen_nonzero:
            if p[0] != 48:
                seen_nonzero = True
                first = p
                if not in_frac:
                    E += 1
            elif in_frac:
                E -= 1
        elif not in_frac:
            E += 1
        p += 1
    if not seen_nonzero:
        return False
    if p < e:
        p += 1
        if p[0] == 45:
            xsign = -1
            p += 1
        elif p[0] == 43:
            p += 1
        while p < e:
            if x < 1000000000:   # beyond this the verdict cannot change; avoid overflow
                x = x * 10 + (p[0] - 48)
            p += 1
    E += xsign * x
    if E != INF_EDGE_LEN:
        return E > INF_EDGE_LEN
    # Same magnitude as the edge: compare digit by digit (missing digits are zeros).
    cdef Py_ssize_t i = 0
    p = first
    while i < INF_EDGE_LEN:
        while p < e and p[0] == 46:
            p += 1
        if p < e and p[0] != 101 and p[0] != 69:
            if p[0] != INF_EDGE[i]:
                return p[0] > INF_EDGE[i]
            p += 1
        else:
            return False   # the rest are zeros, and the edge has a non-zero digit left (it ends in 2)
        i += 1
    return True   # equal to the edge on all its digits: at or above it


cdef const uchar* scan_number(const uchar* p, const uchar* end) noexcept nogil:
    """p at '-' or a digit. Returns the byte after the number, or NULL (grammar, or infinite value)."""
    cdef const uchar* s = p
    cdef const uchar* s2
    cdef bint slow = False
    if p[0] == 45:
        p += 1
    if p[0] == 48:
        p += 1
    elif 49 <= p[0] <= 57:
        s2 = jp_skip_digits(p + 1, end)
        slow = s2 - p > 308   # more integer digits than a finite double can have: check exactly
        p = s2
    else:
        return NULL
    if p[0] == 46:
        p += 1
        if not (48 <= p[0] <= 57):
            return NULL
        p = jp_skip_digits(p + 1, end)
    if p[0] == 101 or p[0] == 69:
        slow = True
        p += 1
        if p[0] == 43 or p[0] == 45:
            p += 1
        if not (48 <= p[0] <= 57):
            return NULL
        p = jp_skip_digits(p + 1, end)
    # A leading zero followed by digits ("01") ends the number at "0"; the caller then fails on "1".
    if slow and number_is_inf(s, p):
        return NULL
    return p


cdef inline const uchar* scan_literal(const uchar* p) noexcept nogil:
    cdef uchar c = p[0]
    if c == 116:
        if p[1] == 114 and p[2] == 117 and p[3] == 101:
            return p + 4
    elif c == 102:
        if p[1] == 97 and p[2] == 108 and p[3] == 115 and p[4] == 101:
            return p + 5
    elif c == 110:
        if p[1] == 117 and p[2] == 108 and p[3] == 108:
            return p + 4
    return NULL


cdef inline const uchar* scan_key(const uchar* p, const uchar* end) noexcept nogil:
    """p at a member's key. Returns the start of its value (after the colon and whitespace), or NULL."""
    cdef bint esc = False
    if p[0] != 34:
        return NULL
    p = scan_string(p + 1, end, &esc)
    if p == NULL:
        return NULL
    p = skip_ws(p)
    if p[0] != 58:
        return NULL
    return skip_ws(p + 1)


cdef const uchar* scan_value(const uchar* p, const uchar* end, int depth) noexcept nogil:
    """p at the first byte of a value inside `depth` open containers. Validates and skips it, iteratively
    (no recursion however deep); returns the byte after it, or NULL."""
    cdef uchar stack[MAX_DEPTH]
    cdef int sp = 0
    cdef uchar c
    cdef bint esc
    while True:
        # One value: a scalar, or the opening of a container (then loop for its first element).
        c = p[0]
        if c == 34:
            p = scan_string(p + 1, end, &esc)
        elif c == 123 or c == 91:   # { [
            if depth + sp >= MAX_DEPTH:
                return NULL
            stack[sp] = c
            sp += 1
            p = skip_ws(p + 1)
            if p[0] == c + 2:       # } or ]: empty container
                sp -= 1
                p += 1
            elif c == 123:
                p = scan_key(p, end)
                if p == NULL:
                    return NULL
                continue
            else:
                continue
        elif c == 45 or 48 <= c <= 57:
            p = scan_number(p, end)
        else:
            p = scan_literal(p)
        if p == NULL:
            return NULL
        # After a complete value: close containers, or step to the next element.
        while True:
            if sp == 0:
                return p
            p = skip_ws(p)
            c = p[0]
            if c == 44:   # ,
                p = skip_ws(p + 1)
                if stack[sp - 1] == 123:
                    p = scan_key(p, end)
                    if p == NULL:
                        return NULL
                break
            elif c == stack[sp - 1] + 2:
                sp -= 1
                p += 1
            else:
                return NULL


cdef Py_ssize_t unescape(const uchar* s, const uchar* e, uchar* out, Py_ssize_t cap) noexcept nogil:
    """Decode the validated string body s..e into UTF-8 at out. Returns the length, or -1 if over cap.
    The decoded form is never longer than the escaped one."""
    cdef Py_ssize_t n = 0
    cdef int cp = 0
    while s < e:
        if n + 4 > cap:
            return -1
        if s[0] != 92:
            out[n] = s[0]
            n += 1
            s += 1
            continue
        s = scan_escape(s + 1, &cp)
        n += put_utf8(out + n, cp)
    return n


cdef inline bint eq(const uchar* k, Py_ssize_t n, const char* lit, Py_ssize_t m) noexcept nogil:
    return n == m and memcmp(k, lit, m) == 0


cdef int match_key(const uchar* k, Py_ssize_t n, int mode) noexcept nogil:
    """Key id of the decoded key k[:n] among the keys wanted in this kind of object."""
    if mode == MODE_REQUEST:
        if n == 5 and eq(k, n, b"model", 5):
            return K_MODEL
        if n == 6 and eq(k, n, b"stream", 6):
            return K_STREAM
        if n == 14 and eq(k, n, b"stream_options", 14):
            return K_STREAM_OPTIONS
        if n == 10 and eq(k, n, b"max_tokens", 10):
            return K_MAX_TOKENS
        if n == 21 and eq(k, n, b"max_completion_tokens", 21):
            return K_MAX_COMPLETION_TOKENS
        if n == 17 and eq(k, n, b"max_output_tokens", 17):
            return K_MAX_OUTPUT_TOKENS
        if n == 1 and k[0] == 110:
            return K_N
        if n == 4 and eq(k, n, b"user", 4):
            return K_USER
    elif mode == MODE_STREAM_OPTIONS:
        if eq(k, n, b"include_usage", 13):
            return K_INCLUDE_USAGE
    elif mode == MODE_RESPONSE:
        if eq(k, n, b"usage", 5):
            return K_USAGE
    elif mode == MODE_USAGE:
        if eq(k, n, b"prompt_tokens", 13):
            return K_PROMPT_TOKENS
        if eq(k, n, b"completion_tokens", 17):
            return K_COMPLETION_TOKENS
        if eq(k, n, b"input_tokens", 12):
            return K_INPUT_TOKENS
        if eq(k, n, b"output_tokens", 13):
            return K_OUTPUT_TOKENS
    return K_NONE


cdef int64_t int_value(const uchar* s, const uchar* e) noexcept nogil:
    """A validated JSON number s..e as a non-negative int64 when it is an integer in [0, 2**63) (what
    orjson turns into a Python int there; "-0" is 0), else -1 (fractions, exponents, negatives, bigger)."""
    cdef bint neg = False
    cdef uint64_t v = 0
    if s[0] == 45:
        neg = True
        s += 1
    if e - s > 19:
        return -1
    while s < e:
        if not (48 <= s[0] <= 57):
            return -1
        v = v * 10 + (s[0] - 48)
        s += 1
    if v > <uint64_t>0x7FFFFFFFFFFFFFFF or (neg and v != 0):
        return -1
    return <int64_t>v


cdef void record(Fields* f, int kid, const uchar* vs, const uchar* ve) noexcept nogil:
    """Note a wanted member's value (validated, vs..ve). A later duplicate overrides, as in orjson."""
    cdef uchar c = vs[0]
    cdef bint num = c == 45 or 48 <= c <= 57
    if kid == K_MODEL:
        f.model_s = vs
        f.model_e = ve
    elif kid == K_STREAM:
        f.stream = c == 116
    elif kid == K_STREAM_OPTIONS:
        f.so_s = vs
        f.so_e = ve
        if c != 123:
            f.include_usage = False
    elif kid == K_INCLUDE_USAGE:
        f.include_usage = c == 116
    elif kid == K_MAX_TOKENS:
        f.max_tokens = int_value(vs, ve) if num else -1
    elif kid == K_MAX_COMPLETION_TOKENS:
        f.max_completion_tokens = int_value(vs, ve) if num else -1
    elif kid == K_MAX_OUTPUT_TOKENS:
        f.max_output_tokens = int_value(vs, ve) if num else -1
    elif kid == K_N:
        f.has_n = True
        f.n = int_value(vs, ve) if num else -1
    elif kid == K_USER:
        f.user_s = vs
        f.user_e = ve
    elif kid == K_USAGE:
        f.usage_is_object = c == 123
    elif kid == K_PROMPT_TOKENS:
        f.prompt_tokens = int_value(vs, ve) if num else -1
    elif kid == K_COMPLETION_TOKENS:
        f.completion_tokens = int_value(vs, ve) if num else -1
    elif kid == K_INPUT_TOKENS:
        f.input_tokens = int_value(vs, ve) if num else -1
    elif kid == K_OUTPUT_TOKENS:
        f.output_tokens = int_value(vs, ve) if num else -1


cdef inline const uchar* read_key(const uchar* p, const uchar* end, int mode, int* kid) noexcept nogil:
    """p at the opening quote of a member's key: sets *kid (escaped keys, "mod\\u0065l", are decoded first, as
    orjson and upstreams read them); returns the start of the value after ':', or NULL if malformed."""
    cdef const uchar* ks
    cdef bint esc = False
    cdef uchar kbuf[32]
    cdef Py_ssize_t kn
    if p[0] != 34:
        return NULL
    ks = p + 1
    p = scan_string(ks, end, &esc)   # keys are short: always validated
    if p == NULL:
        return NULL
    if not esc:
        kid[0] = match_key(ks, p - 1 - ks, mode)
    else:
        kn = unescape(ks, p - 1, kbuf, 32)
        kid[0] = match_key(kbuf, kn, mode) if kn >= 0 else K_NONE
    p = skip_ws(p)
    if p[0] != 58:
        return NULL
    return skip_ws(p + 1)


cdef const uchar* scan_object(const uchar* p, const uchar* end, int depth, Fields* f, int mode) noexcept nogil:
    """p at '{' of an object at nesting level `depth` (top level = 1) whose keys are matched per `mode`.
    Validates it; returns the byte after its closing brace, or NULL."""
    cdef const uchar* vs
    cdef const uchar* ks
    cdef int kid
    if depth > MAX_DEPTH:
        return NULL
    p = skip_ws(p + 1)
    if p[0] != 125:
        while True:
            ks = p
            vs = read_key(p, end, mode, &kid)
            if vs == NULL:
                return NULL
            if kid == K_STREAM_OPTIONS and vs[0] == 123:
                f.include_usage = False
                p = scan_object(vs, end, depth + 1, f, MODE_STREAM_OPTIONS)
            elif kid == K_USAGE and vs[0] == 123:
                f.prompt_tokens = f.completion_tokens = f.input_tokens = f.output_tokens = -1
                p = scan_object(vs, end, depth + 1, f, MODE_USAGE)
            else:
                p = scan_value(vs, end, depth)
            if p == NULL:
                return NULL
            if kid != K_NONE:
                record(f, kid, vs, p)
            if depth == 1 and mode == MODE_REQUEST:
                if f.members < KEPT_MEMBERS:
                    f.member_name[f.members] = ks
                    f.member_value[f.members] = vs
                    f.member_end[f.members] = p
                f.members += 1
            p = skip_ws(p)
            if p[0] == 44:
                p = skip_ws(p + 1)
            elif p[0] == 125:
                break
            else:
                return NULL
    if depth == 1:
        f.object_end = p
    return p + 1


# -- peek_usage: a light, non-validating scan ---------------------------------------------------------------
# Every relayed response is scanned once, for its usage and (peek_response) its structure, so the scan stays
# light: a full validation costs ~45% more on a chat body, 8x on an embedding. The light scan still tells
# strings, nested containers and the top level apart exactly as a parser does (a "usage" inside a string or a
# nested object never counts), and never reads outside [s, end] (the NUL after the data included).

# Bytes that end a scalar (number or literal) value.
cdef bint SCALAR_END[256]
for _i in range(256):
    SCALAR_END[_i] = _i in b',:}] \t\r\n"{['


cdef inline const uchar* light_string(const uchar* p, const uchar* end) noexcept nogil:
    """p just after an opening quote. Returns the byte after the closing quote, or NULL at the end."""
    while True:
        p = jp_find_qb(p, end)
        if p >= end:
            return NULL
        if p[0] == 34:
            return p + 1
        p += 2   # a backslash and the byte it escapes (\u's hex digits are neither quote nor backslash)


cdef const uchar* light_value(const uchar* p, const uchar* end) noexcept nogil:
    """p at the first byte of a value (p <= end). Returns the byte after it, or NULL. Containers are skipped
    by bracket matching outside strings (any depth, no stack)."""
    cdef uchar c = p[0]
    cdef const uchar* s = p
    cdef Py_ssize_t depth
    if c == 34:
        return light_string(p + 1, end)
    if c == 123 or c == 91:
        depth = 1
        p += 1
        while True:
            p = jp_find_struct(p, end)
            if p >= end:
                return NULL
            c = p[0]
            p += 1
            if c == 34:
                p = light_string(p, end)
                if p == NULL:
                    return NULL
            elif (c | 0x20) == 123:
                depth += 1
            else:
                depth -= 1
                if depth == 0:
                    return p
    while p < end and not SCALAR_END[p[0]]:
        p += 1
    return p if p > s else NULL


cdef const uchar* light_object(const uchar* p, const uchar* end, Fields* f, int mode) noexcept nogil:
    """p at '{' of the top-level object (MODE_RESPONSE) or of its "usage" object (MODE_USAGE). Notes the
    wanted members; returns the byte after the closing brace, or NULL."""
    cdef const uchar* vs
    cdef int kid
    p = skip_ws(p + 1)
    if p[0] == 125:
        return p + 1
    while True:
        vs = read_key(p, end, mode, &kid)
        if vs == NULL:
            return NULL
        if kid == K_USAGE and vs[0] == 123:
            f.prompt_tokens = f.completion_tokens = f.input_tokens = f.output_tokens = -1
            p = light_object(vs, end, f, MODE_USAGE)
        else:
            p = light_value(vs, end)
        if p == NULL:
            return NULL
        if kid != K_NONE:
            record(f, kid, vs, p)
        p = skip_ws(p)
        if p[0] == 44:
            p = skip_ws(p + 1)
        elif p[0] == 125:
            return p + 1
        else:
            return NULL


cdef inline void fields_init(Fields* f, const uchar* base) noexcept nogil:
    f.base = base
    f.model_s = f.model_e = f.user_s = f.user_e = f.so_s = f.so_e = f.object_end = NULL
    f.stream = f.include_usage = f.has_n = f.usage_is_object = False
    f.n = f.max_tokens = f.max_completion_tokens = f.max_output_tokens = -1
    f.prompt_tokens = f.completion_tokens = f.input_tokens = f.output_tokens = -1
    f.members = 0


cdef bint scan_document(object body, Fields* f, int mode) except -1:
    """Validate the whole body as one JSON object (surrounding whitespace allowed), filling f. Returns
    whether it is one."""
    cdef const uchar* s
    cdef Py_ssize_t n
    cdef const uchar* p
    cdef const uchar* end
    if PyBytes_CheckExact(body):
        s = <const uchar*>PyBytes_AS_STRING(body)
        n = PyBytes_GET_SIZE(body)
    elif PyByteArray_CheckExact(body):
        s = <const uchar*>PyByteArray_AS_STRING(body)
        n = PyByteArray_GET_SIZE(body)
    else:
        raise TypeError(f"expected bytes or bytearray, got {type(body).__name__}")
    end = s + n
    fields_init(f, s)
    # The GIL stays held: a scan takes about a microsecond (less than dropping and retaking it), and a
    # bytearray must not change under the scan.
    p = skip_ws(s)
    if p[0] != 123:
        return False
    p = scan_object(p, end, 1, f, mode)
    if p == NULL:
        return False
    return skip_ws(p) == end


cdef str decode_str(const uchar* s, const uchar* e):
    """The Python str of a validated JSON string token s..e (quotes included)."""
    cdef Py_ssize_t n = e - s - 2
    cdef uchar sbuf[260]
    cdef uchar* buf
    s += 1
    if memchr(s, 92, n) == NULL:
        return PyUnicode_DecodeUTF8(<const char*>s, n, NULL)
    if n <= 256:
        buf = &sbuf[0]
    else:
        buf = <uchar*>malloc(n + 4)
        if buf == NULL:
            raise MemoryError()
    try:
        n = unescape(s, s + n, buf, n + 4)
        return PyUnicode_DecodeUTF8(<const char*>buf, n, NULL)
    finally:
        if buf != &sbuf[0]:
            free(buf)


@cython.freelist(16)
cdef class RequestFields:
    """The top-level request fields the gateway reads; see peek_request. Offsets index the body bytes. Its
    fields are declared in jsonpeek.pxd."""

    def member_spans(self):
        """[(name start, value start, value end)] of the kept top-level members, in body order (for tests)."""
        return [(self.member_name[k], self.member_value[k], self.member_end[k])
                for k in range(self.members if self.members < KEPT_MEMBERS else KEPT_MEMBERS)]

    def __repr__(self):
        return (f"RequestFields(model={self.model!r}, model_start={self.model_start}, "
                f"model_end={self.model_end}, stream={self.stream}, "
                f"stream_options_start={self.stream_options_start}, "
                f"stream_options_end={self.stream_options_end}, include_usage={self.include_usage}, "
                f"object_end={self.object_end}, has_n={self.has_n}, n={self.n}, "
                f"max_tokens={self.max_tokens}, user={self.user!r})")


cdef inline Py_ssize_t off(const uchar* p, const uchar* base) noexcept:
    return p - base if p != NULL else -1


def peek_request(body):
    """Validate a request body (bytes or bytearray) as one JSON object and read its top-level fields.

    Returns None unless the whole body is a JSON object that orjson would accept (the gateway then answers
    400 "invalid JSON"). Duplicate keys: the last one counts, as in orjson.
    """
    cdef Fields f
    if not scan_document(body, &f, MODE_REQUEST):
        return None
    cdef RequestFields r = RequestFields.__new__(RequestFields)
    cdef const uchar* b = f.base
    if f.model_s != NULL and f.model_s[0] == 34:
        r.model = decode_str(f.model_s, f.model_e)
    else:
        r.model = None
    r.model_start = off(f.model_s, b)
    r.model_end = off(f.model_e, b)
    r.stream = f.stream
    r.stream_options_start = off(f.so_s, b)
    r.stream_options_end = off(f.so_e, b)
    r.include_usage = f.include_usage
    r.object_end = f.object_end - b
    r.has_n = f.has_n
    r.n = f.n
    if f.max_completion_tokens >= 0:
        r.max_tokens = f.max_completion_tokens
    elif f.max_tokens >= 0:
        r.max_tokens = f.max_tokens
    else:
        r.max_tokens = f.max_output_tokens
    if f.user_s != NULL and f.user_s[0] == 34:
        r.user = decode_str(f.user_s, f.user_e)
    else:
        r.user = None
    r.members = f.members
    cdef int k
    for k in range(f.members if f.members < KEPT_MEMBERS else KEPT_MEMBERS):
        r.member_name[k] = f.member_name[k] - b
        r.member_value[k] = f.member_value[k] - b
        r.member_end[k] = f.member_end[k] - b
    return r


def peek_usage(body):
    """(prompt_tokens, completion_tokens) from the top-level "usage" object of a response body.

    Chat/completions/embeddings name them prompt_tokens/completion_tokens, the Responses API
    input_tokens/output_tokens; a count that is missing (embeddings have no completion_tokens) or not a
    non-negative integer is 0. (-1, -1) when there is no top-level "usage" object or the body is not a
    JSON object. The body is not validated (it is forwarded as is): on a malformed body the result is
    (-1, -1) or counts read from it, never a crash or a read out of bounds.
    """
    cdef Fields f
    if light_document(body, &f) < 0:
        return (-1, -1)
    return usage_of(&f)


def peek_response(body):
    """What peek_usage returns, or None when the body is not one JSON object by its structure: the relay's check
    that a success it passes on is one a client can parse.

    Structure is what the light scan sees: an object, its members, strings, nested containers, nothing but
    whitespace after it. That refuses what broken upstreams send (a truncated or empty body, an HTML or text
    page, an array, bytes after the object) for no more than peek_usage costs. Scalars and the bytes inside
    strings are not checked ({"a":tru} passes); peek_request's validation would add ~45% to a chat response's
    scan and 8x to an embedding's. A body orjson accepts as an object is never refused.
    """
    cdef Fields f
    if light_document(body, &f) < 1:
        return None
    return usage_of(&f)


cdef int light_document(object body, Fields* f) except -2:
    """Light-scan a response body into f: 1 when it is one JSON object by its structure, 0 when such an object
    is followed by other bytes, -1 when there is no whole top-level object."""
    cdef const uchar* s
    cdef const uchar* p
    cdef Py_ssize_t n
    if PyBytes_CheckExact(body):
        s = <const uchar*>PyBytes_AS_STRING(body)
        n = PyBytes_GET_SIZE(body)
    elif PyByteArray_CheckExact(body):
        s = <const uchar*>PyByteArray_AS_STRING(body)
        n = PyByteArray_GET_SIZE(body)
    else:
        raise TypeError(f"expected bytes or bytearray, got {type(body).__name__}")
    fields_init(f, s)
    p = skip_ws(s)
    if p[0] != 123:
        return -1
    p = light_object(p, s + n, f, MODE_RESPONSE)
    if p == NULL:
        return -1
    return 1 if skip_ws(p) == s + n else 0


cdef tuple usage_of(Fields* f):
    """(prompt_tokens, completion_tokens) of a scanned response (see peek_usage)."""
    cdef int64_t prompt, completion
    if not f.usage_is_object:
        return (-1, -1)
    prompt = f.prompt_tokens if f.prompt_tokens >= 0 else f.input_tokens
    completion = f.completion_tokens if f.completion_tokens >= 0 else f.output_tokens
    return (prompt if prompt >= 0 else 0, completion if completion >= 0 else 0)


def splice(bytes body not None, list edits not None):
    """body with body[start:end] replaced by data for each (start, end, data) in edits, in one allocation.

    Edits must be in increasing order and not overlap (start == end inserts). Raises ValueError otherwise.
    """
    cdef Py_ssize_t n = PyBytes_GET_SIZE(body)
    cdef Py_ssize_t total = n, last = 0, start, stop
    cdef object edit
    cdef bytes data
    for edit in edits:
        start, stop, data = edit
        if start < last or stop < start or stop > n:
            raise ValueError(f"edit ({start}, {stop}) is out of order, overlapping or out of range")
        total += PyBytes_GET_SIZE(data) - (stop - start)
        last = stop
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* o = PyBytes_AS_STRING(out)
    cdef const char* src = PyBytes_AS_STRING(body)
    cdef Py_ssize_t dn
    last = 0
    for edit in edits:
        start, stop, data = edit
        memcpy(o, src + last, start - last)
        o += start - last
        dn = PyBytes_GET_SIZE(data)
        memcpy(o, PyBytes_AS_STRING(data), dn)
        o += dn
        last = stop
    memcpy(o, src + last, n - last)
    return out
