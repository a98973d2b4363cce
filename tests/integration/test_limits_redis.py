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
from fastgw.policies.budget.policy import Budget, BudgetRule, Config as BudgetConfig, Price, period_id
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
    # Counted by the gateway's accounting (reason = the code), not by the policy: see test_client_relay.py.


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


# -- Redis answering errors (not unreachable): the same fail-open / fail-closed as an outage, never a 500 ---------

WRONG_PASSWORD = "wrong-pw-0123"


async def burst(policy, make_ex, n=8):
    """n concurrent requests through `policy`, each completed: "admitted" or (status, code) per request."""
    async def one():
        ex = make_ex()
        try:
            r = policy.request(ex)
            if r is not None:
                await asyncio.wait_for(r, 5)
            out = "admitted"
        except GatewayError as e:
            out = (e.status, e.code)
        ex.status, ex.prompt_tokens, ex.completion_tokens = 200, 10, 500    # settling must not raise either
        c = policy.complete(ex)
        if c is not None:
            await asyncio.wait_for(c, 5)
        return out
    results = await asyncio.gather(*(one() for _ in range(n)))
    policy.close()
    return results


def only_one_warning(policy):
    log = policy.ctx.log.stream.getvalue()
    assert log.count('"event":"redis_unavailable"') == 1, log      # once per burst, not per request
    assert WRONG_PASSWORD not in log
    return log


@pytest.mark.parametrize("backend", ["redis", "hybrid"])
@pytest.mark.parametrize("fail_open", [True, False])
def test_rate_limit_with_a_wrong_redis_password_follows_fail_open(redis_server_with_password, tmp_path,
                                                                 make_exchange, backend, fail_open):
    url = f"redis://:{WRONG_PASSWORD}@127.0.0.1:{redis_server_with_password.port}/0"
    rl = limiter(str(tmp_path), "x", url, backend=backend, fail_open=fail_open,
                 rules=[Rule(id="r", requests=L, tokens=10_000, window="day", per=["consumer"])])
    results = asyncio.run(burst(rl, lambda: make_exchange(consumer="alice")))
    assert results == (["admitted"] * 8 if fail_open else [(503, "rate_limiter_unavailable")] * 8)
    assert "WRONGPASS" in only_one_warning(rl)
    errors = rl.ctx.stats._upstream_errors
    assert sum(v for (up, _), v in errors.items() if up == "redis") == 8 and errors[("redis", "wrongpass")] >= 1


@pytest.mark.parametrize("fail_open", [True, False])
def test_budget_with_a_wrong_redis_password_follows_fail_open(redis_server_with_password, tmp_path, make_exchange,
                                                             fail_open):
    url = f"redis://:{WRONG_PASSWORD}@127.0.0.1:{redis_server_with_password.port}/0"
    cfg = BudgetConfig(budgets=[BudgetRule(usd=1.0, consumer="*")], id="bud", backend="redis", fail_open=fail_open,
                       prices={"m": Price(1.0, 1.0)}, redis=RedisConfig(url=url, key_prefix="fastgw:budget:"))
    b = Budget(cfg, ctx_for(str(tmp_path), "x"))
    results = asyncio.run(burst(b, lambda: make_exchange(model="m", consumer="alice", prompt=10, max_tokens=10)))
    assert results == (["admitted"] * 8 if fail_open else [(503, "budget_unavailable")] * 8)
    assert "WRONGPASS" in only_one_warning(b)


def test_wrongtype_replies_follow_fail_open_too(redis_server, tmp_path, make_exchange):
    # Something else wrote other types under our keys: every script call answers WRONGTYPE.
    import socket

    rl = limiter(str(tmp_path), "x", redis_server.url, fail_open=False)
    b = Budget(BudgetConfig(budgets=[BudgetRule(usd=1.0, consumer="*", period="day")], id="bud", backend="redis",
                            prices={"m": Price(1.0, 1.0)}, redis=RedisConfig(url=redis_server.url,
                                                                             key_prefix="fastgw:budget:")),
               ctx_for(str(tmp_path), "y"))
    ex = make_exchange(model="m", consumer="alice")
    keys = [rl.remote._key(rl.rules[0].bucket_keys(ex)[0], rl._tag(ex)),
            "fastgw:budget:" + b._rkey(0, b.rules[0], "alice", period_id("day"))]
    with socket.create_connection(("127.0.0.1", redis_server.port)) as s:
        s.sendall(b"".join(b"LPUSH %s x\r\n" % k.encode() for k in keys))
        replies = b""
        while replies.count(b"\r\n") < 2:
            replies += s.recv(64)
        assert replies == b":1\r\n:1\r\n"
    assert asyncio.run(burst(rl, lambda: make_exchange(consumer="alice"))) == [(503, "rate_limiter_unavailable")] * 8
    assert "WRONGTYPE" in only_one_warning(rl)
    assert asyncio.run(burst(b, lambda: make_exchange(model="m", consumer="alice"))) == ["admitted"] * 8
    assert "WRONGTYPE" in only_one_warning(b)


def test_a_failed_auth_closes_its_connection(redis_server_with_password):
    import socket

    from fastgw.policies.redis_client import RedisClient, RedisError
    from tests.conftest import REDIS_PASSWORD

    def connections() -> int:
        with socket.create_connection(("127.0.0.1", redis_server_with_password.port)) as s:
            s.sendall(f"AUTH {REDIS_PASSWORD}\r\nCLIENT LIST\r\n".encode())
            reply = b""
            while not (reply.startswith(b"+OK\r\n$") and reply.endswith(b"\r\n") and reply.count(b"\r\n") >= 3):
                reply += s.recv(65536)
            return reply.count(b"id=") - 1       # one line per client, not counting this one

    async def main():
        c = RedisClient(f"redis://:{WRONG_PASSWORD}@127.0.0.1:{redis_server_with_password.port}/0",
                        connect_timeout=2, retry_interval=0)
        for _ in range(5):
            with pytest.raises(RedisError) as e:
                await c.call("PING")
            assert e.value.kind == "wrongpass"
        await asyncio.sleep(0.05)      # let the loop process the closes
        assert connections() == 0      # one leaked connection per retry, before
        c.close()
    asyncio.run(main())


# -- hybrid: a concurrent burst shares leases; token debt survives the lease epoch --------------------------------

@pytest.mark.parametrize("names,tasks", [(("a", "b"), 50), (("a", "a", "b", "b"), 25)],
                         ids=["2 instances x 1 worker", "2 instances x 2 workers"])
def test_hybrid_one_shot_burst_admits_near_capacity(redis_server, tmp_path, make_exchange, names, tasks):
    # Every client tries once, all at the same time: 100 attempts against L = 50 from a full bucket. Each
    # request used to lease a chunk of its own and refuse when Redis ran dry, even with the pool full of what
    # its neighbours had just leased (10 of 50 admitted). The bound (fastgw/policies/ratelimit/redis.py): at most
    # L, at least L minus what 2 instances' pools may strand (chunk + one request each).
    counts = run_instances(str(tmp_path), redis_server.url, "hybrid", make_exchange, names=names, tasks=tasks, tries=1)
    chunk = 5
    assert L - 2 * (chunk + 1) <= sum(counts) <= L, counts


def test_hybrid_token_debt_is_carried_into_the_next_lease_epoch(redis_server, tmp_path, make_exchange):
    async def main():
        rl = limiter(str(tmp_path), "x", redis_server.url, backend="hybrid", lease_ttl=0.2,
                     rules=[Rule(id="t", tokens=1000, window="day")])
        hy = rl.limiter
        ex = make_exchange(prompt=50, max_tokens=50)            # reserves 100: leases a chunk of 100 from Redis
        await rl.request(ex)
        key = rl.rules[0].bucket_keys(ex)[1]
        assert hy.remote_left[key] == pytest.approx(900, abs=1) and hy.balance(key) == pytest.approx(0)
        ex.status, ex.prompt_tokens, ex.completion_tokens = 200, 100, 300     # used 400: 300 of debt
        assert rl.complete(ex) is None and hy.balance(key) == pytest.approx(-300)
        epoch = hy._epoch()
        while hy._epoch() == epoch:                             # the lease epoch ends: unused quota would go,
            await asyncio.sleep(0.02)
        assert hy.balance(key) == pytest.approx(-300)           # the debt stays
        ex2 = make_exchange(prompt=50, max_tokens=50)
        r = rl.request(ex2)
        if r is not None:
            await r
        # The next lease paid the debt to Redis: 100 + 400 taken for the 500 really used or reserved.
        assert hy.remote_left[key] == pytest.approx(500, abs=1)
        assert b"x-ratelimit-remaining-tokens: 500\r\n" in b"".join(ex2.response_headers)
        rl.close()
    asyncio.run(main())


def test_hybrid_waiters_survive_a_cancelled_leaser(redis_server, tmp_path):
    # The request that leases for the others may be cancelled (its client went away): those awaiting its lease
    # must not hang nor inherit the cancellation; they lease for themselves.
    import socket

    async def main():
        cfg = Config(rules=[Rule(id="r", requests=L, window="day")], id="it", backend="hybrid",
                     redis=RedisConfig(url=redis_server.url, timeout=5.0, connect_timeout=5.0))
        rl = RateLimit(cfg, ctx_for(str(tmp_path), "x"))
        hy = rl.limiter
        await rl.client.call("PING")            # connected: the leaser will be cancelled in the lease itself
        with socket.create_connection(("127.0.0.1", redis_server.port)) as s:
            s.sendall(b"CLIENT PAUSE 300 ALL\r\n")     # Redis holds every command meanwhile: the lease waits
            assert s.recv(16) == b"+OK\r\n"
        items = [(12345, float(L), L / 86400, 1.0)]
        leaser = asyncio.create_task(hy.take_all(items, "t"))
        await asyncio.sleep(0)
        assert 12345 in hy._leasing
        waiters = [asyncio.create_task(hy.take_all(items, "t")) for _ in range(3)]
        await asyncio.sleep(0)
        leaser.cancel()
        results = await asyncio.wait_for(asyncio.gather(*waiters), 5)
        assert [fail for fail, _ in results] == [-1, -1, -1] and leaser.cancelled() and not hy._leasing
        rl.close()
    asyncio.run(main())


def test_a_cancelled_first_caller_does_not_wedge_the_redis_connect(redis_server_with_password):
    # The first caller opens the connection for everyone; if it is cancelled meanwhile, the others must still
    # get their answers (they used to await a connect nobody would ever finish).
    import socket

    from fastgw.policies.redis_client import RedisClient
    from tests.conftest import REDIS_PASSWORD

    async def main():
        port = redis_server_with_password.port
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(f"AUTH {REDIS_PASSWORD}\r\nCLIENT PAUSE 300 ALL\r\n".encode())   # AUTH will wait
            reply = b""
            while reply.count(b"\r\n") < 2:
                reply += s.recv(64)
            assert reply == b"+OK\r\n+OK\r\n"
        c = RedisClient(f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/0", connect_timeout=5, timeout=5)
        first = asyncio.create_task(c.call("PING"))
        await asyncio.sleep(0.05)
        others = [asyncio.create_task(c.call("PING")) for _ in range(2)]
        await asyncio.sleep(0)
        first.cancel()
        assert await asyncio.wait_for(asyncio.gather(*others), 5) == [b"PONG", b"PONG"]
        c.close()
    asyncio.run(main())


def test_redis_budget_reserves_and_settles_media_prices(redis_server, tmp_path, make_exchange):
    # Images reserve n x the price per image and settle on the images the answer holds; a transcription
    # answered as text is charged its estimate from the upload's size: both in Redis, seen by another instance.
    import orjson

    def budget(name):
        cfg = BudgetConfig(budgets=[BudgetRule(usd=0.1, consumer="*", period="day")], id="media", backend="redis",
                           redis=RedisConfig(url=redis_server.url, key_prefix="fastgw:budget:"))
        return Budget(cfg, ctx_for(str(tmp_path), name))

    def image_request(n):
        ex = make_exchange(path="/v1/images/generations", model="dall-e-2", consumer="alice")
        ex.body = orjson.dumps({"model": "dall-e-2", "prompt": "a cat", "n": n, "size": "1024x1024"})
        return ex

    async def settle(b, ex, status, answer=None):
        ex.status, ex.response_body = status, orjson.dumps(answer) if answer is not None else None
        r = b.complete(ex)
        if r is not None:
            await r

    async def main():
        a, b = budget("a"), budget("b")
        ex = image_request(4)
        await a.request(ex)                                              # $0.08 reserved
        with pytest.raises(GatewayError) as e:
            await b.request(image_request(2))                            # $0.04 more would pass $0.10
        assert e.value.code == "insufficient_quota"
        await settle(a, ex, 200, {"created": 1, "data": [{"url": "u"}] * 3})    # three came: $0.06
        assert ex.cost == pytest.approx(0.06)
        ex2 = image_request(2)
        await b.request(ex2)                                             # now $0.04 fits: $0.10
        await settle(b, ex2, 500)                                        # failed: given back
        ex3 = make_exchange(path="/v1/audio/transcriptions", model="whisper-1", consumer="alice")
        ex3.form, ex3.bytes_in = {"model": "whisper-1", "response_format": "text"}, 16_000 * 300
        await b.request(ex3)                                             # 5 min at 128 kbit/s: $0.03
        await settle(b, ex3, 200)
        assert ex3.cost == pytest.approx(0.03)
        c = budget("c")                                                  # another instance, later
        with pytest.raises(GatewayError) as e:
            await c.request(image_request(1))                            # $0.09 spent: $0.02 does not fit
        for x in (a, b, c):
            x.close()
        return e.value.message

    message = asyncio.run(main())
    assert "($0.0900 used, this request is estimated at $0.0200)" in message
