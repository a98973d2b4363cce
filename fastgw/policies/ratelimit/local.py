"""The "local" limiter backend: token buckets and period counters in the gateway's shared-memory arena.

Exact across the workers of one gateway (they map the same file in run_dir); not shared between instances.
An item is (key_hash, capacity, refill_per_s, amount). Every call is synchronous and takes well under a
microsecond per bucket: no awaitable on the hot path.
"""
from __future__ import annotations

import os

from fastgw.policies.ratelimit.bucket import BucketArena

__all__ = ["arena_for", "LocalLimiter"]

_ARENAS: dict[tuple[str, int], BucketArena] = {}


def arena_for(run_dir: str, slots: int = 65536) -> BucketArena:
    """This process's mapping of the gateway's arena (one per run_dir and size; re-opened after a fork)."""
    path = os.path.join(run_dir, f"fastgw-buckets-{slots}.shm")
    k = (path, os.getpid())
    a = _ARENAS.get(k)
    if a is None:
        a = _ARENAS[k] = BucketArena(path, slots)
    return a


class LocalLimiter:
    def __init__(self, arena: BucketArena):
        self.arena = arena

    def take_all(self, items) -> tuple[int, list[float]]:
        """Take from every bucket or from none: (index of the first refusing bucket or -1, remaining per item).
        On a refusal, what was taken from earlier buckets is given back."""
        take = self.arena.take
        rem = []
        for i, (key, cap, rate, amount) in enumerate(items):
            ok, r = take(key, cap, rate, amount)
            rem.append(r)
            if not ok:
                give = self.arena.give_back
                for key2, cap2, rate2, amount2 in items[:i]:
                    give(key2, cap2, rate2, amount2)
                return i, rem
        return -1, rem

    def settle(self, items) -> None:
        """Give back `amount` per bucket (negative: take more, never refusing)."""
        give = self.arena.give_back
        for key, cap, rate, amount in items:
            give(key, cap, rate, amount)

    def charge(self, key: int, period: int, limit: float, amount: float, check: bool = True):
        return self.arena.charge(key, period, limit, amount, check)
