"""Request and token rate limits ("rate-limit"): an ordered list of rules, token buckets, OpenAI's headers.

A rule matches requests on consumer, group, model, path and headers (glob patterns; all given conditions must
hold), and limits requests and/or tokens per window. `per` says what gets a bucket of its own, like Envoy's
descriptors: per = ["consumer", "model"] gives each consumer x model pair its own limit; per = ["client"] one per
client address (the PROXY protocol's, behind a load balancer); per = [] makes one bucket shared by every
matching request. Every matching rule applies (a request must pass all of them), in
order, until a matching rule with `final = true`.

A limit of N per window is a token bucket of capacity N refilled at N/window per second: a burst of N, then a
steady N per window. Token rules reserve an estimate at admission (prompt estimate + max_tokens, or
`default_completion_tokens`, times n) and settle in `complete` with the real usage, giving back what was
over-reserved or taking the excess (never refusing: the bucket goes into debt and later requests wait).
Requests refused or failed upstream without usage give their tokens back; a request still counts as a request.

Refusals are OpenAI's: 429 "Rate limit reached ..." with Retry-After (seconds until the request fits) and the
refusing bucket's x-ratelimit-{limit,remaining,reset}-<requests|tokens>. A request larger than a bucket's whole
capacity ("Request too large") can never fit: still 429 as OpenAI answers it, with the limits, but no Retry-After
and `x-should-retry: false`, which the OpenAI SDKs obey instead of retrying.

Streaming does not dodge limits: the gateway asks the upstream for usage (needs_usage) or counts the streamed
text, and `complete` settles either way.

Backends: local (shared memory, exact across workers), redis (exact across instances), hybrid (leases; see
redis.py for the bound). When Redis fails (unreachable, too slow, or any error reply: a failed AUTH, WRONGTYPE...),
`fail_open` decides: admit, or refuse with 503 (code "rate_limiter_unavailable", Retry-After: 1): a 503 says the
gateway, not the client, is at fault.
Either way the failure is logged (at most every 5 s) and counted in upstream_errors{upstream="redis"}.
"""
from __future__ import annotations

import math
import operator
import re
import time
from fnmatch import translate
from typing import Literal, Union

import msgspec
import xxhash

from fastgw.policies.ratelimit.bucket import BucketPlan
from fastgw.policies import FieldError, completion_estimate
from fastgw.policies.ratelimit.local import LocalLimiter, arena_for
from fastgw.policies.ratelimit.admission import LocalAdmission
from fastgw.policies.api import Policy, Reject
from fastgw.policies.usage import fill_counted_usage

__all__ = ["RateLimit", "format_duration", "Matcher"]

WINDOWS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_ABBR = {"second": "s", "minute": "min", "hour": "h", "day": "day"}
_LETTER = {"second": "S", "minute": "M", "hour": "H", "day": "D"}

Patterns = Union[str, list[str]]


class Match(msgspec.Struct, forbid_unknown_fields=True):
    consumer: Patterns = []       # glob patterns; empty = any
    group: Patterns = []
    model: Patterns = []
    path: Patterns = []
    header: Patterns = []         # "name=glob" (all must hold), or "name" alone: the header is present


class Rule(msgspec.Struct, forbid_unknown_fields=True):
    id: str = ""                  # names the rule's buckets; default "rules[i]" (renaming resets its buckets)
    match: Match = msgspec.field(default_factory=Match)
    per: list[str] = []           # consumer | group | model | path | client | header:<name>
    window: Literal["second", "minute", "hour", "day"] = "minute"
    requests: int = 0             # per window; 0 = no request limit in this rule
    tokens: int = 0               # prompt + completion tokens per window; 0 = no token limit
    final: bool = False           # when this rule matches, later rules are not looked at


class RedisConfig(msgspec.Struct, forbid_unknown_fields=True):
    url: str = "redis://127.0.0.1:6379/0"
    connect_timeout: float = 0.1  # seconds
    timeout: float = 0.1          # seconds per call
    retry_interval: float = 0.5   # after a failed connect, fail fast this long before trying again
    key_prefix: str = "fastgw:rl:"


class Config(msgspec.Struct, forbid_unknown_fields=True):
    rules: list[Rule]
    id: str = ""                  # namespace of the buckets; default: the policy file's name
    backend: Literal["local", "redis", "hybrid"] = "local"
    fail_open: bool = True        # Redis unreachable or erring: admit (true) or refuse with 503 (false)
    default_completion_tokens: int = 256   # completion estimate when the request gives no max_tokens
    headers: bool = True          # add x-ratelimit-* headers to responses
    slots: int = 65536            # shared-memory table size (distinct buckets), a power of two
    lease: float = 0.1            # hybrid: fraction of a bucket's capacity taken from Redis per lease
    lease_ttl: float = 10.0       # hybrid: seconds a lease stays usable
    redis: RedisConfig = msgspec.field(default_factory=RedisConfig)


def format_duration(s: float) -> str:
    """OpenAI's reset format: "20ms", "1s", "1.5s", "6m0s", "1h2m3s"."""
    ms = int(s * 1000 + 0.5)
    if ms <= 0:
        return "0s" if s <= 0 else "1ms"
    if ms < 1000:
        return f"{ms}ms"
    m, ms = divmod(ms, 60000)
    secs = f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms / 1000:.3f}".rstrip("0") + "s"
    if m == 0:
        return secs
    h, m = divmod(m, 60)
    return f"{h}h{m}m{secs}" if h else f"{m}m{secs}"


class Matcher:
    """Glob patterns over one string: exact names in a set, globs in one compiled regex."""

    __slots__ = ("any", "exact", "rx")

    def __init__(self, patterns: Patterns):
        pats = [patterns] if isinstance(patterns, str) else list(patterns)
        self.any = not pats or "*" in pats
        self.exact = frozenset(p for p in pats if not any(c in p for c in "*?["))
        globs = [translate(p) for p in pats if p not in self.exact]
        self.rx = re.compile("|".join(globs)).match if globs else None

    def __call__(self, s: str) -> bool:
        return self.any or s in self.exact or (self.rx is not None and self.rx(s) is not None)


class _Rule:
    """A compiled rule: matchers, per-key getters, bucket parameters."""

    def __init__(self, index: int, r: Rule, ns: str):
        where = f"rules[{index}]"
        if r.requests < 0 or r.tokens < 0:
            raise FieldError(where, "requests and tokens must be >= 0")
        if r.requests == 0 and r.tokens == 0:
            raise FieldError(where, "set requests and/or tokens (per window)")
        self.id = r.id or where
        self.window = r.window
        self.final = r.final
        secs = WINDOWS[r.window]
        self.requests = float(r.requests)
        self.tokens = float(r.tokens)
        self.req_rate = r.requests / secs
        self.tok_rate = r.tokens / secs
        m = r.match
        # Only the conditions that restrict anything are checked per request.
        self.checks = [(attr, mt) for attr, mt in (("consumer", Matcher(m.consumer)), ("group", Matcher(m.group)),
                                                   ("model", Matcher(m.model)), ("path", Matcher(m.path)))
                       if not mt.any]
        # Header lines are made of constant parts: built once here, not per response.
        self.hdr = {what: (b"x-ratelimit-limit-%s: %d\r\nx-ratelimit-remaining-%s: " % (what.encode(), cap, what.encode()),
                           b"\r\nx-ratelimit-reset-%s: " % what.encode())
                    for what, cap in (("requests", r.requests), ("tokens", r.tokens))}
        self.headers = []
        for j, h in enumerate([m.header] if isinstance(m.header, str) else m.header):
            name, eq, pat = h.partition("=")
            name = name.strip().lower()
            if not name:
                raise FieldError(f"{where}.match.header[{j}]", "expected \"name=value\" or \"name\"")
            self.headers.append((name.encode("latin-1"), Matcher(pat) if eq else None))
        self.per = []
        for j, p in enumerate(r.per):
            if p in ("consumer", "group", "model", "path"):
                self.per.append((p, None))
            elif p == "client":           # the client's address: the PROXY header's one behind a balancer
                self.per.append(("client_addr", None))
            elif p.startswith("header:") and len(p) > 7:
                self.per.append(("header", p[7:].strip().lower().encode("latin-1")))
            else:
                raise FieldError(f"{where}.per[{j}]", f"unknown key {p!r} (consumer, group, model, path, "
                                 "client, header:<name>)")
        self.prefix = f"{ns}\x00{self.id}\x00"
        self.keys: dict[tuple, tuple[int, int]] = {}   # per-values -> (requests key, tokens key)

    def matches(self, ex) -> bool:
        for attr, m in self.checks:
            if not m(getattr(ex, attr)):
                return False
        for name, m in self.headers:
            v = ex.header(name)
            if v is None or (m is not None and not m(v.decode("latin-1"))):
                return False
        return True

    def bucket_keys(self, ex) -> tuple[int, int]:
        vals = per_values(self.per, ex)
        k = self.keys.get(vals)
        if k is None:
            base = self.prefix + "\x00".join(vals)
            b = base.encode("utf-8", "surrogatepass")
            k = (xxhash.xxh3_64_intdigest(b + b"\x00r"), xxhash.xxh3_64_intdigest(b + b"\x00t"))
            if len(self.keys) > 65536:   # values may come from headers: bound the cache
                self.keys.clear()
            self.keys[vals] = k
        return k


def per_values(per, ex) -> tuple:
    """The request's values of the `per` keys (kind, header name) of a rule."""
    vals = []
    for kind, name in per:
        if kind == "header":
            v = ex.header(name)
            vals.append(v.decode("latin-1") if v is not None else "")
        else:
            vals.append(getattr(ex, kind))
    return tuple(vals)


_PLAN_CACHE = 4096     # distinct (consumer, model, ...) tuples whose plans are kept
_NO_PLAN = object()


def _no_key(ex) -> tuple:
    return ()


class _Plan(BucketPlan):
    """The buckets one kind of request takes from: a BucketPlan (admission in C), plus per bucket its
    (key, capacity, rate) and (rule, "requests" or "tokens"), for refusal messages and the Redis backends."""

    __slots__ = ("base", "kinds", "tag")

    def __init__(self, keys: list, caps: list, rates: list, is_tok: list, heads: list, kinds: list, tag: str = ""):
        super().__init__(keys, caps, rates, is_tok, heads)
        self.base = list(zip(keys, caps, rates))
        self.kinds = kinds
        self.tag = tag          # the Redis hash tag of every bucket of the plan (one cluster slot)

    def items(self, tokens: float) -> list:
        """(key, capacity, rate, amount) per bucket, for the limiters' take_all."""
        return [(k, cap, rate, float(tokens) if what == "tokens" else 1.0)
                for (k, cap, rate), (_, what) in zip(self.base, self.kinds)]

    def settle_items(self, diff: float) -> list:
        """(key, capacity, rate, diff) per tokens bucket, for the limiters' settle."""
        return [(k, cap, rate, diff) for (k, cap, rate), (_, what) in zip(self.base, self.kinds) if what == "tokens"]


class RateLimit(Policy):
    name = "rate-limit"
    priority = 300
    needs_usage = True
    Config = Config

    def __init__(self, config: Config, ctx):
        super().__init__(config, ctx)
        if not config.rules:
            raise FieldError("rules", "at least one rule is needed")
        if config.slots < 8 or config.slots & (config.slots - 1):
            raise FieldError("slots", "must be a power of two >= 8")
        if not 0 < config.lease <= 1:
            raise FieldError("lease", "must be in (0, 1]")
        if config.default_completion_tokens < 0:
            raise FieldError("default_completion_tokens", "must be >= 0")
        self.rules = [_Rule(i, r, config.id) for i, r in enumerate(config.rules)]
        # Redis keys carry a hash tag made of the `per` keys every rule has (e.g. the consumer): all the buckets
        # one request takes from are then in one Redis Cluster slot, so one Lua script takes them atomically, and
        # different consumers' buckets spread over the cluster. No key common to every rule: one slot per policy.
        self._tag_per = [p for p in self.rules[0].per if all(p in r.per for r in self.rules[1:])]
        self.backend = config.backend
        self._last_warn = 0.0
        # What the plan cache is keyed on: only the request attributes and headers some rule looks at.
        attrs, hdrs = [], []
        for r in self.rules:
            attrs += [attr for attr, _ in r.checks] + [kind for kind, _ in r.per if kind != "header"]
            hdrs += [name for name, _ in r.headers] + [name for kind, name in r.per if kind == "header"]
        attrs = tuple(dict.fromkeys(attrs))
        self._key_headers = tuple(dict.fromkeys(hdrs))
        self._key_of_attrs = operator.attrgetter(*attrs) if attrs else _no_key
        self._plan_key = self._key_with_headers if self._key_headers else self._key_of_attrs
        self._headers = config.headers
        self._default_completion = config.default_completion_tokens
        self._plans: dict[tuple, _Plan | None] = {}
        if config.backend == "local":
            self.limiter = LocalLimiter(arena_for(ctx.run_dir, config.slots))
            # Every request of the local backend runs the compiled copy of request() and complete() below
            # (ratelimit_admission.pyx: the same steps, one C call each instead of ~100 bytecodes); the
            # Python methods stay the reference it is tested against. Not when a subclass overrides either.
            if type(self).request is RateLimit.request and type(self).complete is RateLimit.complete:
                fast = LocalAdmission(self, self.limiter.arena, None if self._key_headers else attrs,
                                      config.headers, config.default_completion_tokens)
                self.request = fast.request
                self.complete = fast.complete
        else:
            from fastgw.policies.ratelimit.redis import HybridLimiter, RedisLimiter
            from fastgw.policies.redis_client import RedisClient
            rc = config.redis
            try:
                client = RedisClient(rc.url, rc.connect_timeout, rc.timeout, rc.retry_interval)
            except ValueError as exc:
                raise FieldError("redis.url", str(exc)) from None
            self.client = client
            self.remote = RedisLimiter(client, rc.key_prefix)
            if config.backend == "redis":
                self.limiter = self.remote
            else:
                self.limiter = HybridLimiter(arena_for(ctx.run_dir, config.slots), self.remote,
                                             config.lease, config.lease_ttl)

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()

    # -- admission ---------------------------------------------------------------------------------------
    #
    # Which rules apply and which buckets they name depend only on a few strings of the request (consumer,
    # group, model, path, client address, some headers: only those some rule looks at). So the result, a
    # _Plan, is computed once per distinct tuple of them and cached; the typical config (rules keyed by
    # consumer) caches one plan per consumer. The cache is bounded because models, paths and headers are
    # client-chosen: when full it is emptied, so a client minting names only costs itself the cache misses.
    # Admission is then one call into C (BucketPlan.reserve): the takes, the rollback on a refusal and the
    # header lines. With the local backend, the whole of request() and complete() runs compiled
    # (ratelimit_admission.pyx), since nothing in them waits.

    def _key_with_headers(self, ex) -> tuple:
        return self._key_of_attrs(ex), tuple([ex.header(name) for name in self._key_headers])

    def _new_plan(self, key, ex):
        plan = self._make_plan(ex)
        if len(self._plans) >= _PLAN_CACHE:
            self._plans.clear()
        self._plans[key] = plan
        return plan

    def _make_plan(self, ex):
        """The buckets of every rule that applies to `ex` (None when none does)."""
        keys, caps, rates, is_tok, heads, kinds = [], [], [], [], [], []
        for r in self.rules:
            if not r.matches(ex):
                continue
            kr, kt = r.bucket_keys(ex)
            for what, key, cap, rate in (("requests", kr, r.requests, r.req_rate), ("tokens", kt, r.tokens, r.tok_rate)):
                if cap:
                    keys.append(key)
                    caps.append(cap)
                    rates.append(rate)
                    is_tok.append(what == "tokens")
                    heads.append(r.hdr[what])
                    kinds.append((r, what))
            if r.final:
                break
        if not keys:
            return None
        return _Plan(keys, caps, rates, is_tok, heads, kinds, self._tag(ex))

    def _tag(self, ex) -> str:
        b = "\x00".join((self.config.id,) + per_values(self._tag_per, ex)).encode("utf-8", "surrogatepass")
        return f"{xxhash.xxh3_64_intdigest(b):016x}"

    # The x-ratelimit-* lines are added to ex.response_headers at admission (there is no response_headers
    # hook: one Python call less per request); every response to the request carries them, refusals by
    # later policies and upstream errors included, as OpenAI's do.

    def request(self, ex):
        key = self._plan_key(ex)
        plan = self._plans.get(key, _NO_PLAN)
        if plan is _NO_PLAN:
            plan = self._new_plan(key, ex)
        if plan is None:
            return None
        tokens = (ex.prompt_tokens_estimate + completion_estimate(ex, self._default_completion)
                  if plan.has_tokens else 0)
        if self.backend == "local":          # the reference of the compiled path (ratelimit_admission.pyx)
            fail = plan.reserve(self.limiter.arena, tokens, self._headers)
            if fail >= 0:
                self._refuse(ex, plan, fail, tokens, plan.remaining(fail))
            if self._headers:
                ex.response_headers.append(plan.headers)
            ex.new_scratch()[self] = (plan, tokens)
            return None
        items = plan.items(tokens)
        if self.backend == "hybrid":
            res = self.limiter.try_take_all(items)
            if res is not None:
                return self._decide(ex, plan, tokens, res[0], res[1])
        return self._remote_take(ex, plan, tokens, items)

    async def _remote_take(self, ex, plan, tokens, items):
        from fastgw.policies.redis_client import RedisError
        try:
            fail, rem = await self.limiter.take_all(items, plan.tag)
        except RedisError as exc:
            self._redis_failed(exc)
            if self.config.fail_open:
                return None
            raise Reject(503, "The rate limiter is unavailable; please retry shortly.", type="api_error",
                         code="rate_limiter_unavailable", headers=(("retry-after", "1"),)) from None
        self._decide(ex, plan, tokens, fail, rem)

    def _decide(self, ex, plan, tokens, fail, rem):
        if fail >= 0:
            self._refuse(ex, plan, fail, tokens, rem[fail])
        if self._headers:
            ex.response_headers.append(plan.header_lines(rem))
        ex.new_scratch()[self] = (plan, tokens)
        return None

    def _refuse(self, ex, plan, i, tokens, left):
        rule, what = plan.kinds[i]
        if what == "requests":
            cap, rate, amount = rule.requests, rule.req_rate, 1.0
        else:
            cap, rate, amount = rule.tokens, rule.tok_rate, float(tokens)
        unit = f"{what} per {_ABBR[rule.window]} ({'R' if what == 'requests' else 'T'}P{_LETTER[rule.window]})"
        # The refusing bucket's x-ratelimit-* headers, as on admissions (reset: until the bucket is full again).
        limits = ((f"x-ratelimit-limit-{what}", str(int(cap))),
                  (f"x-ratelimit-remaining-{what}", str(int(left) if left > 0 else 0)),
                  (f"x-ratelimit-reset-{what}", format_duration((cap - left) / rate if rate > 0 else 0.0)))
        if amount > cap:
            # Bigger than the bucket: no wait makes it fit, so no Retry-After (it would promise that a retry can
            # succeed). Still 429 with OpenAI's wording and code, as OpenAI answers it; x-should-retry: false
            # stops the OpenAI SDKs' automatic retries, and x-ratelimit-limit-* says how large a request may be.
            raise Reject(429, f"Request too large for {ex.model} on {unit}: Limit {int(cap)}, Requested "
                         f"{int(amount)}. Please reduce your prompt or max_tokens.", type=what,
                         code="rate_limit_exceeded", headers=limits + (("x-should-retry", "false"),),
                         reason="rate_limit")
        wait = (amount - left) / rate if rate > 0 else float(WINDOWS[rule.window])
        used = max(0, round(cap - max(left, 0.0)))
        raise Reject(429, f"Rate limit reached for {ex.model} on {unit}: Limit {int(cap)}, Used {used}, "
                     f"Requested {int(amount)}. Please try again in {format_duration(wait)}.", type=what,
                     code="rate_limit_exceeded", headers=(("retry-after", str(max(1, math.ceil(wait)))),) + limits,
                     reason="rate_limit")

    # -- response ----------------------------------------------------------------------------------------

    def complete(self, ex):
        scratch = ex.scratch
        if not scratch:
            return None
        st = scratch.pop(self, None)
        if st is None:
            return None
        plan, tokens = st
        if not plan.has_tokens:
            return None
        prompt = ex.prompt_tokens
        if prompt >= 0:
            completion = ex.completion_tokens
            actual = float(prompt + completion if completion > 0 else prompt)
        elif 200 <= ex.status < 300:
            if not fill_counted_usage(ex):   # moderations, embeddings without usage: their input tokens
                return None      # answered but usage unknown: keep the estimate
            actual = float(ex.prompt_tokens)
        else:
            actual = 0.0         # refused later or failed upstream: nothing was used
        if tokens == actual:
            return None
        if self.backend == "local":
            plan.settle(self.limiter.arena, tokens, actual)
            return None
        settle = plan.settle_items(tokens - actual)
        if self.backend == "redis":
            return self._remote_settle(settle, plan.tag)
        self.limiter.settle(settle)
        return None

    async def _remote_settle(self, settle, tag):
        from fastgw.policies.redis_client import RedisError
        try:
            await self.limiter.settle(settle, tag)
        except RedisError as exc:
            self._redis_failed(exc)

    def _redis_failed(self, exc) -> None:
        self.ctx.stats.upstream_error("redis", exc.kind)
        now = time.monotonic()
        if now - self._last_warn >= 5.0:
            self._last_warn = now
            self.ctx.log.warning("redis_unavailable", policy=self.config.id, error=self.client.redact(str(exc)),
                                 fail_open=self.config.fail_open)
