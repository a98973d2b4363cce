# The per-request part of fastgw.observability.metrics.Stats (see stats.pyx). The connection code may cimport RequestStats
# and call `add` directly: a C call with C numbers, no argument tuple, no boxing.

cdef enum:
    MAX_BUCKETS = 24


cdef class _Record:
    cdef long long count, prompt, completion
    cdef double cost, dur_sum, ttft_sum
    cdef long long dur[MAX_BUCKETS + 1]
    cdef long long ttft[MAX_BUCKETS + 1]

    cdef list as_list(self, int nd, int nt)


cdef class RequestStats:
    cdef public Py_ssize_t max_series
    cdef readonly dict _records
    cdef double dur_bounds[MAX_BUCKETS]
    cdef double ttft_bounds[MAX_BUCKETS]
    cdef double over_bounds[MAX_BUCKETS]
    cdef int nd, nt, no
    cdef long long overhead[MAX_BUCKETS + 1]
    cdef double overhead_sum
    # The label set of the last request and its record (found again by pointer compares).
    cdef _Record _last
    cdef object _last_model, _last_upstream, _last_consumer
    cdef int _last_status

    cdef int add(self, str model, str upstream, str consumer, int status, double latency_s, double ttft_s,
                 double overhead_s, long long prompt_tokens, long long completion_tokens, double cost) except -1
    cdef int _account(self, str model, str upstream, str consumer, int status, double latency_s, bint has_ttft,
                      double ttft_s, double overhead_s, long long prompt_tokens, long long completion_tokens,
                      double cost) except -1
    cdef _Record _lookup(self, str model, str upstream, str consumer, int status)
    # The response cache's counters: lookups by (model, result), bytes by (model, "served" | "stored").
    cdef public dict _cache_lookups, _cache_bytes
    # Hits of one model counted in C until another result or model comes (or a snapshot): a hit is the cheapest
    # request the gateway serves, and a dict update per hit costs ~2k instructions.
    cdef object _hits_model
    cdef long long _hits, _hits_served
    cpdef cache_lookup(self, str model, str result, long long served)
    cpdef cache_flush(self)
    cpdef cache_stored(self, str model, long long nbytes)
    cdef void _cache_count(self, dict series, tuple key, long long n) except *
