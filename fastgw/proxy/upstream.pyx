# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Upstream connections (one response at a time, kept alive in a pool per address) and their pools.

Invariants:
- An UpstreamConnection carries one request at a time and reports its response to one UpstreamListener through
  upstream_head, upstream_body, then exactly one of upstream_end / upstream_failed.
- A connection that sent bytes nobody asked for (while idle, or after a response's end in the same read),
  broke mid-response, or was given up by its listener is never reused: it is closed and forgotten by its pool.
- A kept-alive connection that dies before answering reports "stale" (the request may be sent again: the
  upstream never saw it), anything else "reset" or "protocol".
- A pool never has more than max_connections open (connecting, busy or idle). A request that finds none idle
  and the pool full waits in a first-come-first-served queue for one to be released (handed over directly)
  or closed (its slot handed over), for at most queue_timeout; then PoolBusy. Idle connections are kept up to
  max_idle, so a steady load reuses them instead of opening and closing one per request.
"""
import asyncio
import socket
import struct
from collections import deque

from fastgw.protocol import http as H

cdef int _NEED_DATA = H.NEED_DATA, _HEAD = H.HEAD, _BODY = H.BODY, _END = H.END
cdef bytes _LINGER_ZERO = struct.pack("ii", 1, 0)


cdef class UpstreamListener:
    """Base of what waits on an upstream response (fastgw.proxy.relay.Relay); its methods are overridden."""

    cdef void connection_ready(self, UpstreamConnection conn) except *:
        pass

    cdef void slot_ready(self) except *:
        pass

    cdef void upstream_head(self, ResponseParser r) except *:
        pass

    cdef void upstream_body(self, object data) except *:
        pass

    cdef void upstream_read_done(self) except *:
        """One read of the upstream is processed: what it produced for the client may go out now."""
        pass

    cdef void upstream_end(self) except *:
        pass

    cdef void upstream_failed(self, str kind, str message) except *:
        pass

    cdef void upstream_bug(self) except *:
        """Our own code raised while handling the response: the listener decides what the client sees."""
        self.upstream_failed("internal", "the gateway failed to relay the response")

    cdef void upstream_paused(self, bint paused) except *:
        """The connection's write buffer is full (True) or drained again (False): an upload slows its client."""
        pass


cdef class UpstreamConnection:
    def __init__(self, Pool pool):
        self.pool = pool
        self.parser = ResponseParser()

    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    cpdef send(self, UpstreamListener listener, bytes head, bytes body):
        self.listener = listener
        self.got_bytes = False
        self.body_open = False
        self.parser.start(False)
        self.transport.writelines((head, body))    # one writev, no 5 KB concatenation

    def data_received(self, data):
        cdef UpstreamListener listener = self.listener
        if listener is None:        # bytes nobody asked for: the connection is not trustworthy any more
            self.abort()
            return
        self.got_bytes = True
        try:
            self._advance(listener, data)
            listener.upstream_read_done()
        except Exception:
            # A bug must cost one request, not hang it: drop the connection, let the listener answer.
            if self.listener is listener:
                self.abort()
            listener.upstream_bug()

    cdef void _advance(self, UpstreamListener listener, data) except *:
        cdef ResponseParser p = self.parser
        cdef int ev
        p.feed(data)
        while True:
            ev = p.next_event()
            if ev == _BODY:
                listener.upstream_body(p.take_body())
            elif ev == _NEED_DATA:
                return
            elif ev == _HEAD:
                listener.upstream_head(p)
            elif ev == _END:
                self.listener = None
                # Back to the pool before the listener continues, which may want a connection at once; but
                # not with bytes after the response's end: nobody asked for them, and kept they would be read
                # as the next request's answer (another client's).
                if p.keep_alive and not self.closed and not self.body_open and p.pos == p.end and p.pending is None:
                    self.reused = True
                    self.pool.release(self)
                else:
                    self.close()
                listener.upstream_end()
                return
            else:
                self.listener = None
                self.abort()
                listener.upstream_failed("protocol", "the upstream sent an invalid response: " + p.error_message)
                return
            if self.listener is None:  # the listener gave up on this response during a callback
                return

    def eof_received(self):
        return None

    def connection_lost(self, exc):
        self.closed = True
        self.pool.forget(self)
        cdef UpstreamListener listener = self.listener
        if listener is None:
            return
        self.listener = None
        cdef ResponseParser p = self.parser
        p.feed_eof()
        ev = p.next_event()
        while ev == _BODY:
            listener.upstream_body(p.take_body())
            ev = p.next_event()
        if ev == _END:
            listener.upstream_end()
        elif self.reused and not self.got_bytes:
            listener.upstream_failed("stale", "the kept-alive upstream connection was closed")
        else:
            listener.upstream_failed("reset", "the upstream closed the connection before the response was complete")

    def pause_writing(self):     # only an upload writes more than a request's head and JSON: it slows down
        if self.listener is not None:
            self.listener.upstream_paused(True)

    def resume_writing(self):
        if self.listener is not None:
            self.listener.upstream_paused(False)

    cpdef abort(self):
        """Drop the connection at once (cancel what is in flight); never reused. It ends with a TCP reset: a FIN
        can read as a half-close, which a server may still answer at its cost; a reset says the request is off."""
        self.listener = None
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
                except OSError:
                    pass
            self.transport.abort()

    cpdef close(self):
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            self.transport.close()


class PoolBusy(Exception):
    """Every connection of the pool stayed busy for the whole queue timeout."""


cdef class _FutureWaiter(UpstreamListener):
    """A queued place for Pool.connect: the future gets the connection, or None for a reserved slot."""
    cdef readonly object fut

    def __init__(self, fut):
        self.fut = fut

    cdef void connection_ready(self, UpstreamConnection conn) except *:
        self.fut.set_result(conn)

    cdef void slot_ready(self) except *:
        self.fut.set_result(None)


cdef class Pool:
    """Keep-alive connections to one upstream address, in one worker, at most max_connections of them."""

    def __init__(self, loop, deployment, int max_idle, double connect_timeout, int max_connections=1024,
                 double queue_timeout=10.0):
        self.loop = loop
        self.host, self.port, self.tls, self.ssl = deployment.host, deployment.port, deployment.tls, deployment.ssl
        self.server_hostname = deployment.server_hostname
        self.name = deployment.name
        self.idle = []
        self.max_idle = max_idle
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.queue_timeout = queue_timeout
        self.waiters = deque()

    cpdef UpstreamConnection acquire(self):
        """An idle connection, or None (then `connect`)."""
        cdef UpstreamConnection conn
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    cdef bint reserve(self):
        """Count one more connection if the pool has room for it (the caller then opens it with `open_one`)."""
        if self.open < self.max_connections:
            self.open += 1
            return True
        return False

    cdef void enqueue(self, UpstreamListener listener) except *:
        """`listener` waits for a connection: the pool calls its connection_ready or slot_ready, first come
        first served. It leaves the queue by clearing its `queued` flag (skipped when its turn comes)."""
        listener.queued = True
        self.waiters.append(listener)
        self.queued += 1

    async def connect(self):
        """A connection for one request, waiting in the queue when the pool is full (the Python form of
        acquire / reserve / enqueue). Raises PoolBusy after queue_timeout, OSError or asyncio.TimeoutError
        when the upstream cannot be reached."""
        if self.reserve():
            return await self.open_one()
        waiter = _FutureWaiter(self.loop.create_future())
        self.enqueue(waiter)
        t0 = self.loop.time()
        try:
            got = await asyncio.wait_for(waiter.fut, self.queue_timeout)
        except asyncio.TimeoutError:
            waiter.queued = False
            raise PoolBusy(f"all {self.max_connections} connections to {self.name} stayed busy for "
                           f"{self.queue_timeout:g} s") from None
        finally:
            self.queue_wait += self.loop.time() - t0
        if got is None:          # a closed connection's slot, reserved for this request
            return await self.open_one()
        return got

    async def open_one(self, double timeout=0.0):
        """Open a connection in a slot already counted in `open` (reserve, or slot_ready), within `timeout`
        seconds (a deployment's own connect timeout), else the pool's connect_timeout."""
        self.connects += 1
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: UpstreamConnection(self), self.host, self.port,
                    ssl=self.ssl, server_hostname=self.server_hostname),
                timeout if timeout > 0 else self.connect_timeout)
        except BaseException:
            self.open -= 1
            if self._hand_over(None):
                self.open += 1
            raise
        (<UpstreamConnection>conn).counted = True
        return conn

    cdef bint _hand_over(self, UpstreamConnection conn) except -1:
        """Give `conn` (or, when None, a free slot) to the first listener still queued; False when none is."""
        cdef UpstreamListener w
        waiters = self.waiters
        while waiters:
            w = <UpstreamListener>waiters.popleft()
            if w.queued:
                w.queued = False
                if conn is not None:
                    w.connection_ready(conn)
                else:
                    w.slot_ready()
                return True
        return False

    def waiting(self):
        """Listeners queued now."""
        return sum(1 for w in self.waiters if (<UpstreamListener>w).queued)

    def note_wait(self, double seconds):
        self.queue_wait += seconds

    cpdef release(self, UpstreamConnection conn):
        if self._hand_over(conn):
            return
        if len(self.idle) < self.max_idle:
            self.idle.append(conn)
        else:
            conn.close()

    cpdef forget(self, UpstreamConnection conn):
        if conn.counted:
            conn.counted = False
            self.open -= 1
            if self.waiters:              # the slot goes to the first waiter, who opens a connection in it
                self.open += 1
                if not self._hand_over(None):
                    self.open -= 1
        if self.idle:
            try:
                self.idle.remove(conn)
            except ValueError:
                pass

    def close(self):
        for conn in list(self.idle):
            conn.close()
        self.idle.clear()


class Pools:
    """All pools of a worker, kept across config reloads (keyed by address, not by config object)."""

    def __init__(self, loop, upstream_cfg):
        self.loop = loop
        self.cfg = upstream_cfg
        self.pools = {}

    def get(self, deployment):
        pool = self.pools.get(deployment.pool_key)
        if pool is None:
            c = self.cfg
            pool = self.pools[deployment.pool_key] = Pool(
                self.loop, deployment, c.max_idle_per_upstream, c.connect_timeout, c.max_connections_per_upstream,
                c.queue_timeout)
        return pool

    def close(self):
        for pool in self.pools.values():
            pool.close()

    def report(self):
        """(upstream, open, idle, waiting, connects, queued, queue_wait_s) per pool, for metrics and status."""
        return [(p.name, p.open, len(p.idle), p.waiting(), p.connects, p.queued, p.queue_wait)
                for p in self.pools.values()]
