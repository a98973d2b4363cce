"""Keep-alive connection pools to upstreams, one pool per (host, port, tls) in each worker.

An UpstreamConnection carries one request at a time for the client connection that holds it and reports the
response back through four calls on that client: upstream_head(parser), upstream_body(bytes), upstream_end(),
upstream_failed(kind, message). Responses are parsed by the compiled fastgw._core.http.ResponseParser.
"""
from __future__ import annotations

import asyncio
import socket

from fastgw._core import http as H
from fastgw.router import Target, tls_context

_NEED_DATA, _HEAD, _BODY, _END = H.NEED_DATA, H.HEAD, H.BODY, H.END


class UpstreamConnection(asyncio.Protocol):
    __slots__ = ("pool", "transport", "parser", "client", "reused", "got_bytes", "closed")

    def __init__(self, pool: "Pool"):
        self.pool = pool
        self.transport = None
        self.parser = H.ResponseParser()
        self.client = None          # the ClientConnection waiting on this response, or None when idle
        self.reused = False         # a kept-alive connection (may have been closed by the peer meanwhile)
        self.got_bytes = False
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def send(self, client, data: bytes) -> None:
        self.client = client
        self.got_bytes = False
        self.parser.start(False)
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:          # bytes nobody asked for: the connection is not trustworthy any more
            self.abort()
            return
        self.got_bytes = True
        try:
            self._advance(client, data)
        except Exception:
            # A bug must cost one request, not hang it: log, drop the connection, tell the client.
            client.gw.log.exception("upstream response handling failed")
            if self.client is client:
                self.abort()
                client.upstream_failed("internal", "the gateway failed to relay the response")

    def _advance(self, client, data: bytes) -> None:
        p = self.parser
        p.feed(data)
        while True:
            ev = p.next_event()
            if ev == _BODY:
                client.upstream_body(p.take_body())
            elif ev == _NEED_DATA:
                return
            elif ev == _HEAD:
                client.upstream_head(p)
            elif ev == _END:
                self.client = None
                # Back to the pool before the client continues, which may want a connection at once.
                if p.keep_alive and not self.closed:
                    self.reused = True
                    self.pool.release(self)
                else:
                    self.close()
                client.upstream_end()
                return
            else:
                self.client = None
                self.abort()
                client.upstream_failed("protocol", "the upstream sent an invalid response: " + p.error_message)
                return
            if self.client is None:  # the client went away during a callback
                return

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.pool.forget(self)
        client = self.client
        if client is None:
            return
        self.client = None
        p = self.parser
        p.feed_eof()
        ev = p.next_event()
        while ev == _BODY:
            client.upstream_body(p.take_body())
            ev = p.next_event()
        if ev == _END:
            client.upstream_end()
        elif self.reused and not self.got_bytes:
            client.upstream_failed("stale", "the kept-alive upstream connection was closed")
        else:
            client.upstream_failed("reset", "the upstream closed the connection before the response was complete")

    def pause_writing(self) -> None:     # the upstream reads our request slowly: nothing to pause, requests are small
        pass

    def resume_writing(self) -> None:
        pass

    def abort(self) -> None:
        """Drop the connection at once (cancel what is in flight); never reused."""
        self.client = None
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            self.transport.abort()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            self.transport.close()


class Pool:
    """Idle keep-alive connections to one upstream address."""

    __slots__ = ("loop", "host", "port", "tls", "server_hostname", "idle", "max_idle", "connect_timeout",
                 "connecting", "busy")

    def __init__(self, loop, target: Target, max_idle: int, connect_timeout: float):
        self.loop = loop
        self.host, self.port, self.tls = target.host, target.port, target.tls
        self.server_hostname = target.server_hostname
        self.idle: list[UpstreamConnection] = []
        self.busy = 0
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self.connecting = 0

    def acquire(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def connect(self) -> UpstreamConnection:
        self.connecting += 1
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: UpstreamConnection(self), self.host, self.port,
                    ssl=tls_context() if self.tls else None, server_hostname=self.server_hostname),
                self.connect_timeout)
            return conn
        finally:
            self.connecting -= 1

    def release(self, conn: UpstreamConnection) -> None:
        if len(self.idle) < self.max_idle:
            self.idle.append(conn)
        else:
            conn.close()

    def forget(self, conn: UpstreamConnection) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def close(self) -> None:
        for conn in list(self.idle):
            conn.close()
        self.idle.clear()


class Pools:
    """All pools of a worker, kept across config reloads (keyed by address, not by config object)."""

    def __init__(self, loop, upstream_cfg):
        self.loop = loop
        self.cfg = upstream_cfg
        self.pools: dict[tuple, Pool] = {}

    def get(self, target: Target) -> Pool:
        pool = self.pools.get(target.pool_key)
        if pool is None:
            pool = self.pools[target.pool_key] = Pool(
                self.loop, target, self.cfg.max_idle_per_upstream, self.cfg.connect_timeout)
        return pool

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
