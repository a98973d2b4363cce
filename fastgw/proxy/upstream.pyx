# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Upstream connections (one response at a time, kept alive in a pool per address) and their pools.

Invariants:
- An UpstreamConnection carries one request at a time and reports its response to one UpstreamListener through
  upstream_head, upstream_body, then exactly one of upstream_end / upstream_failed.
- A connection that sent bytes nobody asked for, broke mid-response, or was given up by its listener is never
  reused: it is aborted and forgotten by its pool.
- A kept-alive connection that dies before answering reports "stale" (the request may be sent again: the
  upstream never saw it), anything else "reset" or "protocol".
"""
import asyncio
import socket

from fastgw.protocol import http as H

cdef int _NEED_DATA = H.NEED_DATA, _HEAD = H.HEAD, _BODY = H.BODY, _END = H.END


cdef class UpstreamListener:
    """Base of what waits on an upstream response (fastgw.proxy.relay.Relay); its methods are overridden."""

    cdef void upstream_head(self, ResponseParser r) except *:
        pass

    cdef void upstream_body(self, object data) except *:
        pass

    cdef void upstream_end(self) except *:
        pass

    cdef void upstream_failed(self, str kind, str message) except *:
        pass

    cdef void upstream_bug(self) except *:
        """Our own code raised while handling the response: the listener decides what the client sees."""
        self.upstream_failed("internal", "the gateway failed to relay the response")


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
                # Back to the pool before the listener continues, which may want a connection at once.
                if p.keep_alive and not self.closed:
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

    def pause_writing(self):     # requests are small: nothing to slow down
        pass

    def resume_writing(self):
        pass

    cpdef abort(self):
        """Drop the connection at once (cancel what is in flight); never reused."""
        self.listener = None
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            self.transport.abort()

    cpdef close(self):
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            self.transport.close()


cdef class Pool:
    """Idle keep-alive connections to one upstream address, in one worker."""

    def __init__(self, loop, deployment, int max_idle, double connect_timeout):
        self.loop = loop
        self.host, self.port, self.tls, self.ssl = deployment.host, deployment.port, deployment.tls, deployment.ssl
        self.server_hostname = deployment.server_hostname
        self.idle = []
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout

    cpdef UpstreamConnection acquire(self):
        cdef UpstreamConnection conn
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def connect(self):
        _, conn = await asyncio.wait_for(
            self.loop.create_connection(
                lambda: UpstreamConnection(self), self.host, self.port,
                ssl=self.ssl, server_hostname=self.server_hostname),
            self.connect_timeout)
        return conn

    cpdef release(self, UpstreamConnection conn):
        if len(self.idle) < self.max_idle:
            self.idle.append(conn)
        else:
            conn.close()

    cpdef forget(self, UpstreamConnection conn):
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
            pool = self.pools[deployment.pool_key] = Pool(
                self.loop, deployment, self.cfg.max_idle_per_upstream, self.cfg.connect_timeout)
        return pool

    def close(self):
        for pool in self.pools.values():
            pool.close()
