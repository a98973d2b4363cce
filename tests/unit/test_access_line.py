"""The access-log line formatted in C (fastgw/observability/accounting.pyx) against a dict + orjson reference."""
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgw.observability.accounting import FIELDS, access_record, format_access_line
from fastgw.proxy.exchange import Exchange
from fastgw.routing.router import Deployment, Route

text = st.text(max_size=60)                     # quotes, backslashes, control characters, any unicode
# The route that served: none (a refusal), the wildcard (served_model = the client's model), or a named one.
routes = st.one_of(st.none(), st.just("*"), text).map(
    lambda name: None if name is None else Route(name, [(Deployment("http://h/v1", "", ""), 1)]))


def reference(ex, latency, ttft, overhead) -> dict:
    return {
        "request_id": ex.request_id, "client": ex.client_addr, "method": ex.method.decode("latin-1"),
        "path": ex.path, "model": ex.model,
        "served_model": None if ex.route is None or ex.route.name in ("*", ex.model) else ex.route.name,
        "consumer": ex.consumer, "upstream": ex.upstream_name, "attempts": ex.attempts, "status": ex.status, "stream": ex.stream, "latency_ms": round(latency * 1e3, 3),
        "ttft_ms": round(ttft * 1e3, 3) if ttft >= 0 else None, "overhead_us": int(overhead * 1e6),
        "prompt_tokens": ex.prompt_tokens, "completion_tokens": ex.completion_tokens, "cost_usd": ex.cost,
        "bytes_in": ex.bytes_in, "bytes_out": ex.bytes_out, "cache": ex.cache or None,
        "cache_similarity": round(ex.cache_similarity, 4) if ex.cache_similarity > 0 else None,
        "error": ex.error or None,
    }


@settings(max_examples=300)
@given(rid=text, client=text, path=text, model=text, consumer=text, upstream=text, error=text,
       method=st.binary(max_size=10), status=st.integers(0, 999), stream=st.booleans(),
       latency=st.floats(0, 1e4), ttft=st.one_of(st.just(-1.0), st.floats(0, 1e4)), overhead=st.floats(0, 10),
       tokens=st.tuples(st.integers(-1, 10**9), st.integers(-1, 10**9)),
       cost=st.floats(0, 1e6), nbytes=st.tuples(st.integers(0, 10**12), st.integers(0, 10**12)), route=routes,
       attempts=st.integers(0, 50), cache=st.sampled_from([None, "", "hit", "miss", "refresh", "bypass"]),
       similarity=st.one_of(st.just(0.0), st.floats(0.00005, 1.0)))
def test_line_matches_reference(rid, client, path, model, consumer, upstream, error, method, status, stream,
                                latency, ttft, overhead, tokens, cost, nbytes, route, attempts, cache, similarity):
    ex = Exchange(rid, client, method, path, None, 0.0)
    ex.cache, ex.cache_similarity = cache, similarity
    ex.model, ex.consumer, ex.upstream_name, ex.error = model, consumer, upstream, error
    ex.route, ex.attempts = route, attempts
    ex.status, ex.stream, ex.cost = status, stream, cost
    ex.prompt_tokens, ex.completion_tokens = tokens
    ex.bytes_in, ex.bytes_out = nbytes
    line = format_access_line(ex, latency, ttft, overhead)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    got = orjson.loads(line)
    assert got.pop("ts") > 1.7e9
    want = reference(ex, latency, ttft, overhead)
    assert abs(got.pop("cost_usd") - want.pop("cost_usd")) <= 1e-8 * max(1.0, cost)
    for k in ("latency_ms", "ttft_ms"):
        g, w = got.pop(k), want.pop(k)
        assert (g is None and w is None) or abs(g - w) <= 1e-3 + 1e-12 * abs(w)
    assert abs(got.pop("overhead_us") - want.pop("overhead_us")) <= 1
    g, w = got.pop("cache_similarity"), want.pop("cache_similarity")
    assert (g is None and w is None) or abs(g - w) <= 1e-4
    assert got == want


def test_overlong_fields_are_cut_and_the_line_stays_json():
    ex = Exchange("r", "c", b"GET", "/" + "\"x" * 5000, None, 0.0)
    line = format_access_line(ex, 0.001, -1.0, 0.0)
    got = orjson.loads(line)
    assert got["path"].startswith('/"x') and len(got["path"].encode()) <= 1024
    ex = Exchange("r", "c", b"GET", "/" + "é漢" * 2000 + "\x01" * 3000, None, 0.0)
    got = orjson.loads(format_access_line(ex, 0.001, -1.0, 0.0))   # cut on a character boundary
    assert got["path"].startswith("/é漢") and len(got["path"].encode()) <= 1024


@settings(max_examples=200)
@given(rid=text, model=text, error=text, method=st.binary(max_size=10), status=st.integers(0, 999),
       stream=st.booleans(), ttft=st.one_of(st.just(-1.0), st.floats(0, 1e4)), cost=st.floats(0, 1e6), route=routes,
       attempts=st.integers(0, 50))
def test_the_compiled_line_and_the_dict_of_log_hooks_are_one_field_list(rid, model, error, method, status, stream,
                                                                        ttft, cost, route, attempts):
    ex = Exchange(rid, "10.0.0.1", method, "/v1/chat/completions", None, 0.0)
    ex.model, ex.error, ex.status, ex.stream, ex.cost = model, error, status, stream, cost
    ex.route, ex.attempts = route, attempts
    ex.cache_similarity = 0.97316 if status % 2 else 0.0
    line = orjson.loads(format_access_line(ex, 1.5, ttft, 0.25))
    rec = access_record(ex, 1.5, ttft, 0.25)
    assert list(line) == list(rec) == list(FIELDS)
    line.pop("ts"), rec.pop("ts")
    assert abs(line.pop("cost_usd") - rec.pop("cost_usd")) <= 1e-8 * max(1.0, cost)
    assert line == rec
