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
from fastgw.protocol.jsonskip cimport skip_string, skip_value, skip_ws

import orjson
import xxhash

_loads = orjson.loads
_digest = xxhash.xxh3_128_digest

cdef frozenset _IGNORED = frozenset((b'"model"', b'"user"', b'"stream"', b'"stream_options"', b'"store"',
                                     b'"metadata"', b'"safety_identifier"', b'"prompt_cache_key"'))


cpdef object request_key(bytes body, str endpoint, str model, str scope, bint allow_temperature,
                         frozenset no_tools):
    """(16-byte key, "") for a cacheable request, else (None, why: "n", "temperature", "tool" or "body")."""
    cdef const unsigned char* d = body
    cdef Py_ssize_t n = len(body), i, ks, ke, vs
    cdef list members = []
    i = skip_ws(d, 0, n)
    if i >= n or d[i] != 123:                           # {
        return None, "body"
    i = skip_ws(d, i + 1, n)
    while i < n and d[i] != 125:                        # }
        ks = i
        ke = skip_string(d, i, n)
        if ke < 0:
            return None, "body"
        i = skip_ws(d, ke, n)
        if i >= n or d[i] != 58:                        # :
            return None, "body"
        vs = skip_ws(d, i + 1, n)
        i = skip_value(d, vs, n)
        if i < 0:
            return None, "body"
        name = body[ks:ke]
        if name not in _IGNORED:
            value = body[vs:i]
            if name == b'"n"' and value != b"1" and value != b"null":
                return None, "n"
            if name == b'"temperature"' and not allow_temperature and value != b"null" and _nonzero(value):
                return None, "temperature"
            if no_tools and name == b'"tools"':
                tools = _loads(value)
                if type(tools) is list and _names_any(<list>tools, no_tools):
                    return None, "tool"
            members.append((name, value))
        i = skip_ws(d, i, n)
        if i < n and d[i] == 44:                        # ,
            i = skip_ws(d, i + 1, n)
    if i >= n:
        return None, "body"
    members.sort()
    cdef list parts = [(endpoint + "\0" + model + "\0" + scope + "\0").encode()]
    for name, value in members:
        parts.append(name)
        parts.append(b":")
        parts.append(value)
        parts.append(b",")
    return _digest(b"".join(parts)), ""


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
