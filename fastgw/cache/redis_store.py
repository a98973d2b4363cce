"""The response cache's Redis backend: shared by every instance of the gateway, one key per entry.

Each entry is one string key (`key_prefix` + the key's hex), set with its TTL (`SET k v PX ms`), so it works on any
Redis deployment the client speaks to (one key per command: Cluster-safe). A Redis that is down, slow or erring is
a miss, never an error: a lookup waits at most the client's connect and call timeouts (and not at all for
`retry_interval` after a failed connect), and a failed store is dropped. Failures are logged (throttled) and counted
in upstream_errors{upstream="redis-cache"}.
"""
from __future__ import annotations

import asyncio

from fastgw.observability.logs import LogThrottle
from fastgw.policies.redis_client import RedisClient, RedisError


class RedisStore:
    is_remote = True

    def __init__(self, cfg, log, stats):
        self.client = RedisClient(cfg.url, connect_timeout=cfg.connect_timeout, timeout=cfg.timeout,
                                  retry_interval=cfg.retry_interval)
        self.prefix = cfg.key_prefix.encode()
        self.stats = stats
        self.warn = LogThrottle(log, 5.0)
        self.tasks: set = set()

    async def get(self, key: bytes):
        try:
            value = await self.client.call("GET", self.prefix + key.hex().encode())
        except RedisError as exc:
            self._failed(exc)
            return None
        return value if isinstance(value, bytes) else None

    def put(self, key: bytes, entry: bytes, ttl: float) -> bool:
        ms = max(1, int(ttl * 1000))
        task = asyncio.get_running_loop().create_task(self._put(self.prefix + key.hex().encode(), entry, ms))
        self.tasks.add(task)                # kept until done (the loop holds tasks weakly)
        task.add_done_callback(self.tasks.discard)
        return True

    async def _put(self, k: bytes, entry: bytes, ms: int):
        try:
            await self.client.call("SET", k, entry, "PX", str(ms))
        except RedisError as exc:
            self._failed(exc)

    def _failed(self, exc: RedisError):
        self.stats.upstream_error("redis-cache", exc.kind)
        self.warn.warning("cache redis failed", error=self.client.redact(str(exc)))

    def close(self):
        for t in list(self.tasks):
            t.cancel()
        self.client.close()
