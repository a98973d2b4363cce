"""The "redis" and "hybrid" limiter backends.

redis: every bucket lives in Redis; one Lua script checks and takes from all the buckets of a request in one
round trip, atomically (exact across every instance sharing the Redis). Time is Redis's TIME, so instances
with skewed clocks still agree. A bucket is a hash {t: tokens, s: stamp in µs}; a missing key is a full bucket,
and keys expire once they would be full again, so idle buckets cost no memory.

hybrid: each gateway instance keeps a *pool* per bucket in its shared-memory arena and fills it with leases
of quota taken from the Redis bucket (a chunk of `lease` x capacity at a time). The hot path takes from the pool
in shared memory and only goes to Redis when the pool runs dry. Leases expire after `lease_ttl` seconds (a pool
belongs to one lease epoch; a new epoch drops the unused quota, so it does not pile up, but keeps a debt: tokens
used beyond a reservation were never taken from Redis, and the next lease takes them first). A worker has at
most one lease in flight per bucket: its concurrent requests short on that bucket await it, then look at the
pool again; a request is refused only when neither the pool nor Redis has what it needs.

Over-admission bound (hybrid): every admitted token was first taken from the Redis bucket (debts are paid by
the next lease), so admissions can exceed what one exact bucket would admit only by quota leased earlier and
spent later. Over any interval:

    admitted <= exact-bucket admissions + I x W x (chunk + a)

with I instances, W workers per instance (one lease in flight each), chunk the lease size and a the largest
single request amount; and within one lease epoch the extra is at most what was leased before the interval
began. A burst from a full bucket admits at most the capacity (nothing is created, pools drain before
re-leasing). The price is under-admission: quota sitting in one instance's pool is not available to another
instance until it is spent there or expires (at most I x (chunk + a) per bucket).
"""
from __future__ import annotations

import asyncio
import math
import time

from fastgw.policies.ratelimit.bucket import BucketArena
from fastgw.policies.redis_client import RedisClient, RedisError, Script

__all__ = ["RedisLimiter", "HybridLimiter", "TAKE", "LEASE", "CHARGE", "SETTLE_RETRY_S"]

SETTLE_RETRY_S = 5.0  # a settle that could not be sent is tried again this long (a failover takes seconds)
_MAX_LEASES = 3     # leases one request may make itself before it gives up (others keep draining the pools)

_REFILL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function load(key, cap, rate)
  local v = redis.call('HMGET', key, 't', 's')
  local tok, st = tonumber(v[1]), tonumber(v[2])
  if tok == nil then return cap end
  if now > st and tok < cap then tok = math.min(cap, tok + (now - st) * 1e-6 * rate) end
  return tok
end
local function store(key, cap, rate, tok)
  redis.call('HSET', key, 't', string.format('%.17g', tok), 's', string.format('%.17g', now))
  if rate > 0 then
    redis.call('PEXPIRE', key, math.ceil((cap - math.min(tok, cap)) / rate * 1000) + 1000)
  end
end
"""

# KEYS: the buckets. ARGV[1] = "take" | "settle"; then per bucket: capacity, refill per second, amount.
# take: all or nothing; returns {index of the first refusing bucket (1-based) or 0, tokens left per bucket...}.
# settle: add `amount` (negative takes more, never refusing).
TAKE = Script(_REFILL + """
local mode = ARGV[1]
local n = #KEYS
local toks = {}
local fail = 0
for i = 1, n do
  local cap, amt = tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i+1])
  toks[i] = load(KEYS[i], cap, tonumber(ARGV[3*i]))
  if mode == 'take' and fail == 0 and toks[i] < amt then fail = i end
end
local out = {fail}
for i = 1, n do
  local cap, rate, amt = tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i]), tonumber(ARGV[3*i+1])
  local tok = toks[i]
  if mode == 'settle' then
    tok = math.min(cap, tok + amt)
    store(KEYS[i], cap, rate, tok)
  elseif fail == 0 then
    tok = tok - amt
    store(KEYS[i], cap, rate, tok)
  end
  out[i + 1] = string.format('%.17g', tok)
end
return out
""")

# KEYS[1]: the bucket. ARGV: capacity, refill per second, want, need. Grants min(want, tokens) if at least
# `need` tokens are there, else nothing. Returns {granted, tokens left}.
LEASE = Script(_REFILL + """
local cap, rate, want, need = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local tok = load(KEYS[1], cap, rate)
local grant = 0
if tok >= need then grant = math.min(want, tok) end
if grant > 0 then store(KEYS[1], cap, rate, tok - grant) end
return {string.format('%.17g', grant), string.format('%.17g', tok - grant)}
""")

# KEYS[1]: a period counter (the period is in the key). ARGV: limit, amount, check ("1"/"0"), ttl seconds.
# Returns {1 if added else 0, amount used after}.
CHARGE = Script("""
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local amt = tonumber(ARGV[2])
if ARGV[3] == '1' and used + amt > tonumber(ARGV[1]) then return {0, string.format('%.17g', used)} end
used = used + amt
redis.call('SET', KEYS[1], string.format('%.17g', used), 'EX', ARGV[4])
return {1, string.format('%.17g', used)}
""")


class RedisLimiter:
    """Buckets in Redis; every method is a coroutine and may raise RedisError (RedisUnavailable when unreachable)."""

    def __init__(self, client: RedisClient, prefix: str = "fastgw:rl:"):
        self.client = client
        self.prefix = prefix

    def _key(self, key_hash: int, tag: str) -> str:
        # "{tag}": the hash tag that puts every bucket of one request in one cluster slot (see RateLimit._tag).
        return f"{self.prefix}{{{tag}}}{key_hash:016x}"

    async def _run(self, mode: str, items, tag: str, retry_for: float = 0.0):
        keys = [self._key(it[0], tag) for it in items]
        args = [mode]
        for _, cap, rate, amount in items:
            args += (repr(float(cap)), repr(float(rate)), repr(float(amount)))
        return await self.client.evalsha(TAKE, keys, args, retry_for)

    async def take_all(self, items, tag: str) -> tuple[int, list[float]]:
        """As LocalLimiter.take_all, atomically in one round trip. `tag`: the buckets' hash tag."""
        out = await self._run("take", items, tag)
        return int(out[0]) - 1, [float(x) for x in out[1:]]

    async def settle(self, items, tag: str) -> None:
        """Correct reservations with the real usage; tried again for SETTLE_RETRY_S while Redis cannot be
        reached (a failover): the admission was counted, its correction should be too."""
        await self._run("settle", items, tag, SETTLE_RETRY_S)

    async def lease(self, key_hash: int, cap: float, rate: float, want: float, need: float,
                    tag: str) -> tuple[float, float]:
        out = await self.client.evalsha(LEASE, [self._key(key_hash, tag)],
                                        [repr(float(cap)), repr(float(rate)), repr(float(want)), repr(float(need))])
        return float(out[0]), float(out[1])

    async def charge(self, key: str, limit: float, amount: float, check: bool, ttl_s: int) -> tuple[bool, float]:
        """Add `amount` to a period counter (checked against `limit` when `check`). An unchecked charge (a
        settle, a give-back) is tried again for SETTLE_RETRY_S while Redis cannot be reached."""
        out = await self.client.evalsha(CHARGE, [self.prefix + key],
                                        [repr(float(limit)), repr(float(amount)), "1" if check else "0", str(ttl_s)],
                                        0.0 if check else SETTLE_RETRY_S)
        return bool(int(out[0])), float(out[1])


class HybridLimiter:
    """Pools in shared memory filled by leases from Redis buckets (see the module doc for the bound).

    A pool is an arena counter whose period is the lease epoch: its balance is minus the amount "used", so a
    lease is a negative charge and an admission a checked charge of `amount` against a limit of 0. A new epoch
    drops what is left of the leases but keeps a debt (keep_debt): tokens used beyond what was reserved were
    never taken from Redis, so the next lease must cover them first.

    Concurrent requests of one worker short on the same bucket share one lease in flight: one leases, the
    others await it and look at the pool again, so a burst does not lease a chunk per request (stranding the
    quota of the requests that lose the race) nor refuse while the pool holds what a neighbour just leased.
    """

    def __init__(self, arena: BucketArena, remote: RedisLimiter, lease: float = 0.1, lease_ttl: float = 10.0):
        self.arena = arena
        self.remote = remote
        self.lease = lease
        self.lease_ns = max(1, int(lease_ttl * 1e9))
        self.remote_left: dict[int, float] = {}   # last tokens-left seen in Redis per bucket (for headers)
        # bucket key -> this worker's lease in flight; resolves to Redis's tokens left after it (None: unknown)
        self._leasing: dict[int, asyncio.Future] = {}
        # Looks at the pools per request, waits on others' leases included: a guard against looping forever.
        # A bucket holds 1/lease chunks, so a burst is served (or Redis runs dry) within about that many.
        self.max_rounds = math.ceil(2 / lease) + 8

    @staticmethod
    def pool_key(key_hash: int) -> int:
        return (key_hash ^ 0x5851F42D4C957F2D) & 0xFFFFFFFFFFFFFFFF

    def _epoch(self) -> int:
        return time.monotonic_ns() // self.lease_ns

    def balance(self, key_hash: int) -> float:
        return -self.arena.used(self.pool_key(key_hash), self._epoch(), True)

    def try_take_all(self, items):
        """From the pools only: (-1, remaining) when every pool had enough, else None (a lease is needed)."""
        epoch = self._epoch()
        charge = self.arena.charge
        rem = []
        for i, (key, cap, rate, amount) in enumerate(items):
            ok, used = charge(self.pool_key(key), epoch, 0.0, amount, True, True)
            if not ok:
                for key2, _, _, amount2 in items[:i]:
                    charge(self.pool_key(key2), epoch, 0.0, -amount2, False, True)
                return None
            rem.append(self.remote_left.get(key, cap) - used)
        return -1, rem

    def _short(self, items) -> int:
        """The index of the first bucket whose pool lacks the request's amount, or -1."""
        for i, (key, _, _, amount) in enumerate(items):
            if self.balance(key) < amount:
                return i
        return -1

    def _remaining(self, items) -> list[float]:
        return [self.remote_left.get(k, c) + self.balance(k) for k, c, _, _ in items]

    async def take_all(self, items, tag: str) -> tuple[int, list[float]]:
        res = self.try_take_all(items)
        if res is not None:
            return res
        own = 0
        for _ in range(self.max_rounds):
            i = self._short(items)
            if i < 0:           # enough everywhere now, unless another worker takes it first
                res = self.try_take_all(items)
                if res is not None:
                    return res
                continue
            key, cap, rate, amount = items[i]
            pending = self._leasing.get(key)
            if pending is not None:
                left = await asyncio.shield(pending)    # shield: our cancellation must not cancel theirs
            elif own < _MAX_LEASES:
                own += 1
                left = await self._lease(key, cap, rate, amount - self.balance(key), tag)
            else:
                break
            res = self.try_take_all(items)
            if res is not None:
                return res
            if left is not None and amount - self.balance(key) > left:
                return i, self._remaining(items)        # neither the pool nor Redis has enough for us
        # Other workers kept draining the pools between our leases: refuse rather than loop.
        i = self._short(items)
        return max(i, 0), self._remaining(items)

    async def _lease(self, key: int, cap: float, rate: float, need: float, tag: str) -> float | None:
        """Lease a chunk (at least `need`) from Redis into the pool of bucket `key`; requests of this worker
        that need it meanwhile await this lease. Returns Redis's tokens left (the grant is 0 when fewer than
        `need` were there)."""
        fut = self._leasing[key] = asyncio.get_running_loop().create_future()
        try:
            grant, left = await self.remote.lease(key, cap, rate, max(math.ceil(cap * self.lease), need), need, tag)
            self.remote_left[key] = left
            if grant > 0:
                self.arena.charge(self.pool_key(key), self._epoch(), 0.0, -grant, False, True)
            fut.set_result(left)
            return left
        except RedisError as exc:        # the waiters fail the same way (and follow fail_open)
            fut.set_exception(exc)
            fut.exception()              # retrieved, even when nobody waited
            raise
        finally:
            if not fut.done():           # cancelled: the waiters look at the pool and lease themselves
                fut.set_result(None)
            if self._leasing.get(key) is fut:
                del self._leasing[key]

    def settle(self, items) -> None:
        """Give back to (or take more from) this instance's pools; never waits on Redis."""
        epoch = self._epoch()
        for key, _, _, amount in items:
            self.arena.charge(self.pool_key(key), epoch, 0.0, -amount, False, True)
