"""Limits and budgets against a real redis-server: exact across instances, hybrid within its bound, outages."""
import asyncio
import io
import multiprocessing as mp
import os

import pytest

from fastgw.runtime.config import Config as GatewayConfig
from fastgw.errors import GatewayError
from fastgw.observability.logs import Logger
from fastgw.observability.metrics import Stats
from fastgw.policies.budget.policy import Budget, BudgetRule, Config as BudgetConfig, Price
from fastgw.policies.ratelimit.policy import Config, RateLimit, RedisConfig, Rule
from fastgw.policies.api import PolicyContext

L = 50


def ctx_for(tmp, name):
    run = os.path.join(tmp, name)
    os.makedirs(run, exist_ok=True)
    return PolicyContext(Logger(io.StringIO(), worker=name), Stats(os.path.join(tmp, "m-" + name), name), run,
                         name, GatewayConfig())


def limiter(tmp, name, url, backend="redis", fail_open=True, rules=None, **kw):
    cfg = Config(rules=rules or [Rule(id="r", requests=L, window="day", per=["consumer"])], id="it",
                 backend=backend, fail_open=fail_open, redis=RedisConfig(url=url, timeout=0.2, connect_timeout=0.2),
                 **kw)
    return RateLimit(cfg, ctx_for(tmp, name))


async def attempt(rl, ex):
    try:
        r = rl.request(ex)
        if r is not None:
            await asyncio.wait_for(r, 5)      # a liveness guard, not a speed check: nothing may hang
        return 1
    except GatewayError as e:
        assert e.status == 429, e.message
        return 0


def instance(tmp, name, url, backend, tasks, tries, q, make_ex, barrier):
    """One gateway instance: `tasks` concurrent clients on one event loop, each trying `tries` times."""
    async def main():
        rl = limiter(tmp, name, url, backend)

        async def client():
            n = 0
            for _ in range(tries):
                n += await attempt(rl, make_ex(consumer="alice"))
            return n
        counts = await asyncio.gather(*(client() for _ in range(tasks)))
        rl.close()
        return sum(counts)
    barrier.wait(30)     # start together, so the instances really race
    q.put(asyncio.run(main()))


def run_instances(tmp, url, backend, make_ex, names=("a", "b"), tasks=20, tries=4):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    barrier = ctx.Barrier(len(names))
    procs = [ctx.Process(target=instance, args=(tmp, n, url, backend, tasks, tries, q, make_ex, barrier))
             for n in names]
    for p in procs:
        p.start()
    counts = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    return counts


def test_redis_two_instances_admit_exactly_L(redis_server, tmp_path, make_exchange):
    # 2 processes x 20 concurrent clients x 4 tries = 160 attempts against L = 50.
    counts = run_instances(str(tmp_path), redis_server.url, "redis", make_exchange)
    assert sum(counts) == L


def test_hybrid_two_instances_within_bound(redis_server, tmp_path, make_exchange):
    # Two instances, each with two "workers" sharing its arena (same run_dir name => same shared memory).
    counts = run_instances(str(tmp_path), redis_server.url, "hybrid", make_exchange, names=("a", "a", "b", "b"),
                           tasks=10, tries=5)
    chunk = 5   # lease = 0.1 x L
    # Every admitted request was leased from the Redis bucket first: never more than L in a burst; at most the
    # pools of the 2 instances can be left holding quota (an expired lease epoch drops it).
    assert L - 2 * chunk <= sum(counts) <= L


def test_redis_tokens_reserved_and_settled(redis_server, tmp_path, make_exchange):
    async def main():
        a = limiter(str(tmp_path), "a", redis_server.url, rules=[Rule(id="t", tokens=1000, window="day")])
        b = limiter(str(tmp_path), "b", redis_server.url, rules=[Rule(id="t", tokens=1000, window="day")])
        ex = make_exchange(prompt=200, max_tokens=300)
        await a.request(ex)
        assert b"x-ratelimit-remaining-tokens: 500\r\n" in b"".join(ex.response_headers)
        ex.status, ex.prompt_tokens, ex.completion_tokens = 200, 200, 50
        await a.complete(ex)                                   # 250 of 500 come back
        ex2 = make_exchange(prompt=700, max_tokens=50)         # 750 fits only because of the settle
        await b.request(ex2)
        ex2.status, ex2.prompt_tokens, ex2.completion_tokens = 200, 700, 300   # 250 more than reserved: debt
        await b.complete(ex2)
        with pytest.raises(GatewayError) as e:
            await a.request(make_exchange(prompt=1, max_tokens=0))
        assert e.value.type == "tokens"
        a.close(), b.close()
    asyncio.run(main())


async def outage(tmp, url, server, fail_open, make_exchange):
    rl = limiter(tmp, "x", url, fail_open=fail_open)
    assert await attempt(rl, make_exchange(consumer="alice")) == 1
    server.kill()
    results = []
    for _ in range(3):
        ex = make_exchange(consumer="alice")
        try:
            await asyncio.wait_for(rl.request(ex), 5)
            results.append("admitted")
        except GatewayError as e:
            results.append((e.status, e.code, e.headers))
        ex.status = 200
        c = rl.complete(ex)
        if c is not None:
            await asyncio.wait_for(c, 5)
    rl.close()
    return rl, results


def test_redis_killed_fail_open_admits(redis_server, tmp_path, make_exchange):
    rl, results = asyncio.run(outage(str(tmp_path), redis_server.url, redis_server, True, make_exchange))
    assert results == ["admitted"] * 3
    errors = rl.ctx.stats._upstream_errors
    assert sum(v for (up, _), v in errors.items() if up == "redis") == 3
    assert '"event":"redis_unavailable"' in rl.ctx.log.stream.getvalue()


def test_redis_killed_fail_closed_refuses_503(redis_server, tmp_path, make_exchange):
    rl, results = asyncio.run(outage(str(tmp_path), redis_server.url, redis_server, False, make_exchange))
    assert results == [(503, "rate_limiter_unavailable", (("retry-after", "1"),))] * 3
    assert rl.ctx.stats._rejections[("alice", "gpt-4o-mini", "rate_limiter_unavailable")] == 3


def test_unreachable_redis_never_hangs(tmp_path, make_exchange):
    import socket
    with socket.socket() as s:       # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main():
        rl = limiter(str(tmp_path), "x", f"redis://127.0.0.1:{port}/0", fail_open=False)
        for _ in range(5):
            with pytest.raises(GatewayError) as e:
                await asyncio.wait_for(rl.request(make_exchange()), 5)
            assert e.value.status == 503
    asyncio.run(main())


def test_redis_budget_shared_and_survives_restart(redis_server, tmp_path, make_exchange):
    def budget(name):
        cfg = BudgetConfig(budgets=[BudgetRule(usd=0.01, consumer="*", period="month")], id="bud", backend="redis",
                           prices={"m": Price(1.0, 1.0)},
                           redis=RedisConfig(url=redis_server.url, key_prefix="fastgw:budget:"))
        return Budget(cfg, ctx_for(str(tmp_path), name))

    async def spend(b, n):
        admitted = 0
        for _ in range(n):
            ex = make_exchange(model="m", consumer="alice", prompt=500, max_tokens=500)
            try:
                await b.request(ex)
            except GatewayError as e:
                assert e.status == 429 and e.code == "insufficient_quota"
                continue
            admitted += 1
            ex.status, ex.prompt_tokens, ex.completion_tokens = 200, 500, 500
            settle = b.complete(ex)       # None: the estimate was exact, nothing to settle
            if settle is not None:
                await settle
        b.close()
        return admitted

    async def main():
        first = await asyncio.gather(spend(budget("a"), 4), spend(budget("b"), 4))
        # A "restart": new policy objects, new connections; the spend is still in Redis.
        later = await spend(budget("c"), 10)
        return sum(first), later
    first, later = asyncio.run(main())
    assert first == 8 and later == 2
