# cython: language_level=3
"""The exact cache's key: a 128-bit xxh3 of the request's canonical form, and whether a request may be cached.

The canonical form is the endpoint, the virtual model, the scope (who may share the answer) and the body's
top-level members sorted by name, without the members that never change the answer: `model` (the virtual model
is in the key already), `user`, `stream` and `stream_options` (a cached answer serves streaming and
non-streaming clients alike), `store`, `metadata`, `safety_identifier`, `prompt_cache_key`. Client headers are
never part of it. Members in another order, or other whitespace between them, make the same key; a member's value
counts byte for byte as sent (the SDKs write the same request the same way), so the same value written with other
whitespace or key order inside it is another key: a miss, never a wrong hit. Any other parameter (temperature,
max_tokens, tools, response_format, seed...) changes the key.

Read with the compiled JSON skipping of jsonpeek (the body was validated by peek_request already): a 4.4 KB chat
request costs a few thousand instructions, where an orjson parse and a sorted dump cost ~40k.

Not cacheable (a bypass): `n` other than 1 (several samples are asked to differ), a non-zero `temperature` unless
the config allows it (absent counts as cacheable: the client did not ask for sampling), or a tool whose name the
config declares uncacheable (a side effect the caller expects to happen every time).
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memcmp, memcpy

from fastgw.protocol.jsonpeek cimport KEPT_MEMBERS, RequestFields
from fastgw.protocol.jsonskip cimport skip_string, skip_value, skip_ws

import orjson
import xxhash

_loads = orjson.loads
_digest = xxhash.xxh3_128_digest

# A body with more top-level members than this is not cached (no request of the API has a tenth of it).
cdef enum:
    MAX_MEMBERS = 256


cdef struct Member:
    Py_ssize_t ks, ke, vs, ve            # the name (with its quotes) and the value, as spans of the body


cdef inline bint _named(const unsigned char* d, Member* m, const char* name, Py_ssize_t n) noexcept nogil:
    return m.ke - m.ks == n and memcmp(d + m.ks, name, n) == 0


cdef inline bint _ignored(const unsigned char* d, Member* m) noexcept nogil:
    """A member that never changes the answer (the module doc's list)."""
    return (_named(d, m, b'"model"', 7) or _named(d, m, b'"user"', 6) or _named(d, m, b'"stream"', 8)
            or _named(d, m, b'"stream_options"', 16) or _named(d, m, b'"store"', 7)
            or _named(d, m, b'"metadata"', 10) or _named(d, m, b'"safety_identifier"', 19)
            or _named(d, m, b'"prompt_cache_key"', 18))


cdef inline bint _value_is(const unsigned char* d, Member* m, const char* text, Py_ssize_t n) noexcept nogil:
    return m.ve - m.vs == n and memcmp(d + m.vs, text, n) == 0


cdef inline int _name_cmp(const unsigned char* d, Member* a, Member* b) noexcept nogil:
    cdef Py_ssize_t la = a.ke - a.ks, lb = b.ke - b.ks
    cdef int c = memcmp(d + a.ks, d + b.ks, la if la < lb else lb)
    if c != 0:
        return c
    return (la > lb) - (la < lb)


cpdef object request_key(bytes body, object fields, str endpoint, str model, str scope, bint allow_temperature,
                         frozenset no_tools):
    """(16-byte key, "") for a cacheable request, else (None, why: "n", "temperature", "tool" or "body").

    `fields`: the body's RequestFields (jsonpeek.peek_request), whose top-level member spans are used when it kept
    them all; else (None, or more members than it keeps) the body is walked here. The members are sorted by name
    (an insertion sort: a request has a handful) and written once into the buffer that is hashed."""
    cdef const unsigned char* d = <const unsigned char*>PyBytes_AS_STRING(body)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(body)
    cdef Member members[MAX_MEMBERS]
    cdef int count
    cdef RequestFields f
    if fields is not None and (<RequestFields?>fields).members <= KEPT_MEMBERS:
        f = <RequestFields>fields
        count = _from_fields(d, f, members)
    else:
        count = _walk(d, n, members)
    if count < 0:
        return None, "body"
    cdef Member* m
    cdef int k, kept = 0
    for k in range(count):
        m = &members[k]
        if _ignored(d, m):
            continue
        if _named(d, m, b'"n"', 3) and not (_value_is(d, m, b"1", 1) or _value_is(d, m, b"null", 4)):
            return None, "n"
        if (_named(d, m, b'"temperature"', 13) and not allow_temperature
                and not _value_is(d, m, b"null", 4) and _nonzero(body[m.vs:m.ve])):
            return None, "temperature"
        if no_tools and _named(d, m, b'"tools"', 7):
            tools = _loads(body[m.vs:m.ve])
            if type(tools) is list and _names_any(<list>tools, no_tools):
                return None, "tool"
        _insert(d, members, kept, m[0])
        kept += 1
    return _digest(_canonical(d, members, kept, endpoint, model, scope)), ""


cdef int _from_fields(const unsigned char* d, RequestFields f, Member* out) noexcept:
    """The members from peek_request's spans; a name ends at the quote before its colon."""
    cdef int k
    cdef Py_ssize_t q
    for k in range(f.members):
        out[k].ks = f.member_name[k]
        out[k].vs = f.member_value[k]
        out[k].ve = f.member_end[k]
        q = out[k].vs - 1
        while d[q] != 58:                               # back over whitespace to the colon,
            q -= 1
        q -= 1
        while d[q] != 34:                               # then to the name's closing quote
            q -= 1
        out[k].ke = q + 1
    return f.members


cdef int _walk(const unsigned char* d, Py_ssize_t n, Member* out) noexcept:
    """The top-level members of a body (validated already) found by skipping; -1: not an object, or more than
    MAX_MEMBERS members."""
    cdef Py_ssize_t i
    cdef int count = 0
    i = skip_ws(d, 0, n)
    if i >= n or d[i] != 123:                           # {
        return -1
    i = skip_ws(d, i + 1, n)
    while i < n and d[i] != 125:                        # }
        if count == MAX_MEMBERS:
            return -1
        out[count].ks = i
        out[count].ke = skip_string(d, i, n)
        if out[count].ke < 0:
            return -1
        i = skip_ws(d, out[count].ke, n)
        if i >= n or d[i] != 58:                        # :
            return -1
        out[count].vs = skip_ws(d, i + 1, n)
        i = skip_value(d, out[count].vs, n)
        if i < 0:
            return -1
        out[count].ve = i
        count += 1
        i = skip_ws(d, i, n)
        if i < n and d[i] == 44:                        # ,
            i = skip_ws(d, i + 1, n)
    return count if i < n else -1


cdef inline void _insert(const unsigned char* d, Member* sorted_, int count, Member m) noexcept:
    """Insert m into sorted_[0:count] by name, after equal names (a repeated name keeps its order)."""
    cdef int k = count
    while k > 0 and _name_cmp(d, &sorted_[k - 1], &m) > 0:
        sorted_[k] = sorted_[k - 1]
        k -= 1
    sorted_[k] = m


cdef bytes _canonical(const unsigned char* d, Member* members, int count, str endpoint, str model, str scope):
    """endpoint NUL model NUL scope NUL, then name:value, for each member."""
    cdef bytes head = (endpoint + "\0" + model + "\0" + scope + "\0").encode()
    cdef Py_ssize_t total = PyBytes_GET_SIZE(head), j
    cdef int k
    for k in range(count):
        total += (members[k].ke - members[k].ks) + (members[k].ve - members[k].vs) + 2
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* w = PyBytes_AS_STRING(out)
    memcpy(w, PyBytes_AS_STRING(head), PyBytes_GET_SIZE(head))
    w += PyBytes_GET_SIZE(head)
    for k in range(count):
        j = members[k].ke - members[k].ks
        memcpy(w, d + members[k].ks, j)
        w[j] = 58                                       # name:value,
        w += j + 1
        j = members[k].ve - members[k].vs
        memcpy(w, d + members[k].vs, j)
        w[j] = 44
        w += j + 1
    return out


cdef bint _nonzero(bytes number) except -1:
    try:
        return float(number) != 0.0
    except ValueError:
        return True                                     # not a number: the upstream will say so; not cached


cdef bint _names_any(list tools, frozenset names):
    """Does a tool of the request (chat: {"function": {"name"}}, responses: {"name"}) have one of `names`?"""
    for t in tools:
        if type(t) is not dict:
            continue
        name = (<dict>t).get("name")
        f = (<dict>t).get("function")
        if name is None and type(f) is dict:
            name = (<dict>f).get("name")
        if name in names:
            return True
    return False
