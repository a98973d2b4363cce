"""The "redis" and "hybrid" limiter backends.

redis: every bucket lives in Redis; one Lua script checks and takes from all the buckets of a request in one
round trip, atomically (exact across every instance sharing the Redis). Time is Redis's TIME, so instances
with skewed clocks still agree. A bucket is a hash {t: tokens, s: stamp in µs}; a missing key is a full bucket,
and keys expire once they would be full again, so idle buckets cost no memory.

hybrid: each gateway instance keeps a *pool* per bucket in its shared-memory arena and fills it with leases
of quota taken from the Redis bucket (a chunk of `lease` x capacity at a time). The hot path takes from the pool
in shared memory and only goes to Redis when the pool runs dry. Leases expire after `lease_ttl` seconds (a pool
belongs to one lease epoch; a new epoch starts empty), so unused quota does not pile up.

Over-admission bound (hybrid): every admitted token was first taken from the Redis bucket, so admissions can
exceed what one exact bucket would admit only by quota leased earlier and spent later. Over any interval:

    admitted <= exact-bucket admissions + I x W x (chunk + a)

with I instances, W workers per instance (concurrent leasers), chunk the lease size and a the largest single
request amount; and within one lease epoch the extra is at most what was leased before the interval began.
A burst from a full bucket admits exactly the capacity (nothing is created, pools drain before re-leasing).
The price is under-admission: quota sitting in one instance's pool is not available to another instance until
it expires (at most I x (chunk + a) per bucket).
"""
from __future__ import annotations

import math
import time

from fastgw.policies.ratelimit.bucket import BucketArena
from fastgw.policies.redis_client import RedisClient, Script

__all__ = ["RedisLimiter", "HybridLimiter", "TAKE", "LEASE", "CHARGE"]

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

    def _key(self, key_hash: int) -> str:
        return f"{self.prefix}{key_hash:016x}"

    async def _run(self, mode: str, items):
        keys = [self._key(it[0]) for it in items]
        args = [mode]
        for _, cap, rate, amount in items:
            args += (repr(float(cap)), repr(float(rate)), repr(float(amount)))
        return await self.client.evalsha(TAKE, keys, args)

    async def take_all(self, items) -> tuple[int, list[float]]:
        """As LocalLimiter.take_all, atomically in one round trip."""
        out = await self._run("take", items)
        return int(out[0]) - 1, [float(x) for x in out[1:]]

    async def settle(self, items) -> None:
        await self._run("settle", items)

    async def lease(self, key_hash: int, cap: float, rate: float, want: float, need: float) -> tuple[float, float]:
        out = await self.client.evalsha(LEASE, [self._key(key_hash)],
                                        [repr(float(cap)), repr(float(rate)), repr(float(want)), repr(float(need))])
        return float(out[0]), float(out[1])

    async def charge(self, key: str, limit: float, amount: float, check: bool, ttl_s: int) -> tuple[bool, float]:
        out = await self.client.evalsha(CHARGE, [self.prefix + key],
                                        [repr(float(limit)), repr(float(amount)), "1" if check else "0", str(ttl_s)])
        return bool(int(out[0])), float(out[1])


class HybridLimiter:
    """Pools in shared memory filled by leases from Redis buckets (see the module doc for the bound).

    A pool is an arena counter whose period is the lease epoch: its balance is minus the amount "used", so a
    lease is a negative charge and an admission a checked charge of `amount` against a limit of 0.
    """

    def __init__(self, arena: BucketArena, remote: RedisLimiter, lease: float = 0.1, lease_ttl: float = 10.0):
        self.arena = arena
        self.remote = remote
        self.lease = lease
        self.lease_ns = max(1, int(lease_ttl * 1e9))
        self.remote_left: dict[int, float] = {}   # last tokens-left seen in Redis per bucket (for headers)

    @staticmethod
    def pool_key(key_hash: int) -> int:
        return (key_hash ^ 0x5851F42D4C957F2D) & 0xFFFFFFFFFFFFFFFF

    def _epoch(self) -> int:
        return time.monotonic_ns() // self.lease_ns

    def balance(self, key_hash: int) -> float:
        return -self.arena.used(self.pool_key(key_hash), self._epoch())

    def try_take_all(self, items):
        """From the pools only: (-1, remaining) when every pool had enough, else None (a lease is needed)."""
        epoch = self._epoch()
        charge = self.arena.charge
        rem = []
        for i, (key, cap, rate, amount) in enumerate(items):
            ok, used = charge(self.pool_key(key), epoch, 0.0, amount, True)
            if not ok:
                for key2, _, _, amount2 in items[:i]:
                    charge(self.pool_key(key2), epoch, 0.0, -amount2, False)
                return None
            rem.append(self.remote_left.get(key, cap) - used)
        return -1, rem

    async def take_all(self, items) -> tuple[int, list[float]]:
        res = self.try_take_all(items)
        if res is not None:
            return res
        for _ in range(3):
            for i, (key, cap, rate, amount) in enumerate(items):
                need = amount - self.balance(key)
                if need <= 0:
                    continue
                want = max(math.ceil(cap * self.lease), need)
                grant, left = await self.remote.lease(key, cap, rate, want, need)
                self.remote_left[key] = left
                if grant > 0:
                    self.arena.charge(self.pool_key(key), self._epoch(), 0.0, -grant, False)
                if grant < need:
                    return i, [self.remote_left.get(k, c) + self.balance(k) for k, c, _, _ in items]
            res = self.try_take_all(items)
            if res is not None:
                return res
        # Other workers kept draining the pools between our leases: refuse rather than loop.
        return 0, [self.remote_left.get(k, c) + self.balance(k) for k, c, _, _ in items]

    def settle(self, items) -> None:
        """Give back to (or take more from) this instance's pools; never waits on Redis."""
        epoch = self._epoch()
        for key, _, _, amount in items:
            self.arena.charge(self.pool_key(key), epoch, 0.0, -amount, False)
