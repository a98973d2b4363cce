# Skipping over JSON without reading it, shared by the compiled modules that look into request and event
# bodies (sse, tokens); and json_valid, the check of an event the relay reads (at the end). All take the buffer d[0:n] and a position; they return the position after the thing,
# or -1 when the JSON is malformed or cut. They never read outside d[0:n]. Inline: these run per byte run.
# Also put_utf8, which writes the code point of a decoded \uXXXX escape (jsonpeek, tokens).

from libc.string cimport memchr


cdef inline Py_ssize_t put_utf8(unsigned char* out, int cp) noexcept nogil:
    """Write code point cp (< 0x110000; lone surrogates as UTF-8-style bytes) at out; returns 1 to 4 bytes."""
    if cp < 0x80:
        out[0] = cp
        return 1
    if cp < 0x800:
        out[0] = 0xC0 | (cp >> 6)
        out[1] = 0x80 | (cp & 0x3F)
        return 2
    if cp < 0x10000:
        out[0] = 0xE0 | (cp >> 12)
        out[1] = 0x80 | ((cp >> 6) & 0x3F)
        out[2] = 0x80 | (cp & 0x3F)
        return 3
    out[0] = 0xF0 | (cp >> 18)
    out[1] = 0x80 | ((cp >> 12) & 0x3F)
    out[2] = 0x80 | ((cp >> 6) & 0x3F)
    out[3] = 0x80 | (cp & 0x3F)
    return 4


cdef inline Py_ssize_t skip_ws(const unsigned char* d, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    while i < n and (d[i] == 32 or d[i] == 10 or d[i] == 13 or d[i] == 9):
        i += 1
    return i


cdef inline Py_ssize_t skip_string(const unsigned char* d, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    # d[i] is the opening quote. A quote closes the string when an even number of backslashes precede it.
    cdef const unsigned char* q
    cdef Py_ssize_t j, k
    i += 1
    while i < n:
        q = <const unsigned char*>memchr(d + i, 34, n - i)
        if q == NULL:
            return -1
        j = q - d
        k = j
        while d[k - 1] == 92:  # the opening quote stops this walk
            k -= 1
        if ((j - k) & 1) == 0:
            return j + 1
        i = j + 1
    return -1


cdef inline Py_ssize_t skip_scalar(const unsigned char* d, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    # number, true, false, null: up to the next delimiter; an empty one is malformed
    cdef Py_ssize_t s = i
    cdef unsigned char c
    while i < n:
        c = d[i]
        if c == 44 or c == 125 or c == 93 or c == 32 or c == 10 or c == 13 or c == 9 or c == 58:
            break
        i += 1
    return i if i > s else -1


cdef inline Py_ssize_t skip_value(const unsigned char* d, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    cdef unsigned char c
    cdef Py_ssize_t depth = 0
    if i >= n:
        return -1
    c = d[i]
    if c == 34:
        return skip_string(d, i, n)
    if c == 123 or c == 91:  # { [ : skip to the matching close, strings skipped whole
        while i < n:
            c = d[i]
            if c == 34:
                i = skip_string(d, i, n)
                if i < 0:
                    return -1
                continue
            if c == 123 or c == 91:
                depth += 1
            elif c == 125 or c == 93:
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return -1
    return skip_scalar(d, i, n)


# -- validating: whether bytes are one JSON document, as Python reads them ------------------------------------
# The SSE relay takes usage and text only from events that are JSON. What that means is Python's json.loads on
# the strictly decoded UTF-8 text (its tests' reference), without NaN/Infinity (not JSON) and with at most
# JSON_MAX_DEPTH nested containers: RFC 8259's grammar, raw bytes well-formed UTF-8, any \uXXXX escape (a lone
# surrogate too, as Python takes it), numbers of any size. Every read is checked against n (no sentinel).

cdef enum:
    JSON_MAX_DEPTH = 512


cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    /* The first byte at or after p (before end) that is a quote, a backslash, a control byte or non-ASCII;
       end when there is none. 8 bytes at a time (as jsonpeek's wide skip): the lowest flagged byte is exact,
       borrows only flag bytes above a true hit. */
    static inline const unsigned char* js_plain_end(const unsigned char* p, const unsigned char* end) {
        while (end - p >= 8) {
            uint64_t w, x, y, t;
            memcpy(&w, p, 8);
            x = w ^ 0x2222222222222222ULL;
            y = w ^ 0x5C5C5C5C5C5C5C5CULL;
            t = (((w - 0x2020202020202020ULL) & ~w) | ((x - 0x0101010101010101ULL) & ~x)
                 | ((y - 0x0101010101010101ULL) & ~y) | w) & 0x8080808080808080ULL;
            if (t) return p + (__builtin_ctzll(t) >> 3);
            p += 8;
        }
        while (p < end && *p >= 0x20 && *p < 0x80 && *p != 0x22 && *p != 0x5C) p++;
        return p;
    }
    """
    const unsigned char* js_plain_end(const unsigned char* p, const unsigned char* end) noexcept nogil


cdef inline Py_ssize_t utf8_seq(const unsigned char* d, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """d[i] >= 0x80: the index after one well-formed UTF-8 sequence (no overlong form, surrogate or code point
    above U+10FFFF, as Python's strict decoder), or -1."""
    cdef unsigned char c = d[i], lo = 0x80, hi = 0xBF
    cdef Py_ssize_t k, more
    if 0xC2 <= c <= 0xDF:
        more = 1
    elif 0xE0 <= c <= 0xEF:
        more = 2
        if c == 0xE0:
            lo = 0xA0
        elif c == 0xED:
            hi = 0x9F
    elif 0xF0 <= c <= 0xF4:
        more = 3
        if c == 0xF0:
            lo = 0x90
        elif c == 0xF4:
            hi = 0x8F
    else:
        return -1
    if i + more >= n or not lo <= d[i + 1] <= hi:
        return -1
    for k in range(2, more + 1):
        if d[i + k] & 0xC0 != 0x80:
            return -1
    return i + more + 1


cdef inline bint _hex(unsigned char c) noexcept nogil:
    return 48 <= c <= 57 or 65 <= c <= 70 or 97 <= c <= 102


cdef inline Py_ssize_t valid_string(const unsigned char* d, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """d[i] is the opening quote: the index after the closing one, or -1."""
    cdef unsigned char c
    i += 1
    while True:
        i = js_plain_end(d + i, d + n) - d      # plain ASCII, 8 bytes at a time
        if i >= n:
            return -1
        c = d[i]
        if c == 34:
            return i + 1
        if c == 92:
            if i + 1 >= n:
                return -1
            c = d[i + 1]
            if c == 117:        # \uXXXX
                if i + 5 >= n or not (_hex(d[i + 2]) and _hex(d[i + 3]) and _hex(d[i + 4]) and _hex(d[i + 5])):
                    return -1
                i += 6
            elif c == 34 or c == 92 or c == 47 or c == 98 or c == 102 or c == 110 or c == 114 or c == 116:
                i += 2
            else:
                return -1
        elif c < 0x20:
            return -1
        else:
            i = utf8_seq(d, i, n)
            if i < 0:
                return -1


cdef inline Py_ssize_t _digits(const unsigned char* d, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """One or more digits at d[i]: the index after them, or -1."""
    cdef Py_ssize_t s = i
    while i < n and 48 <= d[i] <= 57:
        i += 1
    return i if i > s else -1


cdef inline Py_ssize_t valid_number(const unsigned char* d, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)? at d[i]: the index after it, or -1."""
    if d[i] == 45:
        i += 1
    if i < n and d[i] == 48:
        i += 1
    else:
        i = _digits(d, i, n)
        if i < 0:
            return -1
    if i < n and d[i] == 46:
        i = _digits(d, i + 1, n)
        if i < 0:
            return -1
    if i < n and (d[i] == 101 or d[i] == 69):
        i += 1
        if i < n and (d[i] == 43 or d[i] == 45):
            i += 1
        i = _digits(d, i, n)
    return i


cdef inline Py_ssize_t _literal(const unsigned char* d, Py_ssize_t i, Py_ssize_t n, const char* word,
                                Py_ssize_t k) noexcept nogil:
    cdef Py_ssize_t j
    if i + k > n:
        return -1
    for j in range(k):
        if d[i + j] != <unsigned char>word[j]:
            return -1
    return i + k


cdef inline Py_ssize_t _key(const unsigned char* d, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """A member's key and colon at d[i]: the index of its value, or -1."""
    if i >= n or d[i] != 34:
        return -1
    i = valid_string(d, i, n)
    if i < 0:
        return -1
    i = skip_ws(d, i, n)
    if i >= n or d[i] != 58:
        return -1
    return skip_ws(d, i + 1, n)


cdef inline bint json_valid(const unsigned char* d, Py_ssize_t n) noexcept nogil:
    """Whether d[0:n] is one JSON document (surrounding whitespace allowed), by the rules above. Iterative: a
    stack of the open containers, at most JSON_MAX_DEPTH."""
    cdef unsigned char stack[JSON_MAX_DEPTH]
    cdef Py_ssize_t sp = 0, i = skip_ws(d, 0, n)
    cdef unsigned char c
    while True:
        # one value: a scalar, or the opening of a container (then loop for its first element)
        if i >= n:
            return False
        c = d[i]
        if c == 123 or c == 91:     # { [
            if sp == JSON_MAX_DEPTH:
                return False
            stack[sp] = c
            sp += 1
            i = skip_ws(d, i + 1, n)
            if i < n and d[i] == c + 2:     # } ]: empty
                sp -= 1
                i += 1
            else:
                if c == 123:
                    i = _key(d, i, n)
                    if i < 0:
                        return False
                continue
        elif c == 34:
            i = valid_string(d, i, n)
        elif c == 45 or 48 <= c <= 57:
            i = valid_number(d, i, n)
        elif c == 116:
            i = _literal(d, i, n, b"true", 4)
        elif c == 102:
            i = _literal(d, i, n, b"false", 5)
        elif c == 110:
            i = _literal(d, i, n, b"null", 4)
        else:
            return False
        if i < 0:
            return False
        # after a complete value: close containers, or step to the next element
        while True:
            if sp == 0:
                return skip_ws(d, i, n) == n
            i = skip_ws(d, i, n)
            if i >= n:
                return False
            c = d[i]
            if c == 44:     # ,
                i = skip_ws(d, i + 1, n)
                if stack[sp - 1] == 123:
                    i = _key(d, i, n)
                    if i < 0:
                        return False
                break
            if c != stack[sp - 1] + 2:
                return False
            sp -= 1
            i += 1
