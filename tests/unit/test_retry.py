"""fastgw.routing.retry: the backoff, the upstream's retry-after, which error answers name a fallback list
(against recorded provider error bodies), and the config rules of [models.retry], breakers, health checks and
fallback chains (refused with the field named)."""
import email.utils
import os
import time

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastgw.providers.wire.anthropic_chat import messages_error_to_chat
from fastgw.routing.retry import RetryPolicy, fallback_reason, retry_after_seconds
from fastgw.runtime import config

WIRE = os.path.join(os.path.dirname(__file__), "..", "data", "wire")


def wire(*path) -> bytes:
    with open(os.path.join(WIRE, *path), "rb") as f:
        return f.read()


@given(retry=st.integers(1, 40), base=st.floats(0, 10), cap=st.floats(0, 60))
def test_the_backoff_is_full_jitter_under_the_exponential_cap(retry, base, cap):
    p = RetryPolicy(3, base, cap, 5.0, 0.0)
    d = p.backoff_delay(retry)
    assert 0.0 <= d <= min(cap, base * 2 ** (retry - 1)) + 1e-12


def test_the_backoff_is_random_and_grows():
    p = RetryPolicy(5, 0.1, 10.0, 5.0, 0.0)
    first = [p.backoff_delay(1) for _ in range(200)]
    third = [p.backoff_delay(3) for _ in range(200)]
    assert max(first) <= 0.1 and len(set(first)) > 150        # jittered, not a constant
    assert max(third) > 0.2 and max(third) <= 0.4


def test_retry_after_headers():
    assert retry_after_seconds(b"1500", b"30") == 1.5          # retry-after-ms wins (OpenAI, Azure send both)
    assert retry_after_seconds(None, b"2") == 2.0
    assert retry_after_seconds(None, b"0.25") == 0.25
    assert retry_after_seconds(b"soon", b"3") == 3.0
    assert retry_after_seconds(None, None) == -1.0
    assert retry_after_seconds(None, b"-4") == -1.0 and retry_after_seconds(None, b"nan") == -1.0
    assert retry_after_seconds(None, b"whenever") == -1.0
    date = email.utils.formatdate(time.time() + 20, usegmt=True).encode()   # the HTTP-date form
    assert 18 <= retry_after_seconds(None, date) <= 20


def test_error_answers_that_name_a_fallback_list_recorded_samples():
    # OpenAI's context_length_exceeded (tests/data/wire/openai/README.md), Azure's content filter refusal.
    assert fallback_reason(wire("openai", "error_context_length_exceeded.json")) == "context_window"
    assert fallback_reason(wire("azure", "content_filter_error.json")) == "content_policy"
    # Other 400s and a 500 name none.
    assert fallback_reason(wire("openai", "error_string_above_max_length.json")) is None
    assert fallback_reason(wire("openai", "error_server_500.json")) is None
    # An Anthropic 400, as the anthropic provider translates it for an OpenAI client: no code, no fallback.
    status, err = messages_error_to_chat(400, wire("anthropic", "error_invalid_request_400.json"))
    assert status == 400 and fallback_reason(orjson.dumps(err)) is None
    # DALL-E's safety refusal uses content_policy_violation.
    assert fallback_reason(b'{"error":{"code":"content_policy_violation","message":"x","type":"invalid_request_error"}}'
                           ) == "content_policy"
    for junk in (b"", b"not json", b"[]", b'{"error":"text"}', b'{"error":{"code":["x"]}}', b'{"error":{"code":7}}'):
        assert fallback_reason(junk) is None


def test_the_fallback_lists_of_a_policy():
    p = RetryPolicy()
    assert (p.attempts, p.holds_400, p.fallbacks) == (1, False, [])
    p.set_fallbacks(["x"], ["big"], [])
    assert p.holds_400 and p.fallback_lists("context_window") == ["big"] and p.fallback_lists("content_policy") == []


MODELS = """
[[models]]
name = "a"
{a}
[[models.deployments]]
url = "http://h1/v1"
[[models]]
name = "b"
{b}
[[models.deployments]]
url = "http://h2/v1"
[[models]]
name = "c"
{c}
[[models.deployments]]
url = "http://h3/v1"
"""


def parse(a="", b="", c=""):
    return config.parse(MODELS.format(a=a, b=b, c=c), "f.toml")


def refused(**kw) -> str:
    with pytest.raises(config.ConfigError) as e:
        parse(**kw)
    return str(e.value)


def test_a_config_with_retries_breakers_health_and_fallbacks():
    cfg = parse(a='fallbacks = ["b", "c"]\ncontext_window_fallbacks = ["c"]\n'
                  '[models.retry]\nattempts = 3\nbackoff_ms = 50\ndeadline_ms = 8000\n'
                  '[models.breaker]\nconsecutive_failures = 3\ncooldown_s = 20\n',
                b='health_check = { path = "/health", interval_s = 5 }',
                c='content_policy_fallbacks = ["a"]')
    a, b, c = cfg.models
    assert (a.retry.attempts, a.retry.backoff_ms, a.retry.deadline_ms, a.fallbacks) == (3, 50, 8000, ["b", "c"])
    assert (a.breaker.consecutive_failures, a.breaker.cooldown_s, a.breaker.half_open_probes) == (3, 20, 1)
    assert (b.retry.attempts, b.breaker, b.health_check.path, b.health_check.timeout_s) == (1, None, "/health", 5.0)
    assert c.content_policy_fallbacks == ["a"]     # a -> c is context_window: another list, no cycle


@pytest.mark.parametrize("kw, field", [
    (dict(a='fallbacks = ["b"]', b='fallbacks = ["c"]', c='fallbacks = ["a"]'),
     "models[0] ('a').fallbacks: a fallback cycle: a -> b -> c -> a"),
    (dict(a='context_window_fallbacks = ["b"]', b='context_window_fallbacks = ["a"]'),
     "models[0] ('a').context_window_fallbacks: a fallback cycle: a -> b -> a"),
    (dict(a='fallbacks = ["nope"]'), "models[0] ('a').fallbacks: 'nope' is not a configured model name"),
    (dict(b='content_policy_fallbacks = ["*"]'), "models[1] ('b').content_policy_fallbacks: '*' is not a configured"),
    (dict(a='fallbacks = ["a"]'), "models[0] ('a').fallbacks: 'a' is this model itself"),
    (dict(a='fallbacks = ["b", "b"]'), "models[0] ('a').fallbacks: a model is named twice"),
    (dict(a="[models.retry]\nattempts = 0"), "models[0] ('a').retry.attempts: must be >= 1"),
    (dict(a="[models.retry]\nbackoff_ms = -1"), "models[0] ('a').retry.backoff_ms: must be >= 0"),
    (dict(a="[models.retry]\ndeadline_ms = -5"), "models[0] ('a').retry.deadline_ms: must be >= 0"),
    (dict(a="[models.retry]\nretries = 3"), "Object contains unknown field `retries` - at `$.models[0].retry`"),
    (dict(a="[models.breaker]\nerror_rate = 1.5"), "models[0] ('a').breaker.error_rate: must be between 0 and 1"),
    (dict(a="[models.breaker]\nconsecutive_failures = 0"), "models[0] ('a').breaker: set consecutive_failures or"),
    (dict(a="[models.breaker]\ncooldown_s = 0"), "models[0] ('a').breaker.cooldown_s: must be > 0"),
    (dict(a="[models.breaker]\nhalf_open_probes = 0"), "models[0] ('a').breaker.half_open_probes: must be >= 1"),
    (dict(a="[models.breaker]\nwindow_s = -1"), "models[0] ('a').breaker.window_s: must be > 0"),
    (dict(c='health_check = { path = "v1/models" }'), "models[2] ('c').health_check.path: expected an absolute"),
    (dict(c='health_check = { interval_s = 0 }'), "models[2] ('c').health_check.interval_s: must be > 0"),
])
def test_bad_resilience_config_is_refused_with_the_field_named(kw, field):
    msg = refused(**kw)
    assert msg.startswith("f.toml: ") and field in msg
