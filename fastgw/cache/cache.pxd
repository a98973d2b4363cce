from fastgw.observability.stats cimport RequestStats
from fastgw.proxy.exchange cimport Exchange

# Whether and how a request uses the cache (ResponseCache.decide).
cdef enum CacheUse:
    BYPASS      # not cacheable: no lookup, nothing stored
    LOOKUP      # look up; a miss's answer is stored
    REFRESH     # cache-control: no-cache: no lookup, the answer is stored (replacing the entry)

cdef class ResponseCache:
    cdef readonly object backend
    cdef readonly RequestStats stats       # (a fastgw.observability.metrics.Stats: its counters are compiled)
    cdef readonly object semantic          # fastgw.cache.semantic.SemanticCache, or None (no model opted in)
    cdef readonly bint shared              # the backend answers at once (memory), else with an awaitable (Redis)
    cdef readonly str scope
    cdef readonly double ttl
    cdef readonly dict model_ttl
    cdef readonly bint allow_temperature, charge_hits
    cdef readonly frozenset no_tools
    cdef readonly long long max_entry

    cdef int decide(self, Exchange ex) except -1
    cdef int _bypass(self, Exchange ex, str why) except -1
    cdef double _ttl(self, Exchange ex)
    cdef object payload(self, Exchange ex, bytes entry)
    cdef void missed(self, Exchange ex) except *
    cdef void hit(self, Exchange ex, bytes entry, Py_ssize_t served, double similarity) except *
    cdef void store(self, Exchange ex, bytes entry) except *
