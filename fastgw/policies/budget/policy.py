"""Spend budgets per consumer and per group ("budget"), enforced in real time, and the cost of each request.

A budget is a limit in US dollars per period (day, week or month, UTC calendar; weeks start on Monday). At
admission the request's cost is estimated (prompt estimate x input price + max_tokens or
`default_completion_tokens` x output price) and reserved with a check against the budget in one atomic step: a
request whose reservation would go over is refused with 429, type and code "insufficient_quota", as OpenAI
does when an account is out of credit, with Retry-After until the period ends. A request whose estimate alone
exceeds a whole budget can never fit: its 429 says so, has no Retry-After and carries `x-should-retry: false`
(the OpenAI SDKs then do not retry). In `complete` the real cost (from usage) replaces the reservation and is
set in ex.cost for metrics and the access log. A request must fit every budget that applies to it (its
consumer's and its group's).

The non-chat endpoints (images, speech, transcriptions, translations, moderations, embeddings) are priced by
their own units (per image, character, minute of audio or token: media.py), both the reservation and the
charge; a charge the answer could not measure (a transcription answered as text) is an estimate, counted in
fastgw_estimated_costs_total.

Storage: "local" keeps the counters in the gateway's shared memory (exact across workers, lost on restart);
"redis" keeps them in Redis (shared by every instance, survives restarts; a key per period that expires after
it). Redis down, slow or answering an error (a failed AUTH...): `fail_open` decides (admit, or 503 "budget_unavailable"), logged and counted.
"""
from __future__ import annotations

import calendar
import time
from typing import Literal, Optional

import msgspec
import xxhash

from fastgw.policies import FieldError, completion_estimate, model_label
from fastgw.policies.ratelimit.local import arena_for
from fastgw.policies.budget import media
from fastgw.policies.budget.prices import MediaPrice, PriceTable
from fastgw.policies.ratelimit.policy import RedisConfig
from fastgw.policies.api import Policy, Reject

__all__ = ["Budget", "period_id"]


class Price(msgspec.Struct, forbid_unknown_fields=True):
    """A model's prices. Given input/output replace its token prices (one left out is 0); any given media field
    replaces its whole media entry (per_image, per_minute, per_million_characters, media_input)."""
    input: Optional[float] = None           # USD per million prompt (text input) tokens
    output: Optional[float] = None          # USD per million completion (output) tokens
    media_input: Optional[float] = None     # USD per million image or audio input tokens (default: input)
    per_image: dict[str, float] = {}        # USD per image by "quality/size" ("hd/1024x1792") or "size"
    default_quality: str = ""               # quality of a request naming none ("" or "auto": the dearest)
    default_size: str = "1024x1024"         # size of a request naming none
    per_minute: float = 0.0                 # USD per minute of input audio (transcriptions)
    per_million_characters: float = 0.0     # USD per million characters of speech input

    def has_tokens(self) -> bool:
        return self.input is not None or self.output is not None

    def has_media(self) -> bool:
        return bool(self.media_input is not None or self.per_image or self.per_minute or self.per_million_characters)

    def tokens(self) -> tuple[float, float]:
        return (self.input or 0.0, self.output or 0.0)

    def media(self) -> MediaPrice:
        return MediaPrice(media_input=self.media_input, per_image=dict(self.per_image),
                          default_quality=self.default_quality, default_size=self.default_size,
                          per_minute=self.per_minute, per_million_characters=self.per_million_characters)


class BudgetRule(msgspec.Struct, forbid_unknown_fields=True):
    usd: float                    # the limit per period
    consumer: str = ""            # a consumer name, or "*": every consumer has a budget of this size
    group: str = ""               # a group name, or "*": every group has one (shared by its consumers)
    period: Literal["day", "week", "month"] = "month"


class Config(msgspec.Struct, forbid_unknown_fields=True):
    budgets: list[BudgetRule] = []
    id: str = ""                  # namespace of the counters; default: the policy file's name
    backend: Literal["local", "redis"] = "local"
    prices: dict[str, Price] = {}          # overrides and additions to fastgw/policies/prices.py
    default_price: Optional[Price] = None  # for models with no price (else they cost 0)
    default_completion_tokens: int = 256
    fail_open: bool = True
    slots: int = 65536
    redis: RedisConfig = msgspec.field(default_factory=lambda: RedisConfig(key_prefix="fastgw:budget:"))


# Counters hold whole nano-dollars (as doubles, exact below 2**53 = $9M): sums of costs stay exact, so a budget
# of $0.01 admits exactly ten $0.001 requests.
NANO = 1e9


def _nano(usd: float) -> float:
    return float(round(usd * NANO))


_ADVERB = {"day": "daily", "week": "weekly", "month": "monthly"}
_SECONDS = {"day": 86400, "week": 7 * 86400, "month": 31 * 86400}


def period_id(period: str, t: float | None = None) -> int:
    """The UTC calendar period containing unix time `t`: days and weeks (Monday-based) since the epoch, or
    year * 12 + month - 1."""
    t = time.time() if t is None else t
    day = int(t // 86400)
    if period == "day":
        return day
    if period == "week":
        return (day + 3) // 7     # 1970-01-01 was a Thursday
    g = time.gmtime(t)
    return g.tm_year * 12 + g.tm_mon - 1


def period_end(period: str, pid: int) -> float:
    """Unix time when period `pid` ends (for Retry-After)."""
    if period == "day":
        return (pid + 1) * 86400.0
    if period == "week":
        return ((pid + 1) * 7 - 3) * 86400.0
    y, m = divmod(pid + 1, 12)
    return float(calendar.timegm((y, m + 1, 1, 0, 0, 0)))


class Budget(Policy):
    name = "budget"
    priority = 400
    needs_usage = True
    Config = Config

    def __init__(self, config: Config, ctx):
        super().__init__(config, ctx)
        for i, b in enumerate(config.budgets):
            if bool(b.consumer) == bool(b.group):
                raise FieldError(f"budgets[{i}]", "name exactly one of consumer or group")
            if b.usd < 0:
                raise FieldError(f"budgets[{i}].usd", "must be >= 0")
        for name, p in config.prices.items():
            if not p.has_tokens() and not p.has_media():
                raise FieldError(f"prices.{name}", "give a price: input/output per million tokens, media_input, "
                                 "per_image, per_minute or per_million_characters")
            if min((p.input or 0.0), (p.output or 0.0), (p.media_input or 0.0), p.per_minute,
                   p.per_million_characters, *p.per_image.values()) < 0:
                raise FieldError(f"prices.{name}", "prices must be >= 0")
            for key in p.per_image:
                size = key.rpartition("/")[2]
                w, x, h = size.partition("x")
                if not (x and w.isdigit() and h.isdigit()):
                    raise FieldError(f"prices.{name}.per_image", f"{key!r}: expected \"WxH\" or \"quality/WxH\"")
        if config.default_price is not None and not config.default_price.has_tokens():
            raise FieldError("default_price", "give input and/or output (USD per million tokens)")
        if config.slots < 8 or config.slots & (config.slots - 1):
            raise FieldError("slots", "must be a power of two >= 8")
        self.prices = PriceTable({k: v.tokens() for k, v in config.prices.items() if v.has_tokens()},
                                 config.default_price.tokens() if config.default_price else None,
                                 {k: v.media() for k, v in config.prices.items() if v.has_media()})
        self.rules = config.budgets
        self._keys: dict[tuple[int, str], int] = {}
        self._last_warn = 0.0
        if config.backend == "local":
            self.arena = arena_for(ctx.run_dir, config.slots)
        else:
            from fastgw.policies.ratelimit.redis import RedisLimiter
            from fastgw.policies.redis_client import RedisClient
            rc = config.redis
            try:
                self.client = RedisClient(rc.url, rc.connect_timeout, rc.timeout, rc.retry_interval)
            except ValueError as exc:
                raise FieldError("redis.url", str(exc)) from None
            self.remote = RedisLimiter(self.client, rc.key_prefix)

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()

    def _applicable(self, ex):
        """(rule index, rule, the consumer or group name it counts for) for every budget of this request."""
        out = []
        for i, b in enumerate(self.rules):
            if b.consumer:
                if ex.consumer and b.consumer in ("*", ex.consumer):
                    out.append((i, b, ex.consumer))
            elif ex.group and b.group in ("*", ex.group):
                out.append((i, b, ex.group))
        return out

    def _key(self, i: int, name: str) -> int:
        k = self._keys.get((i, name))
        if k is None:
            k = self._keys[(i, name)] = xxhash.xxh3_64_intdigest(f"{self.config.id}\x00{i}\x00{name}".encode())
        return k

    def _estimate(self, ex) -> float:
        usd = media.estimate(ex, self.prices)
        if usd is not None:       # images, audio: by their units
            return usd
        price = self.prices.lookup(ex.model)
        if price is None:
            return 0.0
        completion = completion_estimate(ex, self.config.default_completion_tokens)
        return (ex.prompt_tokens_estimate * price[0] + completion * price[1]) / 1e6

    # -- admission ---------------------------------------------------------------------------------------

    def request(self, ex):
        todo = self._applicable(ex)
        if not todo:
            return None
        est = _nano(self._estimate(ex))
        now = time.time()
        plan = [(i, b, name, period_id(b.period, now)) for i, b, name in todo]
        if self.config.backend == "redis":
            return self._remote_reserve(ex, plan, est)
        done = []
        for i, b, name, pid in plan:
            ok, used = self.arena.charge(self._key(i, name), pid, _nano(b.usd), est, True)
            if not ok:
                for j, _, name2, pid2 in done:
                    self.arena.charge(self._key(j, name2), pid2, 0.0, -est, False)
                self._refuse(ex, b, name, pid, used, est)
            done.append((i, b, name, pid))
        ex.new_scratch()[self] = (plan, est)
        return None

    def _rkey(self, i, b, name, pid) -> str:
        return f"{self.config.id}:{i}:{name}:{b.period}{pid}"

    async def _remote_reserve(self, ex, plan, est):
        from fastgw.policies.redis_client import RedisError
        done = []
        try:
            for i, b, name, pid in plan:
                ok, used = await self.remote.charge(self._rkey(i, b, name, pid), _nano(b.usd), est, True,
                                                    _SECONDS[b.period] + 86400)
                if not ok:
                    for j, b2, name2, pid2 in done:
                        await self.remote.charge(self._rkey(j, b2, name2, pid2), 0.0, -est, False,
                                                 _SECONDS[b2.period] + 86400)
                    self._refuse(ex, b, name, pid, used, est)
                done.append((i, b, name, pid))
        except RedisError as exc:
            self._redis_failed(exc)
            if self.config.fail_open:
                ex.new_scratch()[self] = (done, est)     # settle what was reserved
                return None
            raise Reject(503, "The budget service is unavailable; please retry shortly.", type="api_error",
                         code="budget_unavailable", headers=(("retry-after", "1"),)) from None
        ex.new_scratch()[self] = (plan, est)

    def _refuse(self, ex, b, name, pid, used, est):
        who = "group" if b.group else "consumer"
        what = f"{_ADVERB[b.period]} budget of {who} {name!r} (${b.usd:g})"
        if est > _nano(b.usd):
            # No period will ever admit it: say so, and tell SDKs not to retry (they honour x-should-retry).
            raise Reject(429, f"This request's estimated cost alone (${est / NANO:.4f}) exceeds the whole {what}. "
                         "Please reduce your prompt or max_tokens.", type="insufficient_quota",
                         code="insufficient_quota", headers=(("x-should-retry", "false"),), reason="budget")
        wait = max(1, int(period_end(b.period, pid) - time.time()))
        raise Reject(429, f"You exceeded your current quota: the {what} is spent (${used / NANO:.4f} used, this "
                     f"request is estimated at ${est / NANO:.4f}). Please check your plan and billing details.",
                     type="insufficient_quota", code="insufficient_quota",
                     headers=(("retry-after", str(wait)),), reason="budget")

    # -- accounting --------------------------------------------------------------------------------------

    def complete(self, ex):
        charge = media.units_and_cost(ex, self.prices) if ex.endpoint in media.MEDIA_ENDPOINTS else None
        if charge is not None:
            ex.cost = charge.usd
            if not charge.measured and charge.usd > 0:
                self.ctx.stats.cost_estimated(model_label(self.ctx, ex.model), ex.endpoint)
        elif ex.prompt_tokens >= 0:
            ex.cost = self.prices.cost(ex.model, ex.prompt_tokens, ex.completion_tokens)
        st = ex.scratch.pop(self, None) if ex.scratch else None
        if st is None:
            return None
        plan, est = st
        if charge is not None or ex.prompt_tokens >= 0:
            actual = _nano(ex.cost)
        elif 200 <= ex.status < 300:
            ex.cost = est / NANO   # answered but usage unknown: charge the estimate
            return None
        else:
            actual = 0.0           # refused later or failed upstream
        delta = actual - est
        if delta == 0.0:
            return None
        if self.config.backend == "redis":
            return self._remote_settle(plan, delta)
        for i, b, name, pid in plan:
            self.arena.charge(self._key(i, name), pid, 0.0, delta, False)
        return None

    async def _remote_settle(self, plan, delta):
        from fastgw.policies.redis_client import RedisError
        try:
            for i, b, name, pid in plan:
                await self.remote.charge(self._rkey(i, b, name, pid), 0.0, delta, False, _SECONDS[b.period] + 86400)
        except RedisError as exc:
            self._redis_failed(exc)

    def spent(self, name: str, rule_index: int = 0, t: float | None = None) -> float:
        """USD counted so far this period for `name` under budgets[rule_index] (local backend; for tests/admin)."""
        b = self.rules[rule_index]
        return self.arena.used(self._key(rule_index, name), period_id(b.period, t)) / NANO

    def _redis_failed(self, exc) -> None:
        self.ctx.stats.upstream_error("redis", exc.kind)
        now = time.monotonic()
        if now - self._last_warn >= 5.0:
            self._last_warn = now
            self.ctx.log.warning("redis_unavailable", policy=self.config.id, error=self.client.redact(str(exc)),
                                 fail_open=self.config.fail_open)
