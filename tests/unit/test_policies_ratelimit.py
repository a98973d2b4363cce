"""rate-limit with the local (shared-memory) backend: rule matching, buckets, reservation and settling, headers."""
import time

import orjson
import pytest

from fastgw.errors import GatewayError
from fastgw.policies.ratelimit.policy import Config, Match, Matcher, RateLimit, Rule, format_duration


def make(ctx, *rules, **kw):
    return RateLimit(Config(rules=list(rules), id="t", **kw), ctx)


def headers(ex):
    out = {}
    raw = b"".join(ex.response_headers).decode()
    assert raw.endswith("\r\n")
    for line in raw.split("\r\n")[:-1]:
        k, _, v = line.partition(": ")
        out[k] = v
    return out


@pytest.mark.parametrize("s,expect", [
    (0, "0s"), (0.02, "20ms"), (0.0004, "1ms"), (1, "1s"), (1.5, "1.5s"), (360, "6m0s"), (59.9996, "1m0s"),
    (3723, "1h2m3s"), (86400, "24h0m0s"), (7.66, "7.66s"),
])
def test_format_duration_like_openai(s, expect):
    assert format_duration(s) == expect


def test_matcher():
    m = Matcher(["gpt-4o", "o3*", "claude-?"])
    assert m("gpt-4o") and m("o3-mini") and m("claude-3") and not m("gpt-4o-mini") and not m("claude-35")
    assert Matcher([])("x") and Matcher("*")("") and Matcher("a")("a") and not Matcher("a")("b")


def test_rule_matching_on_every_field(policy_ctx, make_exchange):
    rl = make(policy_ctx, Rule(id="r", requests=1, match=Match(consumer="alice", group=["g*"], model="gpt-4o*",
                                                               path="/v1/chat/*", header=["x-tier=free", "x-team"])))
    r = rl.rules[0]
    ok = dict(consumer="alice", group="g1", model="gpt-4o-mini", path="/v1/chat/completions",
              headers={"X-Tier": "free", "x-team": "a"})
    assert r.matches(make_exchange(**ok))
    for field, bad in [("consumer", "bob"), ("group", "h"), ("model", "o3"), ("path", "/v1/embeddings"),
                       ("headers", {"x-tier": "paid", "x-team": "a"}), ("headers", {"x-tier": "free"})]:
        assert not r.matches(make_exchange(**{**ok, field: bad})), field


def test_requests_limit_per_consumer_and_rejection_shape(policy_ctx, make_exchange):
    rl = make(policy_ctx, Rule(requests=3, window="minute", per=["consumer"]))
    for _ in range(3):
        ex = make_exchange(consumer="alice")
        assert rl.request(ex) is None
    ex = make_exchange(consumer="alice", model="gpt-4o")
    with pytest.raises(GatewayError) as e:
        rl.request(ex)
    err = e.value
    body = orjson.loads(err.body())["error"]
    assert err.status == 429 and body["code"] == "rate_limit_exceeded" and body["type"] == "requests"
    assert body["message"].startswith("Rate limit reached for gpt-4o on requests per min (RPM): Limit 3, Used 3, "
                                      "Requested 1. Please try again in ")
    h = dict(err.headers)
    assert 1 <= int(h.pop("retry-after")) <= 20
    # the refusing bucket's limits, as OpenAI sends them on a 429 (reset: until it is full again, 3 per minute)
    reset = h.pop("x-ratelimit-reset-requests")
    assert h == {"x-ratelimit-limit-requests": "3", "x-ratelimit-remaining-requests": "0"}
    assert reset == "1m0s" or (reset.startswith("59.") and reset.endswith("s"))
    assert err.reason == "rate_limit"
    assert rl.request(make_exchange(consumer="bob")) is None        # bob has his own bucket


def test_token_reservation_settles_with_real_usage(policy_ctx, make_exchange):
    rl = make(policy_ctx, Rule(tokens=1000, window="day"))
    ex = make_exchange(prompt=100, max_tokens=200, n=2)          # reserves 100 + 200 * 2
    rl.request(ex)
    h = headers(ex)
    assert h["x-ratelimit-limit-tokens"] == "1000" and h["x-ratelimit-remaining-tokens"] == "500"
    assert "x-ratelimit-limit-requests" not in h
    ex.status, ex.prompt_tokens, ex.completion_tokens = 200, 90, 10     # used 100: 400 come back
    rl.complete(ex)
    key = rl.rules[0].bucket_keys(ex)[1]
    assert rl.limiter.arena.peek(key, 1000, 1000 / 86400) == pytest.approx(900, abs=0.1)
    ex2 = make_exchange(prompt=100, max_tokens=100)
    rl.request(ex2)
    ex2.status, ex2.prompt_tokens, ex2.completion_tokens = 200, 100, 1500   # more than reserved: debt
    rl.complete(ex2)
    assert rl.limiter.arena.peek(key, 1000, 1000 / 86400) == pytest.approx(-700, abs=0.1)
    with pytest.raises(GatewayError) as e:
        rl.request(make_exchange(prompt=1, max_tokens=1))
    assert orjson.loads(e.value.body())["error"]["type"] == "tokens"


def test_failed_request_gives_tokens_back_but_counts(policy_ctx, make_exchange):
    rl = make(policy_ctx, Rule(requests=10, tokens=1000, window="day"))
    ex = make_exchange(prompt=300, max_tokens=0)
    rl.request(ex)
    ex.status = 502                                   # upstream failed, no usage
    rl.complete(ex)
    kr, kt = rl.rules[0].bucket_keys(ex)
    a = rl.limiter.arena
    assert a.peek(kt, 1000, 1000 / 86400) == pytest.approx(1000, abs=0.1)
    assert a.peek(kr, 10, 10 / 86400) == pytest.approx(9, abs=0.01)
    ex = make_exchange(prompt=300, max_tokens=0)      # answered but usage unknown: the estimate stays
    rl.request(ex)
    ex.status = 200
    rl.complete(ex)
    assert a.peek(kt, 1000, 1000 / 86400) == pytest.approx(700, abs=0.1)


def test_all_rules_or_none(policy_ctx, make_exchange):
    rl = make(policy_ctx, Rule(id="wide", requests=100), Rule(id="narrow", requests=1, match=Match(model="o3")))
    t0 = time.monotonic()
    rl.request(make_exchange(model="o3"))
    with pytest.raises(GatewayError):
        rl.request(make_exchange(model="o3"))           # narrow refuses; wide must get its token back
    kw = rl.rules[0].bucket_keys(make_exchange())[0]
    left = rl.limiter.arena.peek(kw, 100, 100 / 60)
    # 99 left, plus what refilled meanwhile (100/min: a busy machine may take some ms between the calls)
    assert 99 - 1e-9 <= left <= 99 + (time.monotonic() - t0) * 100 / 60 + 1e-9
    rl.request(make_exchange(model="gpt-4o"))           # narrow does not match: only wide applies


def test_final_stops_later_rules(policy_ctx, make_exchange):
    rl = make(policy_ctx, Rule(id="vip", requests=1000, match=Match(consumer="vip"), final=True),
              Rule(id="all", requests=1))
    for _ in range(5):
        rl.request(make_exchange(consumer="vip"))
    rl.request(make_exchange(consumer="x"))
    with pytest.raises(GatewayError):
        rl.request(make_exchange(consumer="y"))


def test_per_header_buckets_and_headers_pick_tightest(policy_ctx, make_exchange):
    rl = make(policy_ctx, Rule(id="jobs", requests=2, window="hour", per=["header:x-job"]),
              Rule(id="all", requests=100, window="hour"))
    for job in ("a", "a", "b"):
        ex = make_exchange(headers={"x-job": job})
        rl.request(ex)
    h = headers(ex)
    assert h["x-ratelimit-limit-requests"] == "2" and h["x-ratelimit-remaining-requests"] == "1"
    assert h["x-ratelimit-reset-requests"] in ("30m0s", "29m59.999s", "29m59.998s")
    with pytest.raises(GatewayError):
        rl.request(make_exchange(headers={"x-job": "a"}))


def test_too_large_request(policy_ctx, make_exchange):
    rl = make(policy_ctx, Rule(tokens=500))
    with pytest.raises(GatewayError) as e:
        rl.request(make_exchange(prompt=400, max_tokens=200))
    err = e.value
    assert err.status == 429 and err.code == "rate_limit_exceeded" and err.type == "tokens"
    assert err.message == ("Request too large for gpt-4o-mini on tokens per min (TPM): Limit 500, Requested 600. "
                           "Please reduce your prompt or max_tokens.")
    # It can never fit: no Retry-After (a promise that waiting helps), x-should-retry: false (the OpenAI SDKs do
    # not retry), and the limit it must fit under.
    assert dict(err.headers) == {"x-ratelimit-limit-tokens": "500", "x-ratelimit-remaining-tokens": "500",
                                 "x-ratelimit-reset-tokens": "0s", "x-should-retry": "false"}


def test_token_refusal_carries_the_token_limits(policy_ctx, make_exchange):
    rl = make(policy_ctx, Rule(requests=100, tokens=1000, window="hour"))
    rl.request(make_exchange(prompt=600, max_tokens=100))                     # 300 left
    with pytest.raises(GatewayError) as e:
        rl.request(make_exchange(prompt=400, max_tokens=100))
    h = dict(e.value.headers)
    assert e.value.message.startswith("Rate limit reached for gpt-4o-mini on tokens per h (TPH): Limit 1000, "
                                      "Used 700, Requested 500.")
    assert h["x-ratelimit-limit-tokens"] == "1000" and h["x-ratelimit-remaining-tokens"] == "300"
    assert h["x-ratelimit-reset-tokens"].startswith("42m") and 1 <= int(h["retry-after"]) <= 720
    assert not any("requests" in name for name in h)                          # the tokens bucket refused


def test_default_completion_estimate_and_embeddings(policy_ctx, make_exchange):
    rl = make(policy_ctx, Rule(tokens=10_000, per=["path"]), default_completion_tokens=50)
    ex = make_exchange(prompt=10)                                   # no max_tokens: the default completion
    rl.request(ex)
    assert headers(ex)["x-ratelimit-remaining-tokens"] == "9940"
    ex = make_exchange(prompt=10, path="/v1/embeddings")            # embeddings have no completion
    rl.request(ex)
    assert headers(ex)["x-ratelimit-remaining-tokens"] == "9990"


def test_workers_share_buckets(policy_ctx, make_exchange):
    # Two policy instances over the same run_dir behave as two workers: one bucket.
    a = make(policy_ctx, Rule(requests=2))
    b = make(policy_ctx, Rule(requests=2))
    a.request(make_exchange())
    b.request(make_exchange())
    with pytest.raises(GatewayError):
        a.request(make_exchange())


def test_per_client_address_buckets(policy_ctx, make_exchange):
    """per = ["client"]: each client address (from the PROXY header behind an NLB) has its own bucket."""
    rl = make(policy_ctx, Rule(id="ip", requests=2, window="day", per=["client"]))

    def from_addr(addr):
        ex = make_exchange()
        ex.client_addr = addr
        return ex

    for _ in range(2):
        assert rl.request(from_addr("203.0.113.7")) is None
    with pytest.raises(GatewayError) as e:
        rl.request(from_addr("203.0.113.7"))
    assert e.value.status == 429
    assert rl.request(from_addr("2001:db8::7")) is None            # another client: a bucket of its own
    assert rl.rules[0].bucket_keys(from_addr("a")) != rl.rules[0].bucket_keys(from_addr("b"))


def test_unknown_per_key_names_client_among_the_choices(policy_ctx):
    from fastgw.policies import FieldError

    with pytest.raises(FieldError) as e:
        make(policy_ctx, Rule(requests=1, per=["ip"]))
    assert "client" in str(e.value) and "rules[0].per[0]" in str(e.value)


def test_plans_are_cached_per_key_and_bounded(policy_ctx, make_exchange, monkeypatch):
    from fastgw.policies.ratelimit import policy as ratelimit
    rl = make(policy_ctx, Rule(id="m", requests=1000, match=Match(model="gpt-*"), per=["consumer", "model"]))
    rl.request(make_exchange(consumer="a", model="gpt-4o"))
    rl.request(make_exchange(consumer="a", model="gpt-4o"))
    assert list(rl._plans) == [("gpt-4o", "a")]         # only what the rules look at (not group, not path)
    plan = rl._plans[("gpt-4o", "a")]
    assert rl.request(make_exchange(consumer="a", model="o3")) is None and rl._plans[("o3", "a")] is None
    monkeypatch.setattr(ratelimit, "_PLAN_CACHE", 16)
    for i in range(100):                               # client-chosen model names cannot grow the cache
        rl.request(make_exchange(consumer="a", model=f"gpt-{i}"))
        assert len(rl._plans) <= 16
    ex = make_exchange(consumer="a", model="gpt-4o")
    rl.request(ex)
    assert ex.scratch[rl][0] is not plan and ex.scratch[rl][0].kinds == plan.kinds   # rebuilt, same buckets
    assert rl.limiter.arena.peek(rl.rules[0].bucket_keys(ex)[0], 1000, 1000 / 60) < 998  # one bucket all along


def test_no_headers_when_disabled(policy_ctx, make_exchange):
    rl = make(policy_ctx, Rule(requests=10, tokens=1000), headers=False)
    ex = make_exchange()
    rl.request(ex)
    assert ex.response_headers == [] and ex.scratch[rl][1] > 0     # admitted and reserved, no header lines


@pytest.mark.parametrize("rules", [
    [Rule(id="c", per=["consumer"], requests=40, tokens=20000, window="day")],
    [Rule(id="cm", match=Match(model="gpt-4o*"), per=["consumer", "model"], requests=25, tokens=9000, window="day"),
     Rule(id="e", match=Match(path="/v1/embeddings"), tokens=5000, window="day", final=True),
     Rule(id="all", requests=60, window="day")],
    [Rule(id="h", per=["header:x-team", "group"], requests=30, tokens=12000, window="day")],
], ids=["per-consumer", "consumer-model-path", "per-header"])
def test_compiled_local_path_matches_the_python_reference(policy_ctx, make_exchange, tmp_path, rules):
    # With the local backend every request runs ratelimit_admission.pyx; RateLimit.request and .complete
    # (what the Redis backends run) are its plain-Python reference. Two limiters on two arenas, the same
    # random traffic: the same decisions, refusals, header lines and settled buckets.
    import random

    from fastgw.policies.api import PolicyContext
    (tmp_path / "run2").mkdir()
    ctx2 = PolicyContext(policy_ctx.log, policy_ctx.stats, str(tmp_path / "run2"), "0", policy_ctx.config)
    fast, ref = make(policy_ctx, *rules), make(ctx2, *rules)
    assert fast.request.__self__.__class__.__name__ == "LocalAdmission" and ref.limiter.arena is not fast.limiter.arena
    rng = random.Random(4)

    def outcome(call, ex):
        try:
            call(ex)
        except GatewayError as err:
            e = orjson.loads(err.body())["error"]
            return err.status, e["code"], e["type"], e["message"].partition("Please try again")[0]
        lines = b"".join(ex.response_headers).decode().split("\r\n")
        return [line for line in lines if "-reset-" not in line], ex.scratch[fast if call == fast.request else ref][1]

    refused = 0
    for _ in range(600):
        kw = dict(consumer=rng.choice(["alice", "bob", "carol"]), group=rng.choice(["g1", "g2"]),
                  model=rng.choice(["gpt-4o", "gpt-4o-mini", "o3", ""]),
                  path=rng.choice(["/v1/chat/completions", "/v1/embeddings", "/v1/moderations"]),
                  prompt=rng.randrange(0, 1500),
                  max_tokens=rng.choice([-1, 0, 16, 400, 400, 2**62]), n=rng.choice([-1, 1, 2, 3, 3, 2**40]),
                  headers={"x-team": rng.choice(["red", "blue"])} if rng.random() < 0.8 else {})
        no_fields = rng.random() < 0.1
        exs = [make_exchange(**kw), make_exchange(**kw)]
        # A moderations answer has no usage: both paths count its input tokens when it succeeds.
        body = orjson.dumps({"model": "omni-moderation-latest", "input": "word " * rng.randrange(0, 3000)})
        for ex in exs:
            if no_fields:
                ex.fields = None
            if kw["path"] != "/v1/chat/completions":
                ex.body = body
        a, b = outcome(fast.request, exs[0]), outcome(RateLimit.request.__get__(ref), exs[1])
        assert a == b, kw
        refused += isinstance(a[0], int)
        status, usage = rng.choice([200, 200, 429, 502]), rng.choice([(-1, -1), (50, 7), (900, 0), (10, 3000)])
        for ex in exs:
            ex.status, (ex.prompt_tokens, ex.completion_tokens) = status, usage
        fast.complete(exs[0])
        RateLimit.complete(ref, exs[1])
        assert not exs[0].scratch and not exs[1].scratch
    assert 50 < refused < 550      # both sides of the limits were exercised


def test_a_subclass_overriding_a_hook_keeps_its_own_code(policy_ctx, make_exchange):
    # The compiled local path replaces RateLimit's own methods only: an override in a subclass runs as written.
    seen = []

    class Counted(RateLimit):
        def request(self, ex):
            seen.append(ex.consumer)
            return super().request(ex)

    rl = Counted(Config(rules=[Rule(requests=5)], id="t"), policy_ctx)
    ex = make_exchange(consumer="alice")
    assert rl.request(ex) is None and seen == ["alice"] and ex.scratch[rl][1] == 0
    rl.complete(ex)                           # RateLimit.complete (Python): settles nothing for requests only
    assert not ex.scratch


def test_arena_counter_keeps_only_a_debt_into_the_next_period(tmp_path):
    from fastgw.policies.ratelimit.bucket import BucketArena

    a = BucketArena(str(tmp_path / "arena.shm"), 64)
    a.charge(1, 7, 0.0, 250.0, False)                   # 250 used beyond zero in period 7: a debt
    a.charge(2, 7, 0.0, -40.0, False)                   # 40 unused
    assert a.used(1, 8) == 0.0 and a.used(1, 8, True) == 250.0 and a.used(2, 8, True) == 0.0
    assert a.charge(1, 8, 0.0, 10.0, False, True) == (True, 260.0)
    assert a.charge(2, 9, 0.0, 5.0, False, True) == (True, 5.0)
    assert a.charge(1, 9, 0.0, 1.0, False) == (True, 1.0)   # budgets (no keep_debt): every period from zero
