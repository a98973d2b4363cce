import os
import random
from bisect import bisect_left

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from fastgw.observability.metrics import DURATION_BUCKETS, OVERFLOW, OVERHEAD_BUCKETS_US, TTFT_BUCKETS, Stats


def parse(text: bytes) -> dict:
    """{sample name: {frozenset(labels): value}} from Prometheus text."""
    out: dict = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def L(**kw):
    return frozenset(kw.items())


def req(stats, model="gpt-4o", upstream="openai", consumer="alice", status=200, latency=0.3, ttft=0.1,
        overhead=20e-6, prompt=10, completion=5, cost=0.001):
    stats.request(model, upstream, consumer, status, latency, ttft, overhead, prompt, completion, cost)


def test_two_workers_sum(tmp_path):
    w1, w2 = Stats(str(tmp_path), "0"), Stats(str(tmp_path), "1")
    for _ in range(3):
        req(w1)
    req(w2)
    req(w2, status=429, ttft=None, prompt=0, completion=0, cost=0.0)
    req(w2, model="llama", upstream="local", consumer="bob", latency=2.0, ttft=0.7, prompt=7, completion=1,
        cost=0.5)
    w1.rejected("bob", "gpt-4o", "rate_limit")
    w2.rejected("bob", "gpt-4o", "rate_limit")
    w2.rejected("eve", "gpt-4o", "auth")
    w1.upstream_error("openai", "timeout")
    w1.set_gauge("open_connections", 4)
    w2.set_gauge("open_connections", 3)
    w2.flush()  # w1 flushes itself in render
    m = parse(w1.render())

    assert m["fastgw_requests_total"] == {
        L(model="gpt-4o", upstream="openai", consumer="alice", status="200"): 4,
        L(model="gpt-4o", upstream="openai", consumer="alice", status="429"): 1,
        L(model="llama", upstream="local", consumer="bob", status="200"): 1,
    }
    a = L(model="gpt-4o", upstream="openai", consumer="alice")
    b = L(model="llama", upstream="local", consumer="bob")
    assert m["fastgw_prompt_tokens_total"] == {a: 40, b: 7}
    assert m["fastgw_completion_tokens_total"] == {a: 20, b: 1}
    assert m["fastgw_cost_usd_total"][a] == pytest.approx(0.004)
    assert m["fastgw_cost_usd_total"][b] == pytest.approx(0.5)
    assert m["fastgw_rejections_total"] == {L(consumer="bob", model="gpt-4o", reason="rate_limit"): 2,
                                            L(consumer="eve", model="gpt-4o", reason="auth"): 1}
    assert m["fastgw_upstream_errors_total"] == {L(upstream="openai", kind="timeout"): 1}
    assert m["fastgw_open_connections"] == {frozenset(): 7}

    dur = m["fastgw_request_duration_seconds_count"]
    assert dur == {L(model="gpt-4o", upstream="openai"): 5, L(model="llama", upstream="local"): 1}
    assert m["fastgw_request_duration_seconds_sum"][L(model="gpt-4o", upstream="openai")] == pytest.approx(1.5)
    buckets = m["fastgw_request_duration_seconds_bucket"]
    assert buckets[L(model="gpt-4o", upstream="openai", le="0.25")] == 0
    assert buckets[L(model="gpt-4o", upstream="openai", le="0.5")] == 5
    assert buckets[L(model="llama", upstream="local", le="1.0")] == 0
    assert buckets[L(model="llama", upstream="local", le="2.5")] == 1
    assert buckets[L(model="llama", upstream="local", le="+Inf")] == 1
    # ttft: None is not observed
    assert m["fastgw_time_to_first_token_seconds_count"] == {L(model="gpt-4o"): 4, L(model="llama"): 1}
    assert m["fastgw_overhead_microseconds_count"] == {frozenset(): 6}
    assert m["fastgw_overhead_microseconds_sum"][frozenset()] == pytest.approx(120)


def test_histogram_matches_reference_on_random_values(tmp_path):
    rng = random.Random(7)
    s = Stats(str(tmp_path), "w")
    values = [rng.choice([rng.uniform(0, 400), b]) for b in DURATION_BUCKETS for _ in range(20)]
    for v in values:
        req(s, latency=v, overhead=v * 1e-4)
    m = parse(s.render())
    got = m["fastgw_request_duration_seconds_bucket"]
    for b in DURATION_BUCKETS:
        label = L(model="gpt-4o", upstream="openai", le=repr(float(b)))
        assert got[label] == sum(1 for v in values if v <= b)  # Prometheus "le" is inclusive
    over = m["fastgw_overhead_microseconds_bucket"]
    for b in OVERHEAD_BUCKETS_US:
        assert over[L(le=repr(float(b)))] == sum(1 for v in values if v * 1e-4 * 1e6 <= b)


def test_exited_worker_counters_kept_gauges_dropped(tmp_path):
    live = Stats(str(tmp_path), "0")
    req(live)
    live.set_gauge("open_connections", 2)
    pid = os.fork()
    if pid == 0:  # a worker that serves, flushes at exit and dies; its replacement reuses index 1
        try:
            dead = Stats(str(tmp_path), "1")
            for _ in range(5):
                req(dead)
            dead.set_gauge("open_connections", 100)
            dead.flush()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    successor = Stats(str(tmp_path), "1")
    req(successor)
    successor.set_gauge("open_connections", 1)
    successor.flush()
    m = parse(live.render())
    assert m["fastgw_requests_total"] == {L(model="gpt-4o", upstream="openai", consumer="alice", status="200"): 7}
    assert m["fastgw_open_connections"] == {frozenset(): 3}


def test_counters_monotonic_across_scrapes(tmp_path):
    s = Stats(str(tmp_path), "0")
    previous = 0
    for i in range(4):
        for _ in range(i + 1):
            req(s)
        value = sum(parse(s.render())["fastgw_requests_total"].values())
        assert value > previous
        previous = value
    assert previous == 10


def test_series_cap_overflows(tmp_path):
    s = Stats(str(tmp_path), "0", max_series=3)
    for i in range(10):
        req(s, consumer=f"c{i}")
        s.rejected(f"c{i}", "m", "budget")
    m = parse(s.render())
    reqs = m["fastgw_requests_total"]
    assert len(reqs) == 4  # three real series and the overflow one
    assert reqs[L(model=OVERFLOW, upstream=OVERFLOW, consumer=OVERFLOW, status=OVERFLOW)] == 7
    assert sum(reqs.values()) == 10
    assert sum(m["fastgw_prompt_tokens_total"].values()) == 100
    assert m["fastgw_rejections_total"][L(consumer=OVERFLOW, model=OVERFLOW, reason=OVERFLOW)] == 7


def test_label_values_are_escaped(tmp_path):
    s = Stats(str(tmp_path), "0")
    req(s, consumer='we"ird\\name\nx')
    m = parse(s.render())
    assert L(model="gpt-4o", upstream="openai", consumer='we"ird\\name\nx', status="200") in m["fastgw_requests_total"]


def test_empty_directory_renders_valid_text(tmp_path):
    text = Stats(str(tmp_path), "0").render()
    names = {f.name for f in text_string_to_metric_families(text.decode())}
    assert {"fastgw_requests", "fastgw_request_duration_seconds", "fastgw_overhead_microseconds"} <= names


def test_flush_is_atomic_replace(tmp_path):
    s = Stats(str(tmp_path), "0")
    req(s)
    s.flush()
    files = os.listdir(tmp_path)
    assert len(files) == 1 and not files[0].endswith(".tmp")
    # a stray unrelated or broken file does not break the scrape
    (tmp_path / "fastgw-metrics-broken-1.json").write_bytes(b"{not json")
    (tmp_path / "other.txt").write_text("x")
    assert sum(parse(s.render())["fastgw_requests_total"].values()) == 1


class ReferenceRecords:
    """The plain-Python accumulator the compiled RequestStats replaced (the reference for its values)."""

    def __init__(self, max_series):
        self.max_series = max_series
        self.records = {}
        self.overhead = [0] * (len(OVERHEAD_BUCKETS_US) + 1) + [0.0]

    def request(self, model, upstream, consumer, status, latency, ttft, overhead, prompt, completion, cost):
        key = (model, upstream, consumer, status)
        r = self.records.get(key)
        if r is None:
            if len(self.records) >= self.max_series:
                key = (OVERFLOW,) * 4
            r = self.records.setdefault(key, [0, 0, 0, 0.0, 0.0, 0.0] + [0] * (len(DURATION_BUCKETS)
                                                                               + len(TTFT_BUCKETS) + 2))
        r[0] += 1
        r[1] += prompt
        r[2] += completion
        r[3] += cost
        r[6 + bisect_left(DURATION_BUCKETS, latency)] += 1
        r[4] += latency
        if ttft is not None:
            r[7 + len(DURATION_BUCKETS) + bisect_left(TTFT_BUCKETS, ttft)] += 1
            r[5] += ttft
        us = overhead * 1e6
        self.overhead[bisect_left(OVERHEAD_BUCKETS_US, us)] += 1
        self.overhead[-1] += us


# Values on and around every bound (bisect_left: a value equal to a bound is in that bound's bucket).
_EDGES = [b * f for b in DURATION_BUCKETS + TTFT_BUCKETS for f in (1.0, 1 - 1e-12, 1 + 1e-12)]
_SECONDS = st.one_of(st.sampled_from(_EDGES), st.floats(0, 500, allow_nan=False), st.just(float("inf")))
_REQUEST = st.tuples(
    st.sampled_from(["gpt-4o", "llama", "*"]), st.sampled_from(["a:80", "b:443"]),
    st.sampled_from(["", "alice", "bob"]), st.sampled_from([200, 429, 502]), _SECONDS,
    st.one_of(st.none(), _SECONDS), st.one_of(st.sampled_from([b * 1e-6 for b in OVERHEAD_BUCKETS_US]),
                                              st.floats(0, 0.05, allow_nan=False)),
    st.integers(0, 10**6), st.integers(0, 10**6), st.floats(0, 10, allow_nan=False))


@settings(max_examples=100, deadline=None)
@given(requests=st.lists(_REQUEST, max_size=40), max_series=st.integers(1, 8))
def test_compiled_records_match_reference(tmp_path_factory, requests, max_series):
    s = Stats(str(tmp_path_factory.mktemp("m")), "0", max_series=max_series)
    ref = ReferenceRecords(max_series)
    for r in requests:
        # Fresh string objects now and then: the last-record shortcut compares pointers, the dict compares values.
        r = (r[0] + "x")[:-1] if len(r[0]) > 1 and r[4] > 250 else r[0], *r[1:]
        s.request(*r)
        ref.request(*r)
    assert s.records() == ref.records      # exact: the same float additions in the same order
    assert s.overhead_histogram() == ref.overhead
    assert [type(v) for rec in s.records().values() for v in rec] == \
        [type(v) for rec in ref.records.values() for v in rec]


def test_nan_and_infinite_land_like_bisect(tmp_path):
    s, ref = Stats(str(tmp_path), "0"), ReferenceRecords(10)
    for v in (float("nan"), float("inf"), -1.0, 0.0):
        for acc in (s, ref):
            acc.request("m", "u", "c", 200, v, v, v, 1, 1, 0.5)
    assert str(s.records()) == str(ref.records)   # NaN sums compare by text
    assert str(s.overhead_histogram()) == str(ref.overhead)


def test_upstream_pool_gauges_and_counters_sum_over_workers(tmp_path):
    w1, w2 = Stats(str(tmp_path), "0"), Stats(str(tmp_path), "1")
    w1.set_pools([("api:443", 10, 4, 0, 12, 3, 0.5)])
    w2.set_pools([("api:443", 6, 1, 2, 7, 5, 1.25), ("local:8000", 1, 1, 0, 1, 0, 0.0)])
    w1.flush()
    m = parse(w2.render())
    assert m["fastgw_upstream_connections"] == {L(upstream="api:443"): 16, L(upstream="local:8000"): 1}
    assert m["fastgw_upstream_idle_connections"][L(upstream="api:443")] == 5
    assert m["fastgw_upstream_waiting"][L(upstream="api:443")] == 2
    assert m["fastgw_upstream_connects_total"][L(upstream="api:443")] == 19
    assert m["fastgw_upstream_queued_total"][L(upstream="api:443")] == 8
    assert m["fastgw_upstream_queue_wait_seconds_total"][L(upstream="api:443")] == pytest.approx(1.75)


def test_breaker_state_is_shown_once_and_opens_and_fallbacks_sum_over_workers(tmp_path):
    w1, w2 = Stats(str(tmp_path), "0"), Stats(str(tmp_path), "1")
    # Both workers read the same shared breaker; one saw it half-open a moment before the other saw it open.
    w1.set_deployments([("gpt-4o", "api:443", 1), ("gpt-4o", "azure:443", 0)])
    w2.set_deployments([("gpt-4o", "api:443", 2), ("gpt-4o", "azure:443", 0)])
    w1.breaker_opened("gpt-4o", "api:443")
    w2.breaker_opened("gpt-4o", "api:443")
    w2.fallback("gpt-4o", "claude")
    w1.flush()
    m = parse(w2.render())
    assert m["fastgw_deployment_state"] == {L(model="gpt-4o", upstream="api:443"): 2,
                                            L(model="gpt-4o", upstream="azure:443"): 0}
    assert m["fastgw_breaker_opens_total"] == {L(model="gpt-4o", upstream="api:443"): 2}
    assert m["fastgw_fallbacks_total"] == {L(model="gpt-4o", fallback="claude"): 1}
