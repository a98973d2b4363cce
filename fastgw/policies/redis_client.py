"""A minimal asyncio Redis client: one pipelined connection per worker, hiredis as the RESP parser.

Only what the limiters need: commands, EVALSHA with a fallback to EVAL, strict timeouts. Replies arrive in
command order, so pending calls are a FIFO of futures. Nothing hangs: connecting and every call have a
timeout; a timeout or a lost connection closes the connection (failing every pending call at once, since
their replies can no longer be matched), and after a failed connect the client fails fast for
`retry_interval` seconds instead of queueing callers behind a dead server.
"""
from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from urllib.parse import unquote, urlsplit

import hiredis

__all__ = ["RedisClient", "RedisError", "RedisUnavailable", "Script"]


class RedisError(Exception):
    """An error reply from Redis (a failed AUTH, WRONGTYPE, a bug in a script...), or the server unreachable.

    Callers treat every RedisError alike (fail open or closed): a gateway cannot fix either at request time.
    `kind` names it for metrics: the reply's error code in lower case ("wrongpass", "noauth", "wrongtype"), or
    "error"."""

    kind = "error"

    def __init__(self, message: str):
        super().__init__(message)
        code = message.split(" ", 1)[0]
        if 2 <= len(code) <= 16 and code.isalpha() and code.isupper():
            self.kind = code.lower()


class RedisUnavailable(RedisError):
    """Redis could not be reached or did not answer in time."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"redis {kind}" + (f": {detail}" if detail else ""))
        self.kind = kind        # "connect", "timeout", "closed", "down"


class Script:
    """A Lua script, called by its SHA-1 (loaded on first NOSCRIPT)."""

    def __init__(self, source: str):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


class _Protocol(asyncio.Protocol):
    def __init__(self, client: "RedisClient"):
        self.client = client
        self.reader = hiredis.Reader()
        self.pending: deque[asyncio.Future] = deque()
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.reader.feed(data)
        pending = self.pending
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self.transport.close()
                self._fail_all(RedisUnavailable("closed", f"protocol error: {exc}"))
                return
            if reply is False:
                return
            if not pending:        # a reply nobody waits for: the stream is out of step
                self.transport.close()
                return
            fut = pending.popleft()
            if not fut.done():
                if isinstance(reply, hiredis.ReplyError):
                    fut.set_exception(RedisError(str(reply)))
                else:
                    fut.set_result(reply)

    def connection_lost(self, exc):
        self.client._lost(self)
        self._fail_all(RedisUnavailable("closed", str(exc) if exc else "connection closed"))

    def _fail_all(self, err: Exception):
        while self.pending:
            fut = self.pending.popleft()
            if not fut.done():
                fut.set_exception(err)


class RedisClient:
    """RedisClient("redis://[:password@]host:port/db", connect_timeout=0.1, timeout=0.1, retry_interval=0.5).

    Use from one event loop (one client per worker). `await call(*args)` returns hiredis's decoded reply
    (bytes, int, list, None) or raises RedisError / RedisUnavailable.
    """

    def __init__(self, url: str, connect_timeout: float = 0.1, timeout: float = 0.1, retry_interval: float = 0.5):
        u = urlsplit(url)
        if u.scheme != "redis" or not u.hostname:
            from fastgw.runtime.config import redact_url   # the message is logged: never with the password
            raise ValueError(f"expected redis://host:port[/db], got {redact_url(url)!r}")
        self.host = u.hostname
        self.port = u.port or 6379
        self.password = unquote(u.password) if u.password else None
        self.username = unquote(u.username) if u.username else None
        self.db = int(u.path.strip("/") or 0)
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.retry_interval = retry_interval
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future | None = None
        self._down_until = 0.0

    async def _connection(self) -> _Protocol:
        if self._proto is not None:
            return self._proto
        if time.monotonic() < self._down_until:
            raise RedisUnavailable("down", "recent connect failure")
        if self._connecting is None:
            # A task of its own that every caller awaits shielded: the first caller's cancellation (its client
            # went away) must neither abort the connect nor leave the others waiting for it forever.
            self._connecting = asyncio.ensure_future(self._connect())
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> _Protocol:
        try:
            proto = await asyncio.wait_for(self._open(), self.connect_timeout)
        except Exception as exc:
            self._down_until = time.monotonic() + self.retry_interval
            raise (exc if isinstance(exc, RedisError) else RedisUnavailable(
                "timeout" if isinstance(exc, asyncio.TimeoutError) else "connect", str(exc))) from None
        finally:
            self._connecting = None
        self._proto = proto
        return proto

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(lambda: _Protocol(self), self.host, self.port)
        setup = []
        if self.password is not None:
            setup.append(("AUTH", self.username, self.password) if self.username else ("AUTH", self.password))
        if self.db:
            setup.append(("SELECT", str(self.db)))
        try:
            for cmd in setup:
                await self._send(proto, cmd)
        except BaseException:
            proto.transport.close()     # e.g. a wrong password: do not leak one connection per retry
            raise
        return proto

    def _send(self, proto: _Protocol, args) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        proto.pending.append(fut)
        proto.transport.write(hiredis.pack_command(tuple(args)))
        return fut

    def _lost(self, proto: _Protocol):
        if self._proto is proto:
            self._proto = None

    async def call(self, *args):
        proto = await self._connection()
        fut = self._send(proto, args)
        try:
            return await asyncio.wait_for(fut, self.timeout)
        except asyncio.TimeoutError:
            # Later replies can no longer be matched reliably with a slow server: start over.
            if self._proto is proto:
                self._proto = None
            proto.transport.close()
            raise RedisUnavailable("timeout", f"no reply in {self.timeout}s") from None

    async def evalsha(self, script: Script, keys, args):
        try:
            return await self.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except RedisError as exc:
            if isinstance(exc, RedisUnavailable) or not str(exc).startswith("NOSCRIPT"):
                raise
            return await self.call("EVAL", script.source, len(keys), *keys, *args)

    def redact(self, text: str) -> str:
        """`text` (an error message, for logs) without the password, should a server ever echo it."""
        return text.replace(self.password, "***") if self.password else text

    def close(self):
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        self._proto = None
