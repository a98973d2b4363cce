# cython: language_level=3
"""The exact response cache: which requests use it, the lookup, serving a hit, storing a miss's answer.

The relay (fastgw/proxy/relay.pyx) calls it after the request phase (so a hit still counts as a request for
request limits) and before a deployment is picked:

    decide(ex)      BYPASS, LOOKUP or REFRESH; sets ex.cache ("bypass", "miss", "refresh") and ex.cache_key, and
                    the x-fastgw-cache line of the answer
    backend.get(key)    the entry (bytes), None, or (Redis) an awaitable of either: the one lookup, kept small so a
                    second one (by embedding similarity) can sit beside it
    payload(ex, entry)  what this client gets from an entry (None: it cannot be served to it, a miss)
    semantic        after an exact miss, the lookup by similarity (fastgw.cache.semantic), for opted-in models
    hit(ex, ...)    accounting of a hit: 0 tokens (limits settle it as free, budgets charge nothing) unless
                    charge_hits; ex.cache = "hit"; a semantic hit's similarity in x-fastgw-cache-similarity, the
                    access log (cache_similarity) and the lookups metric (result "semantic_hit")
    store(ex, entry)    at a miss's successful end (Relay._end_body, Relay._end_stream); a semantic query's vector
                    joins the index with the key

Cacheable: POST /v1/chat/completions, /v1/completions, /v1/embeddings and /v1/responses, not Anthropic's
/v1/messages (its answers are another shape; documented as not cached). A client's `cache-control: no-store`
bypasses the cache, `no-cache` refreshes the entry. Keys: fastgw.cache.key; entries: fastgw.cache.entry.
"""
from fastgw.cache.key cimport request_key
from fastgw.cache import entry as E

cdef frozenset _ENDPOINTS = frozenset(("/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                                       "/v1/responses"))
cdef bytes _HIT = b"x-fastgw-cache: hit\r\n"
cdef bytes _MISS = b"x-fastgw-cache: miss\r\n"
cdef bytes _BYPASS = b"x-fastgw-cache: bypass\r\n"
cdef bytes _REFRESH = b"x-fastgw-cache: refresh\r\n"
cdef Py_ssize_t _HEADER = E.HEADER.size
_as_json = E.as_json
_as_sse = E.as_sse


cdef class ResponseCache:
    def __init__(self, cfg, backend, stats, semantic=None):
        """cfg: fastgw.runtime.config.Cache; backend: fastgw.cache.store.SharedStore or RedisStore; semantic: a
        fastgw.cache.semantic.SemanticCache or None."""
        self.backend = backend
        self.semantic = semantic
        self.stats = stats
        self.shared = not hasattr(backend, "is_remote")
        self.scope = cfg.scope
        self.ttl = cfg.ttl
        self.model_ttl = dict(cfg.model_ttl)
        self.allow_temperature = cfg.allow_temperature
        self.charge_hits = cfg.charge_hits
        self.no_tools = frozenset(cfg.uncacheable_tools)
        self.max_entry = cfg.max_entry_bytes

    cdef int decide(self, Exchange ex) except -1:
        if ex.endpoint not in _ENDPOINTS or ex.messages_api or ex.passthrough:
            return BYPASS                   # not an endpoint the cache knows: no header either
        cdef CacheUse use = LOOKUP
        cc = ex.header(b"cache-control")
        if cc is not None:
            cc = cc.lower()
            if b"no-store" in cc:
                return self._bypass(ex, "no-store")
            if b"no-cache" in cc:
                use = REFRESH
        if self.model_ttl and self._ttl(ex) <= 0.0:
            return self._bypass(ex, "model")
        scope = ex.consumer if self.scope == "consumer" else ex.group if self.scope == "group" else ""
        key, why = request_key(ex.body, ex.fields, ex.endpoint, ex.model, scope, self.allow_temperature, self.no_tools)
        if key is None:
            return self._bypass(ex, why)
        ex.cache_key = key
        if use == REFRESH:
            ex.cache = "refresh"
            ex.response_headers.append(_REFRESH)
            self.stats.cache_lookup(_label(ex), "refresh", 0)
        else:
            ex.cache = "miss"               # until the lookup finds it
            ex.response_headers.append(_MISS)
        return use

    cdef int _bypass(self, Exchange ex, str why) except -1:
        ex.cache = "bypass"
        ex.response_headers.append(_BYPASS)
        self.stats.cache_lookup(_label(ex), "bypass", 0)
        return BYPASS

    cdef void missed(self, Exchange ex) except *:
        """The lookup found nothing (or nothing this client can be served): the answer will be stored."""
        self.stats.cache_lookup(_label(ex), ex.cache, 0)

    cdef double _ttl(self, Exchange ex):
        route = ex.route
        name = route.name if route is not None else ex.model
        t = self.model_ttl.get(name)
        return self.ttl if t is None else <double>t

    cdef object payload(self, Exchange ex, bytes entry):
        """The bytes this client gets from `entry` (JSON, or SSE events for a stream), None when it cannot."""
        if len(entry) < _HEADER:
            return None
        if entry[0] == 74 and not ex.stream:        # b"J" to a JSON client: the stored body as it is
            return entry[_HEADER:]
        if ex.stream:
            return _as_sse(entry, ex.endpoint, ex.client_wants_usage)
        return _as_json(entry, ex.endpoint)

    cdef void hit(self, Exchange ex, bytes entry, Py_ssize_t served, double similarity) except *:
        ex.cache = "hit"
        if similarity > 0.0:
            ex.cache_similarity = similarity
            ex.response_headers.append(b"x-fastgw-cache-similarity: %.4f\r\n" % similarity)
        # The response head's line: replace the "miss" decide() put there.
        cdef list lines = ex.response_headers
        cdef Py_ssize_t i
        for i in range(len(lines)):
            if lines[i] is _MISS:
                lines[i] = _HIT
                break
        if self.charge_hits:
            kind, prompt, completion, _, _, _ = E.parts(entry)
            ex.prompt_tokens, ex.completion_tokens = prompt, completion
        else:
            ex.prompt_tokens = ex.completion_tokens = 0     # free: limits settle 0 tokens, budgets charge $0
        self.stats.cache_lookup(_label(ex), "semantic_hit" if similarity > 0.0 else "hit", served)

    cdef void store(self, Exchange ex, bytes entry) except *:
        if entry is None or len(entry) > self.max_entry:
            return
        key = ex.cache_key
        ex.cache_key = None                 # once
        ttl = self._ttl(ex) if self.model_ttl else self.ttl
        if self.backend.put(key, entry, ttl):
            self.stats.cache_stored(_label(ex), len(entry))
            if ex.cache_semantic is not None and self.semantic is not None:
                self.semantic.added(ex.cache_semantic, key)



cdef inline str _label(Exchange ex):
    """The model label of the cache's metrics: the route's name (from the config: bounded)."""
    route = ex.route
    return route.name if route is not None else ""
