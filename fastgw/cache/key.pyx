# cython: language_level=3
"""The exact cache's key: a 128-bit xxh3 of the request's canonical form, and whether a request may be cached.

The canonical form is the endpoint, the virtual model, the scope (who may share the answer) and the body as JSON
with its keys sorted at every level and without the fields that never change the answer: `model` (the virtual
model is in the key already), `user`, `stream` and `stream_options` (a cached answer serves streaming and
non-streaming clients alike), `store`, `metadata`, `safety_identifier`, `prompt_cache_key`. Client headers are
never part of it. So the same request with its keys in another order or other whitespace is the same key; any
other parameter (temperature, max_tokens, tools, response_format, seed...) changes it.

Not cacheable (a bypass): `n` > 1 (several samples are asked to differ), a non-zero `temperature` unless the
config allows it (absent counts as cacheable: the client did not ask for sampling), or a tool whose name the
config declares uncacheable (a side effect the caller expects to happen every time).
"""
import orjson
import xxhash

_loads = orjson.loads
_dumps = orjson.dumps
_SORT = orjson.OPT_SORT_KEYS
_digest = xxhash.xxh3_128_digest

cdef tuple _IGNORED = ("model", "user", "stream", "stream_options", "store", "metadata", "safety_identifier",
                       "prompt_cache_key")


cpdef object request_key(bytes body, str endpoint, str model, str scope, bint allow_temperature,
                         frozenset no_tools):
    """(16-byte key, "") for a cacheable request, else (None, why: "n", "temperature", "tool" or "body")."""
    try:
        d = _loads(body)
    except orjson.JSONDecodeError:
        return None, "body"
    if type(d) is not dict:
        return None, "body"
    cdef dict req = <dict>d
    n = req.get("n")
    if n is not None and n != 1:
        return None, "n"
    t = req.get("temperature")
    if t is not None and t != 0 and not allow_temperature:
        return None, "temperature"
    if no_tools:
        tools = req.get("tools")
        if type(tools) is list and _names_any(<list>tools, no_tools):
            return None, "tool"
    for k in _IGNORED:
        if k in req:
            del req[k]
    head = (endpoint + "\0" + model + "\0" + scope + "\0").encode()
    return _digest(head + _dumps(req, option=_SORT)), ""


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
