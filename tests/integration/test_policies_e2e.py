"""Policies through the running gateway: keys, exact limits across workers and instances, budgets, usage."""
from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from fastgw.policies.auth.policy import hash_key
from tests.integration.conftest import model_config, wait_for, wait_for_value

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}]}
KEYS = {"alice": "sk-alice-test-key", "bob": "sk-bob-test-key"}


def write_policies(tmp_path, rate_limit: str = "", budget: str = "") -> str:
    d = tmp_path / "policies"
    d.mkdir(exist_ok=True)
    consumers = "".join(
        f'[[consumers]]\nname = "{name}"\ngroup = "team"\nkeys = ["{hash_key(key)}"]\n' for name, key in KEYS.items())
    (d / "10-auth.toml").write_text(
        'policy = "key-auth"\n[[groups]]\nname = "team"\nmodels = ["gpt-4o-mini"]\n' + consumers)
    if rate_limit:
        (d / "20-rate.toml").write_text('policy = "rate-limit"\n' + rate_limit)
    if budget:
        (d / "30-budget.toml").write_text('policy = "budget"\n' + budget)
    return str(d)


def gateway(start_gateway, tmp_path, mock, workers=1, **kw):
    pdir = write_policies(tmp_path, **kw)
    # "*": every model routes, so the model checks of the policies are what refuses.
    return start_gateway(model_config(mock.url, extra=f'policies_dir = "{pdir}"\n', name="*"), workers=workers)


def sdk(gw, consumer="alice", **kw):
    return openai.OpenAI(base_url=gw.base + "/v1", api_key=KEYS[consumer], max_retries=0, timeout=10, **kw)


def metric(gw, name: str, **labels) -> float:
    text = httpx.get(gw.base + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_keys_and_models(tmp_path, mock, start_gateway):
    gw = gateway(start_gateway, tmp_path, mock)
    assert sdk(gw).chat.completions.create(**CHAT).choices[0].message.content
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=gw.base + "/v1", api_key="sk-wrong", max_retries=0).chat.completions.create(**CHAT)
    assert e.value.body["code"] == "invalid_api_key"
    r = httpx.post(gw.base + "/v1/chat/completions", json=CHAT)          # no key at all
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(gw.base + "/v1/chat/completions", json=CHAT, headers={"api-key": KEYS["bob"]})
    assert r.status_code == 200                                          # Azure-style header works too
    with pytest.raises(openai.PermissionDeniedError) as e:
        sdk(gw).chat.completions.create(**{**CHAT, "model": "gpt-4o"})
    assert e.value.status_code == 403
    wait_for(lambda: len(gw.access_lines()) == 5, what="the five requests in the access log")
    text = gw.out_path.read_text() + gw.ops_log() + httpx.get(gw.base + "/metrics").text
    assert not any(k in text for k in KEYS.values())                     # keys never logged
    assert '"consumer":"alice"' in gw.out_path.read_text()


def _hammer(gw, n: int, stream=False) -> list[int]:
    statuses = []
    lock = threading.Lock()

    def one(i):
        r = httpx.post(gw.base + "/v1/chat/completions", json={**CHAT, "stream": stream},
                       headers={"authorization": f"Bearer {KEYS['alice']}", "connection": "close"}, timeout=15)
        with lock:
            statuses.append((r.status_code, r.headers.get("retry-after"), r.json()["error"]["code"]
                             if r.status_code != 200 else None))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


# A day window: the bucket refills 20 per day, so nothing refills during the test and "exactly 20" is exact.
RULE_20_PER_DAY = """
[[rules]]
id = "alice-requests"
match = { consumer = "alice" }
window = "day"
requests = 20
"""


def test_request_limit_is_exact_across_two_workers(tmp_path, mock, start_gateway):
    gw = gateway(start_gateway, tmp_path, mock, workers=2, rate_limit='backend = "local"\n' + RULE_20_PER_DAY)
    out = _hammer(gw, 60)
    ok = [s for s in out if s[0] == 200]
    refused = [s for s in out if s[0] == 429]
    assert len(ok) == 20 and len(refused) == 40
    assert all(s[1] is not None and int(s[1]) >= 1 and s[2] == "rate_limit_exceeded" for s in refused)
    r = httpx.post(gw.base + "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {KEYS['bob']}"})
    assert r.status_code == 200                                          # bob has his own quota


def test_request_limit_is_exact_across_two_instances_sharing_redis(tmp_path, mock, start_gateway, redis_server):
    # Generous Redis timeouts: this checks exactness, not latency, on a loaded 2-core machine.
    rl = (f'backend = "redis"\nfail_open = false\n[redis]\nurl = "{redis_server.url}"\ntimeout = 2.0\n'
          f'connect_timeout = 2.0\n' + RULE_20_PER_DAY)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = gateway(start_gateway, tmp_path / "a", mock, rate_limit=rl)
    b = gateway(start_gateway, tmp_path / "b", mock, rate_limit=rl)
    results = []
    t = [threading.Thread(target=lambda g=g: results.extend(_hammer(g, 30))) for g in (a, b)]
    for x in t:
        x.start()
    for x in t:
        x.join()
    assert sum(1 for s in results if s[0] == 200) == 20, results
    assert sum(1 for s in results if s[0] == 429) == 40, results



def test_refusals_carry_the_limits_and_a_too_large_request_is_not_retried(tmp_path, mock, start_gateway):
    rule = '[[rules]]\nid = "small"\nmatch = { consumer = "alice" }\nwindow = "day"\nrequests = 2\ntokens = 5000\n'
    gw = gateway(start_gateway, tmp_path, mock, rate_limit=rule)
    attempts = []
    retrying = openai.OpenAI(base_url=gw.base + "/v1", api_key=KEYS["alice"], max_retries=2, timeout=10,
                             http_client=httpx.Client(event_hooks={"request": [attempts.append]}))
    # Larger than the whole bucket: the SDK (which retries 429s by default) must be told not to retry.
    with pytest.raises(openai.RateLimitError) as e:
        retrying.chat.completions.create(**CHAT, max_tokens=6000)
    assert len(attempts) == 1
    h = e.value.response.headers
    assert "Request too large" in e.value.body["message"] and "retry-after" not in h
    assert h["x-should-retry"] == "false" and h["x-ratelimit-limit-tokens"] == "5000"
    for _ in range(2):
        sdk(gw).chat.completions.create(**CHAT)
    r = httpx.post(gw.base + "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {KEYS['alice']}"})
    assert r.status_code == 429 and r.json()["error"]["message"].startswith("Rate limit reached")
    assert int(r.headers["retry-after"]) >= 1 and r.headers.get("x-should-retry") is None
    assert r.headers["x-ratelimit-limit-requests"] == "2" and r.headers["x-ratelimit-remaining-requests"] == "0"
    assert r.headers["x-ratelimit-reset-requests"].endswith("s")

def test_redis_down_fail_open_and_fail_closed(tmp_path, mock, start_gateway, redis_server):
    def rl(fail_open):
        return (f'backend = "redis"\nfail_open = {str(fail_open).lower()}\n[redis]\nurl = "{redis_server.url}"\n'
                + RULE_20_PER_DAY)

    (tmp_path / "open").mkdir()
    (tmp_path / "closed").mkdir()
    gw_open = gateway(start_gateway, tmp_path / "open", mock, rate_limit=rl(True))
    gw_closed = gateway(start_gateway, tmp_path / "closed", mock, rate_limit=rl(False))
    assert sdk(gw_open).chat.completions.create(**CHAT)
    redis_server.kill()
    t0 = time.monotonic()
    assert sdk(gw_open).chat.completions.create(**CHAT).choices      # admitted without Redis
    with pytest.raises(openai.APIStatusError) as e:
        sdk(gw_closed).chat.completions.create(**CHAT)
    assert e.value.status_code == 503
    assert time.monotonic() - t0 < 3                                   # nothing hangs on a dead Redis


def test_token_usage_is_accounted_for_streams_with_and_without_include_usage(tmp_path, mock, start_gateway):
    rule = """
[[rules]]
id = "alice-tokens"
match = { consumer = "alice" }
window = "day"
tokens = 1000000
"""
    gw = gateway(start_gateway, tmp_path, mock, rate_limit=rule)
    c = sdk(gw)
    # Without include_usage: the gateway asks for it and hides the extra chunk from this client.
    chunks = list(c.chat.completions.create(**CHAT, stream=True))
    assert all(ch.usage is None for ch in chunks) and chunks[-1].choices
    # With include_usage: the client gets its usage chunk.
    chunks = list(c.chat.completions.create(**CHAT, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 14
    # No usage from the upstream at all: the streamed text is counted exactly.
    from fastgw.tokens.exact import count_text

    text = "".join(ch.choices[0].delta.content or "" for ch in sdk(gw, default_headers={"x-mock-no-usage": "1"})
                   .chat.completions.create(**CHAT, stream=True) if ch.choices)
    exact = count_text(text, "o200k_base")
    wait_for_value(lambda: metric(gw, "fastgw_completion_tokens_total", consumer="alice"), 14 + 14 + exact,
                   what="alice's fastgw_completion_tokens_total")
    r = httpx.post(gw.base + "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {KEYS['alice']}"})
    remaining = int(r.headers["x-ratelimit-remaining-tokens"])
    assert remaining < 1000000 - (14 + 14 + exact)                     # what streamed was charged
    assert r.headers["x-ratelimit-limit-tokens"] == "1000000"
    # An upstream error still carries the limits (set at admission), and its whole reservation comes back:
    # the next, identical request sees what the failed one saw (plus a little refill), not that much less.
    auth = {"authorization": f"Bearer {KEYS['alice']}"}
    r = httpx.post(gw.base + "/v1/chat/completions", json=CHAT, headers={**auth, "x-mock-status": "500"})
    assert r.status_code == 500 and r.json()["error"]["message"]
    after_error = int(r.headers["x-ratelimit-remaining-tokens"])
    # No wait needed: the worker runs the complete hooks (the refund) before it reads the next request.
    r = httpx.post(gw.base + "/v1/chat/completions", json=CHAT, headers=auth)
    assert 0 <= int(r.headers["x-ratelimit-remaining-tokens"]) - after_error < 50


def test_budget_stops_spend_at_the_limit(tmp_path, mock, start_gateway):
    # gpt-4o-mini at $1000 per million tokens each way: a ~30-token request costs a few cents.
    budget = """
backend = "local"
[[budgets]]
consumer = "alice"
usd = 0.5
period = "day"
[prices."gpt-4o-mini"]
input = 1000.0
output = 1000.0
"""
    gw = gateway(start_gateway, tmp_path, mock, budget=budget)
    c = sdk(gw)
    ok = refused = 0
    for _ in range(40):
        try:
            c.chat.completions.create(**CHAT)
            ok += 1
        except openai.RateLimitError as e:
            assert e.body["code"] == "insufficient_quota"
            refused += 1
    assert ok > 0 and refused > 0
    # Wait for the snapshot that holds all 40 requests: the cost in it is final.
    wait_for_value(lambda: metric(gw, "fastgw_requests_total", consumer="alice"), 40,
                   what="alice's fastgw_requests_total")
    spent = metric(gw, "fastgw_cost_usd_total", consumer="alice")
    per_request = spent / ok
    assert spent <= 0.5 + per_request                                  # stopped at the limit (one request of slack)
    assert sdk(gw, "bob").chat.completions.create(**CHAT)               # bob is not on alice's budget


def test_each_refusal_is_counted_once_with_bounded_labels(tmp_path, mock, start_gateway):
    """key-auth, model ACL and rate-limit refusals through the gateway: one count each in
    fastgw_rejections_total, labelled with the configured model name or "other", never the client's string."""
    gw = gateway(start_gateway, tmp_path, mock, rate_limit='[[rules]]\nrequests = 1\nwindow = "minute"\n'
                                                          'per = ["consumer"]\n')
    made_up = "client-minted-model-name-123"
    r = httpx.post(gw.base + "/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer sk-wrong"})
    assert r.status_code == 401
    with pytest.raises(openai.PermissionDeniedError):
        sdk(gw).chat.completions.create(**{**CHAT, "model": made_up})
    sdk(gw).chat.completions.create(**CHAT)
    with pytest.raises(openai.RateLimitError):
        sdk(gw).chat.completions.create(**CHAT)
    deadline = time.monotonic() + 10
    while metric(gw, "fastgw_rejections_total") < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(gw, "fastgw_rejections_total", reason="auth") == 1
    assert metric(gw, "fastgw_rejections_total", consumer="alice", model="other", reason="model_not_allowed") == 1
    assert metric(gw, "fastgw_rejections_total", consumer="alice", model="gpt-4o-mini", reason="rate_limit") == 1
    assert metric(gw, "fastgw_rejections_total") == 3
    assert made_up not in httpx.get(gw.base + "/metrics", timeout=10).text
