"""Route.pick's balancing strategies, priority tiers, max_concurrent and its queue, and the per-deployment settings
(timeouts, headers) as the router builds them. Real Deployments and Routes; traffic is simulated by calling the
relay's bookkeeping (started / first_byte / ended) as the relay does."""
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgw.protocol.jsonpeek import peek_request
from fastgw.proxy.exchange import Exchange
from fastgw.routing.router import Deployment, EXPLORE_EVERY, Route, Router, sticky_hash
from fastgw.runtime.config import (Config, ConfigError, DeploymentConfig, DeploymentTimeouts, Model, Upstream,
                                   parse)


def dep(i, weight=1, priority=1, max_concurrent=0, **kw):
    url = f"http://10.0.0.{i}:8000/v1"
    return Deployment(url, "", "", config=DeploymentConfig(url=url, weight=weight, priority=priority,
                                                           max_concurrent=max_concurrent, **kw))


def exchange(consumer="", client="192.0.2.1", body=b'{"model":"m"}'):
    ex = Exchange("r", client, b"POST", "/v1/chat/completions", None, 0.0)
    ex.consumer = consumer
    ex.body = body
    ex.fields = peek_request(body)
    return ex


def shares(picks, deployments):
    return [sum(1 for p in picks if p is d) / len(picks) for d in deployments]


# -- round robin, exclusion, tiers, max_concurrent --------------------------------------------------------------

def test_round_robin_shares_follow_weights_exactly():
    ds = [dep(1, 5), dep(2, 3), dep(3, 2)]
    route = Route("m", ds)
    picks = [route.pick(None) for _ in range(10_000)]
    assert [picks.count(d) for d in ds] == [5000, 3000, 2000]      # smooth WRR: exact over whole cycles


def test_excluded_deployments_are_skipped_and_the_others_keep_their_ratio():
    a, b, c = dep(1, 2), dep(2, 1), dep(3, 1)
    route = Route("m", [a, b, c])
    picks = [route.pick(None, [a]) for _ in range(3000)]
    assert a not in picks and [picks.count(b), picks.count(c)] == [1500, 1500]
    assert route.pick(None, [a, b, c]) is None


def test_tier_two_serves_only_while_tier_one_has_nothing_to_offer():
    a, b = dep(1, priority=1, max_concurrent=1), dep(2, priority=1, max_concurrent=1)
    backup = dep(3, priority=2)
    route = Route("m", [backup, a, b])                 # listed first, still tier 2
    assert {route.pick(None) for _ in range(10)} == {a, b}
    assert route.pick(None, [a, b]) is backup          # tier 1 all excluded (tried)
    a.started()
    assert route.pick(None) is b                       # a is at max_concurrent
    b.started()
    assert route.pick(None) is backup                  # tier 1 all full: tier 2
    b.ended()
    assert route.pick(None) is b                       # back to tier 1 as soon as it has room


def test_nothing_left_is_none():
    a = dep(1, max_concurrent=2)
    route = Route("m", [a])
    a.started(), a.started()
    assert route.pick(None) is None
    a.ended()
    assert route.pick(None) is a


# -- least in flight --------------------------------------------------------------------------------------------

def simulate(route, ticks, duration, latency=None, arrivals=1):
    """Requests arrive `arrivals` per tick; one on deployment d lasts duration(d, tick) ticks. Returns the picks."""
    ending = {}
    picks = []
    for t in range(ticks):
        for d in ending.pop(t, []):
            d.ended()
        for _ in range(arrivals):
            d = route.pick(None)
            picks.append(d)
            d.started()
            if latency is not None:
                d.first_byte(latency(d, t))
            ending.setdefault(t + duration(d, t), []).append(d)
    return picks


def test_least_in_flight_moves_traffic_away_from_a_slow_deployment():
    fast, slow = dep(1), dep(2)
    route = Route("m", [fast, slow], "least-in-flight")
    picks = simulate(route, 5000, lambda d, t: 20 if d is slow else 2, arrivals=2)
    share_fast, share_slow = shares(picks, [fast, slow])
    assert share_slow < 0.15                           # it holds its requests 10x longer: it gets far fewer
    assert fast.in_flight + slow.in_flight <= 2 * 20


def test_least_in_flight_with_equal_speed_follows_the_weights():
    a, b = dep(1, weight=3), dep(2, weight=1)
    route = Route("m", [a, b], "least-in-flight")
    picks = simulate(route, 8000, lambda d, t: 8, arrivals=1)
    assert shares(picks, [a, b])[0] == pytest.approx(0.75, abs=0.02)


def test_least_in_flight_ties_go_round_robin():
    a, b = dep(1), dep(2)
    route = Route("m", [a, b], "least-in-flight")
    assert [route.pick(None) for _ in range(4)] == [a, b, a, b]   # nothing in flight: alternate
    a.started()
    assert route.pick(None) is b


# -- lowest latency ---------------------------------------------------------------------------------------------

def test_lowest_latency_sends_all_but_the_exploration_to_the_fastest():
    fast, slow = dep(1), dep(2)
    fast.first_byte(0.1)
    slow.first_byte(1.0)
    route = Route("m", [fast, slow], "lowest-latency")
    picks = [route.pick(None) for _ in range(2000)]
    assert picks.count(slow) == 2000 // EXPLORE_EVERY             # 5 %: keeps measuring it
    assert fast.latency == pytest.approx(0.1)


def test_a_deployment_never_measured_is_tried_first():
    known, new = dep(1), dep(2)
    known.first_byte(0.01)
    route = Route("m", [known, new], "lowest-latency")
    assert route.pick(None) is new


def test_lowest_latency_moves_away_from_a_deployment_that_slows_down_and_back_when_it_recovers():
    a, b = dep(1), dep(2)
    route = Route("m", [a, b], "lowest-latency")
    # b is the faster until tick 1000, then slow until 2000, then fast again; a is steady.
    b_latency = lambda t: 0.2 if t < 1000 or t >= 2000 else 3.0
    picks = simulate(route, 3000, lambda d, t: 1, latency=lambda d, t: 0.5 if d is a else b_latency(t))
    assert shares(picks[:1000], [a, b])[1] > 0.9
    assert shares(picks[1100:2000], [a, b])[1] <= 1.5 / EXPLORE_EVERY    # only the exploration picks
    assert shares(picks[2300:], [a, b])[1] > 0.9                           # recovered: measured again, wins


def test_moving_average_of_first_byte_times():
    d = dep(1)
    assert (d.latency, d.samples) == (0.0, 0)
    d.first_byte(1.0)
    d.first_byte(2.0)
    assert d.samples == 2 and 1.0 < d.latency < 2.0


# -- sticky -----------------------------------------------------------------------------------------------------

def fnv_splitmix(data: bytes) -> int:
    """The reference of router._hash64: FNV-1a 64, then splitmix64's finalizer."""
    m = (1 << 64) - 1
    h = 14695981039346656037
    for b in data:
        h = ((h ^ b) * 1099511628211) & m
    h = ((h ^ (h >> 30)) * 0xbf58476d1ce4e5b9) & m
    h = ((h ^ (h >> 27)) * 0x94d049bb133111eb) & m
    return h ^ (h >> 31)


@given(st.text(max_size=40))
def test_sticky_hash_is_fnv1a_with_splitmix_so_every_worker_and_release_agrees(key):
    assert sticky_hash(key) == fnv_splitmix(key.encode("utf-8", "surrogatepass"))


def sticky_map(route, keys):
    return {k: route.pick(exchange(consumer=k)) for k in keys}


KEYS = [f"consumer-{i}" for i in range(3000)]


def test_sticky_same_key_same_deployment_and_an_even_spread():
    ds = [dep(i) for i in range(1, 4)]
    route = Route("m", ds, "sticky")
    first = sticky_map(route, KEYS)
    assert sticky_map(route, KEYS) == first                        # stable
    again = Route("m", [dep(i) for i in range(1, 4)], "sticky")     # another worker, or after a reload
    assert {k: d.name for k, d in sticky_map(again, KEYS).items()} == {k: d.name for k, d in first.items()}
    for share in shares(list(first.values()), ds):
        assert share == pytest.approx(1 / 3, abs=0.04)


def test_sticky_follows_weights():
    ds = [dep(1, weight=2), dep(2), dep(3)]
    picks = list(sticky_map(Route("m", ds, "sticky"), KEYS).values())
    assert shares(picks, ds) == pytest.approx([0.5, 0.25, 0.25], abs=0.04)


def test_sticky_removing_a_deployment_moves_only_its_keys():
    ds = [dep(i) for i in range(1, 5)]
    before = sticky_map(Route("m", ds, "sticky"), KEYS)
    gone = ds[2]
    after = sticky_map(Route("m", [d for d in ds if d is not gone], "sticky"), KEYS)
    moved = [k for k in KEYS if after[k] is not before[k]]
    assert moved and all(before[k] is gone for k in moved)
    assert len(moved) == sum(1 for d in before.values() if d is gone)


def test_sticky_unavailable_moves_the_key_while_it_is_away_only():
    ds = [dep(i) for i in range(1, 4)]
    route = Route("m", ds, "sticky")
    ex = exchange(consumer="alice")
    home = route.pick(ex)
    elsewhere = route.pick(ex, [home])
    assert elsewhere is not home and route.pick(ex, [home]) is elsewhere
    assert route.pick(ex) is home


def test_sticky_key_user_reads_the_body_and_falls_back_to_consumer_then_client_address():
    ds = [dep(i) for i in range(1, 9)]
    by_user = Route("m", ds, "sticky", "user")
    by_consumer = Route("m", ds, "sticky")
    users = [orjson.dumps({"model": "m", "user": f"u{i}"}) for i in range(50)]
    # The same user from different consumers and addresses: one deployment.
    for body in users:
        assert len({by_user.pick(exchange(consumer=c, client=a, body=body))
                    for c, a in (("k1", "192.0.2.1"), ("k2", "192.0.2.2"))}) == 1
    # The consumer key ignores the body's user; no user: the consumer; no consumer: the client address.
    assert len({by_consumer.pick(exchange(consumer="k1", body=b)) for b in users}) == 1
    assert by_user.pick(exchange(consumer="k1")) is by_consumer.pick(exchange(consumer="k1"))
    assert by_consumer.pick(exchange(client="198.51.100.7")) is by_consumer.pick(
        exchange(consumer="198.51.100.7"))
    spread = {by_user.pick(exchange(consumer="k1", body=b)) for b in users}
    assert len(spread) > 4                             # users of one consumer still spread


# -- the queue of requests waiting for a free slot -------------------------------------------------------------

def test_requests_queue_for_a_free_slot_first_come_first_served():
    a = dep(1, max_concurrent=1)
    route = Route("m", [a], max_queue=2, queue_timeout=5.0)
    got = []

    def turn(name):
        def callback(d):
            got.append((name, d))
            d.started()                                # as the relay does when it sends
        return callback

    a.started()
    assert route.pick(None) is None
    first = route.wait(exchange(), turn("first"))
    second = route.wait(exchange(), turn("second"))
    assert first is not None and second is not None and route.queued == 2
    assert route.wait(exchange(), turn("third")) is None          # max_queue are waiting
    route.leave(first)                                            # it timed out, or its client left
    a.ended()
    assert got == [("second", a)] and route.queued == 0 and a.in_flight == 1
    a.ended()
    assert got == [("second", a)]                                 # nobody waits any more


def test_no_queue_when_nothing_is_merely_full():
    a = dep(1, max_concurrent=1)
    route = Route("m", [a], max_queue=5)
    assert route.wait(exchange(), lambda d: None) is None         # a has room: waiting makes no sense
    route_without_queue = Route("m", [dep(2, max_concurrent=1)])
    assert route_without_queue.wait(exchange(), lambda d: None) is None


# -- per-deployment settings as built from the config -----------------------------------------------------------

def test_timeouts_are_the_deployments_own_else_the_upstream_sections():
    up = Upstream(connect_timeout=4, first_byte_timeout=60, stream_gap_timeout=30, total_timeout=600)
    plain = Deployment("http://a/v1", "", "", config=DeploymentConfig(url="http://a/v1"), upstream=up)
    assert not plain.own_timeouts
    assert (plain.connect_timeout, plain.first_byte_timeout, plain.stream_gap_timeout,
            plain.total_timeout) == (4, 60, 30, 600)
    own = Deployment("http://a/v1", "", "", upstream=up, config=DeploymentConfig(
        url="http://a/v1", timeouts=DeploymentTimeouts(first_byte=2.5, total=20)))
    assert own.own_timeouts
    assert (own.connect_timeout, own.first_byte_timeout, own.stream_gap_timeout,
            own.total_timeout) == (4, 2.5, 30, 20)


def test_extra_headers_follow_the_providers_and_replace_the_clients():
    d = Deployment("http://a/v1", "", "sk-1", config=DeploymentConfig(
        url="http://a/v1", headers={"OpenAI-Organization": "org-1", "x-team": "search"}))
    assert d.header_lines == (b"host: a\r\nauthorization: Bearer sk-1\r\n"
                              b"OpenAI-Organization: org-1\r\nx-team: search\r\n")
    assert d.own_header_names == (b"openai-organization", b"x-team")


def test_a_header_the_provider_sets_is_refused_naming_the_field():
    cfg = Config(models=[Model(name="m", deployments=[DeploymentConfig(
        url="http://a/v1", provider="anthropic", headers={"anthropic-version": "2020-01-01"})])])
    cfg.source = "f.toml"
    with pytest.raises(ConfigError, match=r"f.toml: models\[0\] \('m'\).deployments\[0\].headers.anthropic-version"):
        Router(cfg)


def test_router_builds_balancing_tiers_and_queue_from_the_config():
    cfg = parse("""
[upstream]
queue_timeout = 7
[[models]]
name = "m"
balancing = "sticky"
sticky_key = "user"
max_queue = 3
[[models.deployments]]
url = "http://a/v1"
priority = 2
[[models.deployments]]
url = "http://b/v1"
weight = 4
max_concurrent = 10
timeouts = { first_byte = 3 }
headers = { x-team = "search" }
""")
    route = Router(cfg).resolve("m")
    a, b = route.deployments
    assert (route.balancing, route.sticky_key, route.max_queue, route.queue_timeout) == ("sticky", "user", 3, 7.0)
    assert (a.priority, b.priority, b.weight, b.max_concurrent, b.first_byte_timeout) == (2, 1, 4, 10, 3.0)
    assert route.pick(exchange()) is b                 # tier 1 first, whatever the key


BAD = [
    ('balancing = "fastest"', "models[0] ('m').balancing: unknown balancing 'fastest'"),
    ('sticky_key = "ip"', "models[0] ('m').sticky_key"),
    ("max_queue = -1", "models[0] ('m').max_queue: must be >= 0"),
    ("max_queue = 4", "models[0] ('m').max_queue: no deployment of this model has a max_concurrent"),
    ("queue_timeout = 0", "models[0] ('m').queue_timeout: must be > 0"),
    ("[[models.deployments]]\nurl = 'http://b/v1'\npriority = 0", ".deployments[1].priority: must be >= 1"),
    ("[[models.deployments]]\nurl = 'http://b/v1'\nmax_concurrent = -2",
     ".deployments[1].max_concurrent: must be >= 0"),
    ("[[models.deployments]]\nurl = 'http://b/v1'\ntimeouts = { stream_gap = -1 }",
     ".deployments[1].timeouts.stream_gap: must be > 0"),
    ("[[models.deployments]]\nurl = 'http://b/v1'\ntimeouts = { connect = 0 }",
     ".deployments[1].timeouts.connect: must be > 0"),
    ("[[models.deployments]]\nurl = 'http://b/v1'\ntimeouts = { first_bite = 3 }", "first_bite"),
    ("[[models.deployments]]\nurl = 'http://b/v1'\nheaders = { Connection = 'close' }",
     ".deployments[1].headers.Connection: a hop-by-hop"),
    ("[[models.deployments]]\nurl = 'http://b/v1'\nheaders = { transfer-encoding = 'chunked' }",
     ".deployments[1].headers.transfer-encoding: a hop-by-hop"),
    ("[[models.deployments]]\nurl = 'http://b/v1'\nheaders = { x-a = \"1\\r\\nx-b: 2\" }",
     ".deployments[1].headers.x-a: the value contains CR, LF or NUL"),
    ("[[models.deployments]]\nurl = 'http://b/v1'\nheaders = { \"x a\" = '1' }",
     ".deployments[1].headers: 'x a' is not a valid header name"),
    ("[[models.deployments]]\nurl = 'http://b/v1'\nheaders = { \"x-a\\n\" = '1' }",
     ".deployments[1].headers: 'x-a\\n' is not a valid header name"),
    ("[[models.deployments]]\nurl = 'http://b/v1'\nheaders = { X-A = '1', x-a = '2' }",
     ".deployments[1].headers.x-a: set twice"),
]


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_balancing_settings_are_refused_naming_the_field(extra, message):
    model_fields, _, deployment = extra.partition("[[models.deployments]]")
    text = f"""
[[models]]
name = "m"
{model_fields}
[[models.deployments]]
url = "http://a/v1"
{"[[models.deployments]]" + deployment if deployment else ""}
"""
    with pytest.raises(ConfigError) as exc:
        parse(text, "f.toml")
    assert message in str(exc.value) and str(exc.value).startswith("f.toml: ")


@pytest.mark.parametrize("field", ["connect_timeout", "first_byte_timeout", "stream_gap_timeout", "total_timeout"])
def test_upstream_timeouts_must_be_positive(field):
    with pytest.raises(ConfigError, match=f"f.toml: upstream.{field}: must be > 0"):
        parse(f"[upstream]\n{field} = -1\n[[models]]\nname = 'm'\n[[models.deployments]]\nurl = 'http://a/v1'",
              "f.toml")
