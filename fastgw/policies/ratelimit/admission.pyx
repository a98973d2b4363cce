# cython: language_level=3
"""rate-limit's per-request path with the local (shared-memory) backend, compiled.

RateLimit (ratelimit.py) stays the readable policy: it compiles the rules, builds a plan (the buckets one kind of
request takes from) on a cache miss, and words refusals. What runs on every request is here, because in Python
it cost as much as the rest of the proxied request's own code: look up the cached plan, estimate the tokens,
reserve in the arena, add the x-ratelimit-* lines and keep the reservation for `complete`, which settles it
with the real usage. The steps are those of the Python path the Redis backends take (RateLimit.request and
RateLimit.complete); tests/unit/test_policies_ratelimit.py runs the local backend through this one.
"""
from cpython.dict cimport PyDict_GetItemWithError
from cpython.ref cimport PyObject, Py_INCREF
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM

from fastgw.policies.ratelimit.bucket cimport BucketArena, BucketPlan
from fastgw.proxy.exchange cimport Exchange
from fastgw.policies.usage import fill_counted_usage

# The request attributes a plan key can be made of (those the rules look at), as codes for a C switch.
cdef enum:
    A_CONSUMER, A_GROUP, A_MODEL, A_PATH, A_CLIENT
    MAX_KEY = 8     # attributes in a key; more (never, with five kinds) falls back to policy._plan_key
_ATTRS = {"consumer": A_CONSUMER, "group": A_GROUP, "model": A_MODEL, "path": A_PATH, "client_addr": A_CLIENT}


cdef inline str _attr(Exchange ex, int code):
    if code == A_CONSUMER:
        return ex.consumer
    if code == A_GROUP:
        return ex.group
    if code == A_MODEL:
        return ex.model
    if code == A_PATH:
        return ex.path
    return ex.client_addr


cdef class LocalAdmission:
    """request(ex) and complete(ex) hooks for a RateLimit whose backend is "local" (it installs them)."""

    cdef object policy          # the RateLimit: the scratch key, plans on a miss, refusals
    cdef dict plans             # the policy's plan cache (shared, so both paths see one)
    cdef object new_plan        # policy._new_plan(key, ex): builds, bounds the cache and stores
    cdef object key_of          # policy._plan_key when headers are part of the key, else None
    cdef int nattrs
    cdef int attrs[MAX_KEY]
    cdef BucketArena arena
    cdef bint headers
    cdef long long default_completion

    def __init__(self, policy, BucketArena arena, attrs, bint headers, long long default_completion):
        """attrs: the Exchange attribute names the plan key is made of, as RateLimit's attrgetter takes them
        (the key is () for none, the value for one, else the tuple); None: call policy._plan_key."""
        self.policy = policy
        self.plans = policy._plans
        self.new_plan = policy._new_plan
        self.arena = arena
        self.headers = headers
        self.default_completion = default_completion
        self.key_of = None
        self.nattrs = 0
        if attrs is None or len(attrs) > MAX_KEY or any(a not in _ATTRS for a in attrs):
            self.key_of = policy._plan_key
        else:
            for a in attrs:
                self.attrs[self.nattrs] = _ATTRS[a]
                self.nattrs += 1

    cdef object _key(self, Exchange ex):
        cdef int i
        cdef object v
        if self.key_of is not None:
            return self.key_of(ex)
        if self.nattrs == 1:
            return _attr(ex, self.attrs[0])
        t = PyTuple_New(self.nattrs)
        for i in range(self.nattrs):
            v = _attr(ex, self.attrs[i])
            Py_INCREF(v)
            PyTuple_SET_ITEM(t, i, v)
        return t

    def request(self, Exchange ex):
        cdef object key = self._key(ex)
        cdef PyObject* found = PyDict_GetItemWithError(self.plans, key)
        cdef object plan
        cdef BucketPlan bp
        # A double, as the buckets hold: a client's max_tokens x n can pass 2**63 (then it is refused as too
        # large), where an integer would wrap around and the reservation turn into a gift.
        cdef double tokens = 0.0
        cdef long long mt, n
        cdef Py_ssize_t fail
        if found == NULL:
            plan = self.new_plan(key, ex)
        else:
            plan = <object>found
        if plan is None:
            return None
        bp = <BucketPlan?>plan
        if bp.has_tokens:   # the estimate: prompt + max_tokens (or the default) per choice
            tokens = ex.prompt_estimate()
            if not ex.endpoint.endswith("/embeddings"):
                f = ex.fields
                if f is None:
                    tokens += self.default_completion
                else:
                    mt = f.max_tokens
                    n = f.n
                    tokens += <double>(mt if mt >= 0 else self.default_completion) * <double>(n if n > 1 else 1)
        fail = bp.reserve(self.arena, tokens, self.headers)
        if fail >= 0:
            self.policy._refuse(ex, plan, fail, tokens, bp.remaining(fail))
        if self.headers:
            ex.response_headers.append(bp.headers)
        if ex.scratch is None:
            ex.scratch = {}
        ex.scratch[self.policy] = (plan, tokens)
        return None

    def complete(self, Exchange ex):
        cdef double actual, tokens
        cdef BucketPlan bp
        if not ex.scratch:
            return None
        st = (<dict?>ex.scratch).pop(self.policy, None)   # typed: a C call, not a method lookup
        if st is None:
            return None
        plan, tokens = st
        bp = <BucketPlan?>plan
        if not bp.has_tokens:
            return None
        if ex.prompt_tokens >= 0:
            actual = <double>(ex.prompt_tokens + ex.completion_tokens if ex.completion_tokens > 0
                              else ex.prompt_tokens)
        elif 200 <= ex.status < 300:
            if not fill_counted_usage(ex):   # moderations, embeddings without usage: their input tokens
                return None      # answered but usage unknown: keep the estimate
            actual = <double>ex.prompt_tokens
        else:
            actual = 0.0         # refused later or failed upstream: nothing was used
        if tokens != actual:
            bp.settle(self.arena, tokens, actual)
        return None
