# What a route does when an attempt fails (see retry.pyx): read by the relay as C fields.

cdef class RetryPolicy:
    cdef readonly int attempts                  # tries per request on this model
    cdef readonly double backoff, max_backoff   # seconds: the base and the cap of the jittered backoff
    cdef readonly double retry_after_cap        # seconds: the longest retry-after honoured
    cdef readonly double deadline               # seconds from the request's head; 0 = none
    cdef readonly list fallbacks                # Routes tried, in order, once this model's attempts are used up
                                                # (its chain flattened depth first: a fallback's own fallbacks next)
    cdef readonly list context_window_fallbacks # Routes for a 400 context_length_exceeded
    cdef readonly list content_policy_fallbacks # Routes for a 400 content_filter / content_policy_violation
    cdef readonly bint holds_400                # some 400 answers may be replaced: read them before relaying
