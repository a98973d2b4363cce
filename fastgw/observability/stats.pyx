# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The per-request part of fastgw.observability.metrics.Stats, compiled: one finished request updates C counters.

A request updates about twenty numbers of one (model, upstream, consumer, status) record and one overhead
histogram. Done by the interpreter that is a tuple, a dict lookup, three bisects and boxed-number list updates
on every request; here it is C arithmetic on a struct. The labels of consecutive requests are usually the
very same string objects (route name, deployment name, consumer), so the last record is kept and found by
four pointer compares before falling back to the dict.

The scrape side stays in Python (metrics.py): `records()` and `overhead_histogram()` give the values in the
list layout its snapshots use.
"""

OVERFLOW = "__overflow__"    # the label value of the series that counts label sets beyond max_series


cdef class _Record:
    """One label set's values. Layout of as_list(): count, prompt, completion, cost, duration sum, ttft sum,
    the duration buckets (+Inf last), the ttft buckets (+Inf last); bucket counts are per bucket, not cumulative."""

    cdef list as_list(self, int nd, int nt):
        cdef list out = [self.count, self.prompt, self.completion, self.cost, self.dur_sum, self.ttft_sum]
        cdef int i
        for i in range(nd + 1):
            out.append(self.dur[i])
        for i in range(nt + 1):
            out.append(self.ttft[i])
        return out


cdef inline int _bucket(const double* bounds, int n, double x) noexcept:
    """bisect_left: the first i with x <= bounds[i], n when none (NaN lands in bucket 0, as with bisect)."""
    cdef int i = 0
    while i < n and bounds[i] < x:
        i += 1
    return i


cdef int _load_bounds(double* dst, bounds) except -1:
    cdef Py_ssize_t n = len(bounds), i
    if n > MAX_BUCKETS:
        raise ValueError(f"at most {MAX_BUCKETS} bucket bounds")
    for i in range(n):
        dst[i] = bounds[i]
        if i and dst[i] <= dst[i - 1]:
            raise ValueError("bucket bounds must increase")
    return <int>n


cdef class RequestStats:
    """Per-request counters and histograms of one worker (base class of fastgw.observability.metrics.Stats)."""

    def __init__(self, duration_bounds, ttft_bounds, overhead_bounds, Py_ssize_t max_series):
        self.nd = _load_bounds(self.dur_bounds, duration_bounds)
        self.nt = _load_bounds(self.ttft_bounds, ttft_bounds)
        self.no = _load_bounds(self.over_bounds, overhead_bounds)
        self.max_series = max_series
        self._records = {}
        self._cache_lookups = {}
        self._cache_bytes = {}

    cpdef cache_lookup(self, str model, str result, long long served):
        """A cacheable request's result (hit, miss, refresh, bypass, semantic_hit); `served`: the bytes a hit
        answered. Compiled: a hit is the cheapest request the gateway serves, and this runs on every one."""
        if result == "hit":
            if model is not self._hits_model:
                self.cache_flush()
                self._hits_model = model
            self._hits += 1
            self._hits_served += served
            return
        self._cache_count(self._cache_lookups, (model, result), 1)
        if served:
            self._cache_count(self._cache_bytes, (model, "served"), served)

    cpdef cache_flush(self):
        """Move the hits counted in C into the counters' dicts (before they are read)."""
        if self._hits_model is None:
            return
        model = self._hits_model
        self._hits_model = None
        if self._hits:
            self._cache_count(self._cache_lookups, (model, "hit"), self._hits)
        if self._hits_served:
            self._cache_count(self._cache_bytes, (model, "served"), self._hits_served)
        self._hits = self._hits_served = 0

    cpdef cache_stored(self, str model, long long nbytes):
        self._cache_count(self._cache_bytes, (model, "stored"), nbytes)

    cdef void _cache_count(self, dict series, tuple key, long long n) except *:
        v = series.get(key)
        if v is not None:
            series[key] = <long long>v + n
        elif len(series) < self.max_series:
            series[key] = n
        else:                               # the metric is full: the overflow series
            key = (OVERFLOW,) * len(key)
            series[key] = series.get(key, 0) + n

    cdef int add(self, str model, str upstream, str consumer, int status, double latency_s, double ttft_s,
                 double overhead_s, long long prompt_tokens, long long completion_tokens, double cost) except -1:
        """Account one finished request; `ttft_s` < 0 means "no first token"."""
        return self._account(model, upstream, consumer, status, latency_s, ttft_s >= 0.0, ttft_s, overhead_s,
                             prompt_tokens, completion_tokens, cost)

    cdef int _account(self, str model, str upstream, str consumer, int status, double latency_s, bint has_ttft,
                      double ttft_s, double overhead_s, long long prompt_tokens, long long completion_tokens,
                      double cost) except -1:
        cdef _Record r = self._last
        if (r is None or model is not self._last_model or upstream is not self._last_upstream
                or consumer is not self._last_consumer or status != self._last_status):
            r = self._lookup(model, upstream, consumer, status)
        r.count += 1
        r.prompt += prompt_tokens
        r.completion += completion_tokens
        r.cost += cost
        r.dur[_bucket(self.dur_bounds, self.nd, latency_s)] += 1
        r.dur_sum += latency_s
        if has_ttft:
            r.ttft[_bucket(self.ttft_bounds, self.nt, ttft_s)] += 1
            r.ttft_sum += ttft_s
        cdef double us = overhead_s * 1e6
        self.overhead[_bucket(self.over_bounds, self.no, us)] += 1
        self.overhead_sum += us
        return 0

    cdef _Record _lookup(self, str model, str upstream, str consumer, int status):
        key = (model, upstream, consumer, status)
        r = self._records.get(key)
        if r is None:
            if len(self._records) >= self.max_series:     # full: count new label sets in one overflow series
                key = (OVERFLOW,) * 4
                r = self._records.get(key)
            if r is None:
                r = self._records[key] = _Record()
        self._last = <_Record>r
        self._last_model, self._last_upstream, self._last_consumer = model, upstream, consumer
        self._last_status = status
        return <_Record>r

    def request(self, str model, str upstream, str consumer, int status, double latency_s, ttft_s,
                double overhead_s, long long prompt_tokens, long long completion_tokens, double cost):
        """Account one finished request (`ttft_s` None: no first token)."""
        self._account(model, upstream, consumer, status, latency_s, ttft_s is not None,
                      ttft_s if ttft_s is not None else 0.0, overhead_s, prompt_tokens, completion_tokens, cost)

    def records(self):
        """{(model, upstream, consumer, status): [values in _Record.as_list layout]}."""
        cdef _Record r
        return {k: (<_Record>r).as_list(self.nd, self.nt) for k, r in self._records.items()}

    def overhead_histogram(self):
        """Overhead in µs: per-bucket counts (+Inf last), then the sum."""
        return [self.overhead[i] for i in range(self.no + 1)] + [self.overhead_sum]
