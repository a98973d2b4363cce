"""A listening socket whose pending connections are all accepted each time it is readable.

Why not loop.create_server: uvloop (libuv) accepts one connection per event-loop iteration. While the loop
is busy with thousands of ready connections an iteration takes tens of milliseconds, so a burst of new
clients waits in the kernel's accept queue for seconds: with 2,000 clients on one worker, p99 was 11 s on a
fresh gateway while every request the gateway had read was answered within 0.3 s, and the accept queue held
~1,000 connections draining at ~100 a second. Here one readiness callback accepts up to `batch` connections
and hands each to the loop as a transport (connect_accepted_socket), so accepting keeps up with the load.
"""
from __future__ import annotations

import asyncio
import errno
import socket
from typing import Callable

# Accept errors that mean "out of descriptors or memory": pause accepting briefly instead of spinning.
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
PAUSE_ON_RESOURCE_ERROR = 0.1


def listen_socket(host: str, port: int, backlog: int = 2048, reuse_port: bool = True) -> socket.socket:
    """A non-blocking listening TCP socket. reuse_port: each worker binds its own socket to the same port and
    the kernel spreads new connections over them (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


class Listener:
    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol_factory: Callable,
                 log=None, batch: int = 1024):
        self.loop = loop
        self.sock = sock
        self.protocol_factory = protocol_factory
        self.log = log
        self.batch = batch
        self.accepted = 0
        self._reading = False
        self._closed = False

    def start(self) -> None:
        if not self._closed and not self._reading:
            self.loop.add_reader(self.sock.fileno(), self._accept)
            self._reading = True

    def close(self) -> None:
        """Stop accepting (draining); connections already accepted go on."""
        if self._closed:
            return
        self._closed = True
        if self._reading:
            self.loop.remove_reader(self.sock.fileno())
            self._reading = False
        self.sock.close()

    def _accept(self) -> None:
        for _ in range(self.batch):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    # Out of descriptors: the queued clients wait in the kernel; try again shortly.
                    if self.log is not None:
                        self.log.warning("accept paused", error=exc.strerror, pause_s=PAUSE_ON_RESOURCE_ERROR)
                    self.loop.remove_reader(self.sock.fileno())
                    self._reading = False
                    self.loop.call_later(PAUSE_ON_RESOURCE_ERROR, self.start)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue                  # that client gave up before we accepted it
                raise
            conn.setblocking(False)
            self.accepted += 1
            self.loop.create_task(self._connect(conn))

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.protocol_factory, conn)
        except OSError:
            conn.close()
