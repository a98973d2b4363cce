"""The semantic cache's embeddings client: the gateway's own POST /v1/embeddings to a model of its config.

Not a client's request: no policy, limit or access-log line sees it (its failures count in
fastgw_upstream_errors_total{upstream="cache-embeddings"}). It goes to the model's deployments in order (the next
one after a failure) with each deployment's request line and header lines (host, key, its own headers), over a few
kept-alive connections of its own (at most MAX_IDLE idle per deployment), read by the gateway's HTTP parser, like
fastgw.routing.upstream_models. Everything is bounded by `timeout`: a slow, failing or malformed answer is None (the
lookup is a miss), never an error; after a failure, embeddings are not asked for `retry_interval` seconds, so a
deployment that is down costs requests nothing.
"""
from __future__ import annotations

import asyncio
import base64

import numpy as np
import orjson

from fastgw.observability.logs import LogThrottle
from fastgw.protocol import http as H

MAX_IDLE = 8                     # kept-alive connections per deployment
MAX_BODY = 4 * 1024 * 1024       # a larger answer to one input is not an embedding
_ENDPOINT = "/v1/embeddings"
_HEADERS = b"content-type: application/json\r\naccept: application/json\r\n"


class EmbeddingFailed(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class _Stale(Exception):
    """A kept-alive connection closed before answering."""


class Embedder:
    def __init__(self, model: str, deployments: list, timeout: float, retry_interval: float, loop, log, stats):
        self.model = model
        self.deployments = [d for d in deployments if _ENDPOINT in d.request_lines and not d.provider.translates]
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.loop = loop
        self.stats = stats
        self.warn = LogThrottle(log, 5.0)
        self.idle: dict = {}             # deployment -> [(reader, writer)] kept alive
        self.resume_at = 0.0             # loop time before which no embedding is asked (after a failure)

    async def embed(self, text: str) -> np.ndarray | None:
        """The text's vector (float32), or None: failed, timed out, or paused after a failure."""
        if self.loop.time() < self.resume_at or not self.deployments:
            return None
        try:
            return await asyncio.wait_for(self._embed(text), self.timeout)
        except asyncio.TimeoutError:
            self._failed("timeout", f"no embedding within {self.timeout}s")
        except EmbeddingFailed as exc:
            self._failed(exc.kind, str(exc))
        except (OSError, ValueError) as exc:
            self._failed("connect" if isinstance(exc, OSError) else "protocol", str(exc))
        return None

    async def _embed(self, text: str) -> np.ndarray:
        last = None
        for d in self.deployments:
            body = orjson.dumps({"model": d.model or self.model, "input": text, "encoding_format": "base64"})
            try:
                answer = await self._post(d, body)
            except OSError as exc:       # could not connect, or reset: the next deployment
                last = exc
                continue
            return _vector(answer)
        raise last if last is not None else EmbeddingFailed("connect", "no deployment")

    async def _post(self, d, body: bytes) -> bytes:
        idle = self.idle.get(d)
        while idle:
            try:
                return await self._exchange(d, idle.pop(), body, True)
            except _Stale:                   # the upstream closed it while it was idle: the next one
                continue
        conn = await asyncio.wait_for(
            asyncio.open_connection(d.host, d.port, ssl=d.ssl, server_hostname=d.server_hostname), d.connect_timeout)
        return await self._exchange(d, conn, body, False)

    async def _exchange(self, d, conn, body: bytes, reused: bool) -> bytes:
        reader, writer = conn
        kept = False
        got = False
        try:
            writer.write(d.request_lines[_ENDPOINT] + d.header_lines + _HEADERS
                         + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            p = H.ResponseParser()
            p.start(False)
            parts = []
            size = 0
            while True:
                ev = p.next_event()
                if ev == H.NEED_DATA:
                    try:
                        data = await reader.read(65536)
                    except OSError:
                        if reused and not got:
                            raise _Stale from None
                        raise
                    if data:
                        got = True
                        p.feed(data)
                    elif reused and not got:
                        raise _Stale
                    else:
                        p.feed_eof()
                elif ev == H.BODY:
                    part = p.take_body()
                    size += len(part)
                    if size > MAX_BODY:
                        raise EmbeddingFailed("protocol", f"an answer larger than {MAX_BODY} bytes")
                    parts.append(part)
                elif ev == H.END:
                    break
                elif ev == H.ERROR:
                    raise EmbeddingFailed("protocol", p.error_message)
            if p.status != 200:
                raise EmbeddingFailed(f"http_{p.status}", f"status {p.status}")
            if p.keep_alive and len(self.idle.setdefault(d, [])) < MAX_IDLE:
                self.idle[d].append(conn)
                kept = True
            return b"".join(parts)
        finally:
            if not kept:                     # done with, failed, timed out or cancelled: never reused
                writer.transport.abort()

    def _failed(self, kind: str, message: str) -> None:
        self.resume_at = self.loop.time() + self.retry_interval
        self.stats.upstream_error("cache-embeddings", kind)
        self.warn.warning("cache embeddings failed", model=self.model, error=message)

    def close(self) -> None:
        for conns in self.idle.values():
            for _, writer in conns:
                writer.transport.abort()
        self.idle.clear()


def _vector(answer: bytes) -> np.ndarray:
    """data[0].embedding of an OpenAI embeddings answer (base64 or a list of floats)."""
    try:
        emb = orjson.loads(answer)["data"][0]["embedding"]
        if isinstance(emb, str):
            v = np.frombuffer(base64.b64decode(emb, validate=True), dtype="<f4")
        else:
            v = np.asarray(emb, dtype=np.float32)
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise EmbeddingFailed("protocol", f"not an embeddings answer ({exc.__class__.__name__})") from None
    if v.ndim != 1 or v.size == 0 or not np.isfinite(v).all():
        raise EmbeddingFailed("protocol", "not a vector")
    return v
