"""Micro-benchmarks of the policy hot path: one bucket take, and whole policy phases per request."""
import os

import pytest

os.environ.setdefault("FASTGW_SKIP_BUILD_CHECK", "1")

import importlib.util  # noqa: E402

from fastgw.policies.ratelimit.bucket import BucketArena  # noqa: E402

# The policy fixtures of the test suite (a real Exchange, a PolicyContext), loaded by path under another name.
_spec = importlib.util.spec_from_file_location(
    "_fastgw_test_fixtures", os.path.join(os.path.dirname(__file__), "..", "..", "tests", "conftest.py"))
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)
make_exchange = _fixtures.make_exchange
policy_ctx = _fixtures.policy_ctx


@pytest.fixture
def arena(tmp_path):
    a = BucketArena(str(tmp_path / "b"), 65536)
    yield a
    a.close()


def test_take(benchmark, arena):
    benchmark(arena.take, 0x1234567890ABCDEF, 1e12, 1e6, 1.0)


def test_take_and_settle(benchmark, arena):
    def op():
        arena.take(42, 1e12, 1e6, 300.0)
        arena.give_back(42, 1e12, 1e6, 120.0)
    benchmark(op)


def test_ratelimit_request_local(benchmark, policy_ctx, make_exchange):
    from fastgw.policies.ratelimit.policy import Config, Match, RateLimit, Rule
    rl = RateLimit(Config(id="b", rules=[
        Rule(id="c", match=Match(consumer="*"), per=["consumer", "model"], requests=10**9, tokens=10**12),
        Rule(id="g", match=Match(group=["team-*"]), requests=10**9),
    ]), policy_ctx)
    ex = make_exchange(consumer="alice", group="team-a", prompt=500, max_tokens=200)

    def one():
        ex.scratch = None
        ex.response_headers = []
        rl.request(ex)
        ex.prompt_tokens, ex.completion_tokens, ex.status = 480, 150, 200
        rl.complete(ex)
    benchmark(one)


def test_ratelimit_typical(benchmark, policy_ctx, make_exchange):
    # The usual config: one request rule and one token rule per consumer, headers on; the whole lifecycle.
    from fastgw.policies.ratelimit.policy import Config, RateLimit, Rule
    rl = RateLimit(Config(id="t", rules=[
        Rule(id="rpm", per=["consumer"], requests=10**9),
        Rule(id="tpm", per=["consumer"], tokens=10**12),
    ]), policy_ctx)
    ex = make_exchange(consumer="alice", group="team-a", prompt=500, max_tokens=200)

    def one():
        ex.scratch = None
        ex.response_headers = []
        rl.request(ex)
        ex.prompt_tokens, ex.completion_tokens, ex.status = 480, 150, 200
        rl.complete(ex)
    benchmark(one)
    assert len(ex.response_headers) == 1 and ex.response_headers[0].count(b"\r\n") == 6


def test_auth_access(benchmark, policy_ctx, make_exchange):
    from fastgw.policies.auth.policy import Config, Consumer, KeyAuth, hash_key
    auth = KeyAuth(Config(consumers=[Consumer(f"c{i}", [hash_key(f"sk-{i}")]) for i in range(1000)]), policy_ctx)
    ex = make_exchange(headers={"Authorization": "Bearer sk-500"})

    def one():
        ex.scratch = None
        auth.access(ex)
        auth.request(ex)
    benchmark(one)


def test_auth_access_first_time(benchmark, policy_ctx, make_exchange):
    # A key not seen before (or after the cache of good keys was emptied): SHA-256, lookup, compare_digest.
    from fastgw.policies.auth.policy import Config, Consumer, KeyAuth, hash_key
    auth = KeyAuth(Config(consumers=[Consumer(f"c{i}", [hash_key(f"sk-{i}")]) for i in range(1000)]), policy_ctx)
    ex = make_exchange(headers={"Authorization": "Bearer sk-500"})

    def one():
        ex.scratch = None
        auth._seen.clear()
        auth.access(ex)
        auth.request(ex)
    benchmark(one)
