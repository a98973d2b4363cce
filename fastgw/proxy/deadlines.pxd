# What a client connection waits for. Gateway.timeouts[kind] is the longest that wait may last; the worker's
# sweeper checks each connection's deadline about once a second (no timer per request).
cdef enum:                      # Wait: what a client connection waits for
    IDLE            # keep-alive: between requests
    HEAD_WAIT       # a request (or PROXY) head has started arriving
    BODY_WAIT       # the head is in, the body is not
    UPSTREAM_WAIT   # sent upstream, no response head yet
    STREAMING       # between two pieces of a response being relayed
    WRITING         # the client stopped reading (its transport's buffer is full)
    WAIT_KINDS      # the number of kinds, not a kind


from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec


cdef inline double now() noexcept:
    """time.perf_counter()'s clock (CLOCK_MONOTONIC), without a Python call: the clock of every deadline."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9
