# Routing state read on every proxied request (see router.pyx). cdef classes, so the connection code reads a
# deployment's fields as struct loads and picks with a C call (cimport Router, Route, Deployment).
cimport cython

from fastgw.routing.breaker cimport Breaker
from fastgw.routing.retry cimport RetryPolicy

from fastgw.proxy.exchange cimport Exchange

cdef class Route


# Final: the relay's calls of its bookkeeping methods are then direct C calls (no override check).
@cython.final
cdef class Deployment:
    cdef readonly str name, model, base_path
    cdef readonly object provider          # fastgw.providers.base.Provider
    cdef readonly object messages_provider # the Provider serving POST /v1/messages here (None: not available)
    cdef readonly object config            # its DeploymentConfig (provider settings: api_version, ...)
    cdef readonly object host, server_hostname, ssl
    cdef readonly int port
    cdef readonly bint tls
    cdef readonly tuple pool_key
    cdef readonly dict request_lines
    cdef readonly bytes header_lines, model_json
    # This deployment's connection pool, cached by the relay on first use (Pools.get(deployment)).
    cdef public object pool
    # Its `headers` names (lowercase bytes): a client's header of the same name is not forwarded.
    cdef readonly tuple own_header_names

    # Settings (the config's): share in its tier, tier (1 = first), requests in flight allowed (0 = no limit).
    cdef readonly int weight, priority, max_concurrent
    # Timeouts (seconds) of requests on it: its own `timeouts`, else [upstream]'s; own_timeouts: it has some.
    cdef readonly double connect_timeout, first_byte_timeout, stream_gap_timeout, total_timeout
    cdef readonly bint own_timeouts
    # Stable hash of its identity (provider, URL, model): the sticky balancing's rendezvous seed.
    cdef readonly unsigned long long seed

    # What this worker saw of it, read by the balancing.
    cdef readonly int in_flight            # requests sent on it and not ended
    cdef readonly double latency           # moving average of time to first byte (s); 0.0 until measured
    cdef readonly long long samples        # first bytes measured
    cdef long long current                 # smooth weighted round robin: its running weight
    cdef long long last_pick               # lowest-latency: its route's pick count when it was last picked
    cdef Route queue_route                 # its route when requests may queue for its slots (else None)

    # Its circuit breaker (fastgw.routing.breaker), None when the model has none; set by resilience.attach.
    cdef public Breaker breaker

    cdef bint available(self)
    cdef bint admit(self)
    cdef void succeeded(self) except *
    cdef void failed(self, str kind) except *
    cpdef void started(self)
    cpdef void first_byte(self, double seconds)
    cpdef void ended(self)


cdef class Route:
    cdef readonly str name, balancing, sticky_key
    cdef readonly list deployments
    cdef list tiers                        # the deployments by priority: lists, first tier first
    cdef int strategy                      # the balancing (ROUND_ROBIN, ... in router.pyx)
    cdef long long picks
    # Requests waiting for a deployment with a free slot (every one at max_concurrent): at most max_queue.
    cdef readonly int max_queue, queued
    cdef readonly double queue_timeout
    cdef object waiters                    # deque of _Waiter, first come first served
    # What to do when an attempt fails, and the x-fastgw-model line of its answers (b"" for "*").
    cdef public RetryPolicy retry
    cdef public bytes served_line

    cpdef Deployment pick(self, Exchange ex, list exclude=*)
    cdef Deployment _pick_in(self, list tier, list exclude, unsigned long long key)
    cdef bint any_full(self, list exclude)
    cdef void wake(self) except *


cdef class Router:
    cdef readonly dict routes
    cdef readonly Route wildcard

    cpdef Route resolve(self, model)
