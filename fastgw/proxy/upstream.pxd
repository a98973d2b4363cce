# Upstream connections and their pools (see upstream.pyx).
from fastgw.protocol.http cimport ResponseParser

cdef class UpstreamConnection
cdef class Pool


cdef class UpstreamListener:
    """What waits on an upstream response: the relay of one exchange. Every response ends in exactly one of
    upstream_end or upstream_failed. While it waits in a full pool's queue, `queued` is set; the pool then
    calls connection_ready (a released connection) or slot_ready (a slot reserved for it to connect in)."""
    cdef bint queued
    cdef void connection_ready(self, UpstreamConnection conn) except *
    cdef void slot_ready(self) except *
    cdef void upstream_head(self, ResponseParser r) except *
    cdef void upstream_body(self, object data) except *
    cdef void upstream_read_done(self) except *
    cdef void upstream_end(self) except *
    cdef void upstream_failed(self, str kind, str message) except *
    cdef void upstream_bug(self) except *
    cdef void upstream_paused(self, bint paused) except *


cdef class UpstreamConnection:
    cdef readonly Pool pool
    cdef readonly object transport
    cdef ResponseParser parser
    cdef UpstreamListener listener     # waiting on this response, or None when idle
    cdef bint reused                   # a kept-alive connection (may have been closed by the peer meanwhile)
    cdef bint got_bytes
    cdef readonly bint closed
    cdef bint counted                  # counted in its pool's `open` (until it is forgotten)
    cdef public bint body_open         # an upload's body is still being written: not reusable if answered now

    cpdef send(self, UpstreamListener listener, bytes head, bytes body)
    cdef void _advance(self, UpstreamListener listener, data) except *
    cpdef abort(self)
    cpdef close(self)


cdef class Pool:
    cdef readonly object loop, host, server_hostname, ssl, name
    cdef readonly int port, max_idle, max_connections
    cdef readonly bint tls
    cdef readonly double connect_timeout, queue_timeout
    cdef readonly list idle
    cdef readonly object waiters       # deque of queued UpstreamListeners, first come first served
    cdef readonly int open             # connections open or being opened (idle ones included)
    cdef readonly long long connects, queued
    cdef readonly double queue_wait

    cpdef UpstreamConnection acquire(self)
    cdef bint reserve(self)
    cdef void enqueue(self, UpstreamListener listener) except *
    cpdef release(self, UpstreamConnection conn)
    cpdef forget(self, UpstreamConnection conn)
    cdef bint _hand_over(self, UpstreamConnection conn) except -1
