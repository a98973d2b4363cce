"""The resource map shared by several gateway instances through Redis (`[passthrough] resources_redis`).

Each instance keeps its shared-memory table (resources.py) as a local cache in front of Redis: a resource made
through any instance is written through to Redis (key `fastgw:res:<id>`, value the owner word and deployment
seed as 32 hex digits, SET NX: the first recorder owns it, as in the local table), and an id the local table does
not know is looked up in Redis before the request is routed, then cached locally (ownership never changes, so a
cached entry never goes stale; a deleted resource's requests go to its deployment, which answers 404).

Lists (GET /v1/files...) are filtered to the consumer's own resources from the local table; with a shared map
the consumer's resources are first read from Redis (a hash per owner, `fastgw:res:owner:<owner word>`, id ->
deployment seed), so a list through any instance shows what was made through every instance. Redis down, the
list is filtered with what this instance knows (never showing what is not the consumer's under `deny`).

Why a cache in front rather than Redis alone: `Passthrough.route` runs on the relay's synchronous path; only a
local miss needs a round trip (the relay then awaits the lookup before admitting the request), so requests naming
resources this instance has seen, and every request naming none, never wait on Redis.

Ordering: the write-through of a resource made by an answer is written to Redis's connection before the answer is
relayed to the client (RedisClient.submit writes at once when connected), so a client that then names the id
through another instance finds it, unless Redis itself stalls between the two. Redis down or erring: a lookup
answers 503 `resource_map_unavailable` (a resource that may exist is never reported missing, nor routed blindly),
a write-through is logged and counted, and the resource stays known to the instance that made it.
"""
from __future__ import annotations

import asyncio

from fastgw.policies.redis_client import RedisClient, RedisError

PREFIX = "fastgw:res:"
OWNER_PREFIX = "fastgw:res:owner:"


class SharedResources:
    """SharedResources(url, ttl_s): the Redis side of the resource map (lookups, write-through)."""

    def __init__(self, url: str, ttl_s: int = 0, timeout: float = 0.5, log=None, stats=None):
        self.client = RedisClient(url, connect_timeout=timeout, timeout=timeout, retry_interval=0.5)
        self.ttl = ("EX", str(ttl_s)) if ttl_s > 0 else ()
        self.log = log
        self.stats = stats
        self._warm = False

    def warm(self) -> None:
        """Open the connection at the first pass-through request, so that the first resource made is written
        through on an open connection, before its answer goes out."""
        if not self._warm:
            self._warm = True
            asyncio.ensure_future(self.client.call("PING")).add_done_callback(_ignore)

    async def fetch(self, ids, local) -> None:
        """Look up `ids` in Redis and record the ones found in the local table `local`. Raises RedisError."""
        replies = await asyncio.gather(*(self.client.call("GET", PREFIX + rid) for rid in ids))
        for rid, value in zip(ids, replies):
            parsed = _decode(value)
            if parsed is not None:
                local.record(rid, *parsed)

    async def fetch_owned(self, owner: int, local) -> None:
        """Record every resource of `owner` (its hash in Redis) in the local table. Raises RedisError."""
        owned = await self.client.call("HGETALL", f"{OWNER_PREFIX}{owner:016x}")
        for i in range(0, len(owned) - 1, 2):
            try:
                rid, seed = owned[i].decode("utf-8", "surrogatepass"), int(owned[i + 1], 16)
            except ValueError:
                continue
            known = local.lookup(rid)
            if known is None:                   # never over what is known (its first owner)
                local.record(rid, owner, seed)

    def record(self, rid: str, owner: int, seed: int) -> None:
        """Write `rid` through to Redis, and to its owner's hash (both sent before this returns when the
        connections are up). An id is made by the upstream for the request that names it, so it is new: SET NX
        only keeps a first owner should one ever be recorded twice."""
        self.client.submit("SET", PREFIX + rid, f"{owner:016x}{seed:016x}", "NX", *self.ttl).add_done_callback(
            self._written)
        self.client.submit("HSET", f"{OWNER_PREFIX}{owner:016x}", rid, f"{seed:016x}").add_done_callback(
            self._written)

    def forget(self, rid: str, owner: int) -> None:
        self.client.submit("DEL", PREFIX + rid).add_done_callback(self._written)
        self.client.submit("HDEL", f"{OWNER_PREFIX}{owner:016x}", rid).add_done_callback(self._written)

    def _written(self, fut: asyncio.Future):
        if fut.cancelled():
            return
        exc = fut.exception()
        if isinstance(exc, RedisError):
            if self.stats is not None:
                self.stats.upstream_error("redis", exc.kind)
            if self.log is not None:
                self.log.warning("resource_map_write_failed", error=self.client.redact(str(exc)))
        elif exc is not None and self.log is not None:
            self.log.error("resource_map_write_failed", error=repr(exc))

    def close(self) -> None:
        self.client.close()


def _decode(value):
    """(owner, seed) from a stored value, or None (absent or not ours)."""
    if not isinstance(value, bytes) or len(value) != 32:
        return None
    try:
        return int(value[:16], 16), int(value[16:], 16)
    except ValueError:
        return None


def _ignore(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()
