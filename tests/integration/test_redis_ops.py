"""Redis as operators run it (issue 14 item 6): rate limits and budgets on a Redis Cluster through a resharding and
a master failure, on a Sentinel-managed master through a failover, over TLS (with a client certificate), as an
ACL user. Real redis-server processes (tests/integration/redis_topologies.py); no timed assertions."""
import asyncio
import os
import subprocess

import pytest

from fastgw.errors import GatewayError
from fastgw.policies.budget.policy import Budget, BudgetRule, Config as BudgetConfig, Price
from fastgw.policies.ratelimit.policy import Config, RateLimit, RedisConfig, Rule
from fastgw.policies.redis_client import RedisClient, RedisError, key_slot
from tests.conftest import free_port, require_module, require_tool
from tests.integration.redis_topologies import Cluster, Sentinels, cli, wait_for
from tests.integration.test_limits_redis import ctx_for

L = 1000           # requests per consumer per day: 1000/86400 refill per second, under one token for 86 s
BUDGET_USD = 0.02  # per consumer per day: twenty $0.001 requests


def limiter(tmp, name, url, fail_open=False, retry_interval=0.05):
    # Two buckets per request (requests and tokens, both per consumer): one Lua script over two keys, which only a
    # shared hash tag keeps in one cluster slot.
    cfg = Config(rules=[Rule(id="r", requests=L, window="day", per=["consumer"]),
                        Rule(id="t", tokens=10**9, window="day", per=["consumer"])],
                 id="ops", backend="redis", fail_open=fail_open,
                 redis=RedisConfig(url=url, timeout=2.0, connect_timeout=1.0, retry_interval=retry_interval))
    return RateLimit(cfg, ctx_for(tmp, name))


def budget(tmp, name, url):
    cfg = BudgetConfig(budgets=[BudgetRule(usd=BUDGET_USD, consumer="*", period="day")], id="ops-bud",
                       backend="redis", prices={"m": Price(1.0, 1.0)}, fail_open=False,
                       redis=RedisConfig(url=url, key_prefix="fastgw:budget:", timeout=2.0, connect_timeout=1.0,
                                         retry_interval=0.05))
    return Budget(cfg, ctx_for(tmp, name))


async def attempt(policy, ex):
    """"ok", or the refusal's status (429: over the limit; 503: Redis unavailable and fail-closed)."""
    try:
        r = policy.request(ex)
        if r is not None:
            await asyncio.wait_for(r, 10)      # a liveness guard, not a speed check: nothing may hang
    except GatewayError as e:
        assert e.status in (429, 503), e.message
        return e.status
    ex.status, ex.prompt_tokens, ex.completion_tokens = 200, 500, 500
    done = policy.complete(ex)
    if done is not None:
        await asyncio.wait_for(done, 10)
    return "ok"


async def until_refused(policy, make_ex, seen: dict):
    """Admissions until the first 429, riding out 503s (a failover under way); counts each outcome in `seen`."""
    admitted = 0
    for _ in range(100_000):                   # a guard: a failover that never ends fails the test
        got = await attempt(policy, make_ex())
        seen[got] = seen.get(got, 0) + 1
        if got == "ok":
            admitted += 1
        elif got == 429:
            return admitted
        else:
            await asyncio.sleep(0.01)          # 503: Redis is failing over; try again shortly
    raise AssertionError("never refused")


def exchange_for(make_exchange, consumer):
    return lambda: make_exchange(model="m", consumer=consumer, prompt=500, max_tokens=500)


# -- slots ---------------------------------------------------------------------------------------------------------

def test_key_slot_matches_cluster_keyslot(tmp_path):
    """Our CRC16 and hash-tag rules against CLUSTER KEYSLOT on many keys (a cluster-enabled node answers it with
    no slots assigned)."""
    require_tool("redis-server")
    import random

    cl = Cluster.single_node(str(tmp_path))
    try:
        rng = random.Random(7)
        keys = ["", "{", "}", "{}", "{}x", "x{}", "{{}}", "a{b}c", "a{{b}}c", "a{}{b}", "{a}{b}", "}{a}",
                "foo{bar}{zap}", "123456789", "{user1000}.following", "é{ü}", "日本{語}",
                "fastgw:rl:{0123456789abcdef}fedcba9876543210"]
        alphabet = "ab{}:é\x00\x7f-_"
        keys += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12))) for _ in range(2000)]
        got = cl.keyslots(keys)
        assert got == [key_slot(k) for k in keys]
    finally:
        cl.stop()


# -- cluster ---------------------------------------------------------------------------------------------------------

def test_cluster_limits_and_budgets_through_resharding_and_a_master_failure(tmp_path, make_exchange):
    """3 masters + 3 replicas. Limits and budgets are exact (L admissions per consumer, $0.02 of $0.001 requests)
    and the response cache's entries all hit while `redis-cli --cluster reshard` moves the consumers' slots
    under traffic, and after a master is killed and its replica takes over (fail-closed: 503s while it does;
    writes replicated before the kill are kept)."""
    require_tool("redis-server"), require_tool("redis-cli")
    tmp = str(tmp_path)
    cluster = Cluster(os.path.join(tmp, "cluster"))
    try:
        asyncio.run(_cluster_scenario(tmp, cluster, make_exchange))
    finally:
        cluster.stop()


async def _cluster_scenario(tmp, cluster, make_exchange):
    rl = limiter(tmp, "rl", cluster.url)
    bud = budget(tmp, "bud", cluster.url)
    owners = cluster.slot_owners()
    source = owners[next(r for r in owners if r.startswith("0-"))]      # serves slot 0: resharded from
    target = next(p for p in set(owners.values()) if p != source)
    other = next(p for p in set(owners.values()) if p not in (source, target))
    moved_slots = 300                                                   # redis-cli moves the source's lowest

    def slot_of(name):
        return key_slot("{%s}" % rl._tag(make_exchange(consumer=name)))
    names = [f"consumer-{i}" for i in range(5000)]
    moving = [n for n in names if slot_of(n) < moved_slots][:2]
    staying = [next(n for n in names if cluster.owner_of(slot_of(n)) == p) for p in (target, other)]
    consumers = moving + staying
    assert len(moving) == 2
    admitted = dict.fromkeys(consumers, 0)
    seen = {}

    # The response cache's Redis store (one key per entry): entries everywhere, some in the moving slots.
    from fastgw.cache.redis_store import RedisStore
    from fastgw.runtime.config import CacheRedis
    cache_ctx = ctx_for(tmp, "cache")
    store = RedisStore(CacheRedis(url=cluster.url, timeout=2.0, connect_timeout=1.0, retry_interval=0.05),
                       cache_ctx.log, cache_ctx.stats)
    entries = {i.to_bytes(16, "big"): b"entry %d" % i for i in range(1500)}
    assert sum(key_slot(b"fastgw:cache:" + k.hex().encode()) < moved_slots for k in entries) > 0
    for k, v in entries.items():
        store.put(k, v, 3600)
    await asyncio.gather(*store.tasks)

    async def cached():
        return dict(zip(entries, await asyncio.gather(*(store.get(k) for k in entries))))
    assert await cached() == entries

    # Before: some admissions everywhere; budgets reserve and settle.
    for c in consumers:
        for _ in range(10):
            assert await attempt(rl, make_exchange(consumer=c)) == "ok"
            admitted[c] += 1
        for _ in range(5):
            assert await attempt(bud, exchange_for(make_exchange, c)()) == "ok"

    # Resharding under traffic: the moving consumers' slots go from `source` to `target` while they request.
    ids = {n["port"]: n["id"] for n in cluster.nodes()}
    proc = await asyncio.create_subprocess_exec(
        "redis-cli", "--cluster", "reshard", f"127.0.0.1:{source}", "--cluster-from", ids[source], "--cluster-to",
        ids[target], "--cluster-slots", str(moved_slots), "--cluster-yes", stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)

    async def traffic(c):
        while proc.returncode is None and admitted[c] < L // 2:
            got = await attempt(rl, make_exchange(consumer=c))
            assert got == "ok", got                    # no slot move may fail or refuse a request
            admitted[c] += 1
    async def cache_traffic():
        while proc.returncode is None:
            assert await cached() == entries           # never a miss while slots move
    waiter = asyncio.ensure_future(proc.wait())
    await asyncio.gather(*(traffic(c) for c in consumers), cache_traffic(), waiter)
    assert proc.returncode == 0, (await proc.stderr.read()).decode()
    cluster.wait_ok()
    for c in moving:
        assert cluster.owner_of(slot_of(c)) == target
    for c in consumers:                                # served by the new owner after the move
        assert await attempt(rl, make_exchange(consumer=c)) == "ok"
        admitted[c] += 1
    assert rl.client._impl.redirected["moved"] > 0

    # A master fails: its replica takes over. Writes acknowledged before are replicated first (Redis replicates
    # asynchronously: what a master acknowledged and had not sent on is lost with it, see docs/operations.md).
    cluster.wait_replicated()
    cluster.kill(other)
    for c in consumers:
        admitted[c] += await until_refused(rl, lambda c=c: make_exchange(consumer=c), seen)
        spent = 5 + await until_refused(bud, exchange_for(make_exchange, c), seen)
        assert spent == round(BUDGET_USD / 0.001), (c, spent)
    assert admitted == dict.fromkeys(consumers, L), admitted
    assert await cached() == entries                   # replicated before the kill: all still there
    wait_for("every node to see the replica serve the slot",          # served by it already; gossip may lag
             lambda: cluster.owner_of(slot_of(staying[1])) != other)
    rl.close(), bud.close(), store.close()


# -- sentinel ----------------------------------------------------------------------------------------------------------

def test_sentinel_failover_keeps_limits_exact(tmp_path, make_exchange):
    """A master with a replica and three sentinels. The gateway finds the master through the sentinels (the first
    one is dead), and after SENTINEL FAILOVER finds the new one (the old one is still up, a master in its own
    eyes); every admission is counted once: exactly L per consumer."""
    require_tool("redis-server"), require_tool("redis-cli")
    tmp = str(tmp_path)
    s = Sentinels(os.path.join(tmp, "sentinel"))
    try:
        async def main():
            rl = limiter(tmp, "rl", s.url)
            s.kill(s.sentinels[0])                          # the client must ask the next sentinel
            n = 0
            for _ in range(100):
                assert await attempt(rl, make_exchange(consumer="alice")) == "ok"
                n += 1
            assert rl.client._impl.master.addr == ("127.0.0.1", s.master)
            s.wait_replicated()
            assert cli(s.sentinels[1], "SENTINEL", "FAILOVER", "mymaster").strip() == "OK"
            wait_for("the sentinels to name the replica", lambda: s.master_port() == s.replica)
            # The old master is up and still a master until the sentinels reconfigure it (~8 s later): what a
            # client writes there meanwhile is lost then (Redis Sentinel's own window). The client asks the
            # sentinels once a second while in use; PINGs (which write nothing) let it notice before we write.
            for _ in range(1000):
                await rl.client.call("PING")
                if rl.client._impl.master is None or rl.client._impl.master.addr != ("127.0.0.1", s.master):
                    break
                await asyncio.sleep(0.01)
            seen = {}
            n += await until_refused(rl, lambda: make_exchange(consumer="alice"), seen)
            assert n == L, (n, seen)
            assert rl.client._impl.master.addr == ("127.0.0.1", s.replica)
            rl.close()
        asyncio.run(main())
    finally:
        s.stop()


def test_sentinel_master_killed_fail_open_admits_unaccounted(tmp_path, make_exchange):
    """The master dies and no sentinel promotes anyone yet: fail-open admits without accounting (what it states),
    fail-closed answers 503; both recover when the master is back, with what was counted before kept."""
    require_tool("redis-server"), require_tool("redis-cli")
    tmp = str(tmp_path)
    s = Sentinels(os.path.join(tmp, "sentinel"))
    try:
        async def main():
            open_rl = limiter(tmp, "open", s.url, fail_open=True)
            closed_rl = limiter(tmp, "closed", s.url, fail_open=False)
            for rl in (open_rl, closed_rl):
                assert await attempt(rl, make_exchange(consumer="bob")) == "ok"
            port = s.master
            s.kill(port)
            assert await attempt(open_rl, make_exchange(consumer="bob")) == "ok"     # not counted anywhere
            assert await attempt(closed_rl, make_exchange(consumer="bob")) == 503
            s.restart(port)
            wait_for("the master to answer", lambda: "role:master" in cli(port, "INFO", "replication"))
            for rl in (open_rl, closed_rl):
                for _ in range(200):                # the client retries the master after retry_interval
                    got = await attempt(rl, make_exchange(consumer="carol"))
                    if got == "ok":
                        break
                    await asyncio.sleep(0.01)
                assert got == "ok"
            open_rl.close(), closed_rl.close()
        asyncio.run(main())
    finally:
        s.stop()


# -- TLS and ACL ------------------------------------------------------------------------------------------------

def _tls_server(tmp, trustme, auth_clients: str, *args):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("fastgw-client")
    paths = {}
    for name, blob in (("ca.pem", ca.cert_pem), ("server.pem", cert.cert_chain_pems[0]),
                       ("server.key", cert.private_key_pem), ("client.pem", client.cert_chain_pems[0]),
                       ("client.key", client.private_key_pem)):
        paths[name] = os.path.join(tmp, name)
        blob.write_to_path(paths[name])
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--tls-cert-file", paths["server.pem"],
                             "--tls-key-file", paths["server.key"], "--tls-ca-cert-file", paths["ca.pem"],
                             "--tls-auth-clients", auth_clients, *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, port, paths


def _wait_tls(port, paths):
    wait_for("the TLS server", lambda: "PONG" in cli(port, "--cert", paths["client.pem"], "--key",
                                                     paths["client.key"], "PING", tls=paths["ca.pem"]) or
             "NOAUTH" in cli(port, "--cert", paths["client.pem"], "--key", paths["client.key"], "PING",
                             tls=paths["ca.pem"]))


def test_tls_limits_with_a_ca_file_and_a_client_certificate(tmp_path, make_exchange):
    require_tool("redis-server"), require_tool("redis-cli")
    trustme = require_module("trustme")
    tmp = str(tmp_path)
    proc, port, p = _tls_server(tmp, trustme, "yes")
    try:
        _wait_tls(port, p)
        url = (f"rediss://127.0.0.1:{port}/0?ca_file={p['ca.pem']}&cert_file={p['client.pem']}"
               f"&key_file={p['client.key']}")

        async def main():
            rl = limiter(tmp, "tls", url)
            for _ in range(3):
                assert await attempt(rl, make_exchange(consumer="alice")) == "ok"
            # The bucket really is in that server: L - 3 left.
            ex = make_exchange(consumer="alice")
            assert await attempt(rl, ex) == "ok"
            assert f"x-ratelimit-remaining-requests: {L - 4}".encode() in b"".join(ex.response_headers)
            rl.close()
            # Without the client certificate the server refuses the handshake; without the CA we refuse it.
            for bad in (f"rediss://127.0.0.1:{port}/0?ca_file={p['ca.pem']}", f"rediss://127.0.0.1:{port}/0"):
                c = RedisClient(bad, connect_timeout=0.5, timeout=0.5)
                with pytest.raises(RedisError):
                    await c.call("PING")
                c.close()
        asyncio.run(main())
    finally:
        proc.kill(), proc.wait(10)


def test_acl_user_over_tls(tmp_path, make_exchange):
    """AUTH user password (an ACL user limited to the gateway's keys) over rediss://; a wrong password and a user
    without access to the keys follow fail_open like any Redis error."""
    require_tool("redis-server"), require_tool("redis-cli")
    trustme = require_module("trustme")
    tmp = str(tmp_path)
    proc, port, p = _tls_server(tmp, trustme, "no", "--user", "default", "off", "--user", "gw", "on", ">gw-pw",
                                "~fastgw:*", "+@all", "--user", "narrow", "on", ">narrow-pw", "~other:*", "+@all")
    try:
        wait_for("the TLS server", lambda: "NOAUTH" in cli(port, "PING", tls=p["ca.pem"]) or
                 "WRONGPASS" in cli(port, "PING", tls=p["ca.pem"]) or "PONG" in cli(port, "PING", tls=p["ca.pem"]))
        base = f"127.0.0.1:{port}/0?ca_file={p['ca.pem']}"

        async def main():
            rl = limiter(tmp, "gw", f"rediss://gw:gw-pw@{base}")
            for _ in range(3):
                assert await attempt(rl, make_exchange(consumer="alice")) == "ok"
            rl.close()
            wrong = limiter(tmp, "wrong", f"rediss://gw:not-it@{base}")
            assert await attempt(wrong, make_exchange(consumer="alice")) == 503
            assert "WRONGPASS" in wrong.ctx.log.stream.getvalue() and "not-it" not in wrong.ctx.log.stream.getvalue()
            narrow = limiter(tmp, "narrow", f"rediss://narrow:narrow-pw@{base}")
            assert await attempt(narrow, make_exchange(consumer="alice")) == 503
            assert "NOPERM" in narrow.ctx.log.stream.getvalue()
            wrong.close(), narrow.close()
        asyncio.run(main())
    finally:
        proc.kill(), proc.wait(10)


# -- the pass-through resource map shared by two gateways -------------------------------------------------------------

def test_two_gateways_share_the_resource_map(tmp_path, mock, start_gateway, redis_server):
    """Two `fastgw serve` processes (each its own shared-memory table) with one Redis: a file or an upload made
    through one is used through the other by its owner, and refused to another consumer on both."""
    import openai

    from tests.integration.conftest import model_config
    from tests.integration.test_passthrough import BATCH_LINE, KEYS, auth_policies, client, jsonl

    cfg = (auth_policies(tmp_path) + model_config(mock.url, name="*")
           + f'\n[passthrough]\nresources_redis = "{redis_server.url}"\n')
    a, b = start_gateway(cfg), start_gateway(cfg)
    alice_a, alice_b = client(a, KEYS["alice"]), client(b, KEYS["alice"])
    bob_a, bob_b = client(a, KEYS["bob"]), client(b, KEYS["bob"])

    f = alice_a.files.create(file=("in.jsonl", jsonl(BATCH_LINE)), purpose="batch")
    stored = cli(redis_server.port, "GET", "fastgw:res:" + f.id).strip()
    assert len(stored) == 32                                  # owner word and deployment seed, in hex
    assert alice_b.files.retrieve(f.id).id == f.id            # b had never seen it: looked up in Redis
    assert alice_b.files.content(f.id).content == jsonl(BATCH_LINE)
    for bob in (bob_a, bob_b):
        with pytest.raises(openai.NotFoundError) as e:
            bob.files.retrieve(f.id)
        assert e.value.body["code"] == "resource_not_found"
    # Lists through either gateway: the consumer's own resources, wherever they were made.
    h = alice_a.files.create(file=("h.jsonl", jsonl(BATCH_LINE)), purpose="batch")     # b never hears of it
    mine = bob_b.files.create(file=("b.jsonl", jsonl(BATCH_LINE)), purpose="batch")
    assert {f.id, h.id} <= {x.id for x in alice_b.files.list()}
    assert [x.id for x in bob_a.files.list()] == [mine.id]
    batch = alice_b.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert alice_a.batches.retrieve(batch.id).status == "completed"    # made through b, used through a

    # An upload's parts (streamed bodies, routed by the id in their path) through the other gateway.
    data = os.urandom(150_000)
    up = alice_a.uploads.create(bytes=len(data), filename="d.bin", mime_type="application/octet-stream",
                                purpose="batch")
    parts = [alice_b.uploads.parts.create(up.id, data=data[:100_000]),
             alice_a.uploads.parts.create(up.id, data=data[100_000:])]
    with pytest.raises(openai.NotFoundError):
        bob_b.uploads.parts.create(up.id, data=b"x")
    done = alice_b.uploads.complete(up.id, part_ids=[p.id for p in parts])
    assert alice_a.files.content(done.file.id).content == data

    assert alice_b.files.delete(f.id).deleted                 # forgotten in Redis too
    wait_for("the id to leave Redis", lambda: cli(redis_server.port, "EXISTS", "fastgw:res:" + f.id).strip() == "0")
    with pytest.raises(openai.NotFoundError):
        alice_b.files.retrieve("file-made-nowhere")

    # Redis down: an id this gateway has not seen cannot be checked: 503, never a wrong 404 or a blind route.
    g = alice_a.files.create(file=("g.jsonl", jsonl(BATCH_LINE)), purpose="batch")
    redis_server.kill()
    with pytest.raises(openai.InternalServerError) as e:
        alice_b.files.retrieve(g.id)
    assert e.value.status_code == 503 and e.value.body["code"] == "resource_map_unavailable"
    assert alice_a.files.retrieve(g.id).id == g.id            # known where it was made
    with pytest.raises(openai.NotFoundError):
        bob_a.files.retrieve(g.id)
