# Skipping over JSON without reading it, shared by the compiled modules that look into request and event
# bodies (sse, tokens). All take the buffer d[0:n] and a position; they return the position after the thing,
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
