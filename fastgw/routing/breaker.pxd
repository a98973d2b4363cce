# Circuit breakers of deployments, in shared memory (see breaker.pyx). The relay calls a deployment's breaker
# through routing.Deployment (available, admit, succeeded, failed): C calls, no Python on the request path.
from libc.stdint cimport int64_t, uint32_t, uint64_t

cdef enum:
    CLOSED = 0          # requests flow; failures are counted
    HALF_OPEN = 1       # cool-down over: half_open_probes requests may go; a success closes, a failure re-opens
    OPEN = 2            # requests skip the deployment until cooldown_s has passed


cdef class BreakerTable:
    cdef char* base
    cdef char* slots              # fgb_slot[mask + 1], see breaker.pyx
    cdef Py_ssize_t size
    cdef uint64_t mask
    cdef uint32_t me
    cdef readonly str path

    cdef void* _slot(self, uint64_t key) except NULL


cdef class Breaker:
    cdef readonly BreakerTable table  # keeps the mapping alive while the breaker exists
    cdef void* slot
    cdef readonly int consecutive_failures, min_requests, half_open_probes
    cdef readonly double error_rate
    cdef int64_t window_ns, cooldown_ns
    cdef uint32_t me
    cdef public object on_open        # called (no arguments) when this worker opened it: counts it in /metrics

    cdef bint available(self) noexcept
    cdef bint admit(self) noexcept
    cdef bint succeeded(self) noexcept
    cdef bint failed(self) noexcept
    cdef bint _available(self, int64_t now) noexcept
    cdef bint _admit(self, int64_t now) noexcept
    cdef bint _record(self, bint ok, int64_t now) noexcept
