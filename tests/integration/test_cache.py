"""The exact response cache through `fastgw serve`, with the openai SDK as the client and the built-in mock upstream
(issue 14 items 1-3 and 5): scopes, parameters, streams stored only when complete, the memory store shared by
workers, Redis shared by instances and a Redis outage turned into misses."""
from __future__ import annotations

import httpx
import openai

from fastgw.policies.auth.policy import hash_key
from tests.integration.conftest import model_config, wait_for

KEYS = {"alice": "sk-alice-cache-key", "bob": "sk-bob-cache-key", "carol": "sk-carol-cache-key"}
GROUPS = {"alice": "team", "bob": "team", "carol": "other"}
MSGS = [{"role": "user", "content": "Tell me about caches"}]


def gateway(start_gateway, tmp_path, mock, cache: str = "", workers: int = 1, rate_limit: str = ""):
    d = tmp_path / "policies"
    d.mkdir(exist_ok=True)
    consumers = "".join(f'[[consumers]]\nname = "{n}"\ngroup = "{GROUPS[n]}"\nkeys = ["{hash_key(k)}"]\n'
                        for n, k in KEYS.items())
    (d / "10-auth.toml").write_text('policy = "key-auth"\n' + consumers)
    if rate_limit:
        (d / "20-rate.toml").write_text('policy = "rate-limit"\n' + rate_limit)
    extra = f'policies_dir = "{d}"\n[cache]\nenabled = true\n{cache}\n'
    return start_gateway(model_config(mock.url, extra=extra, name="*"), workers=workers)


def sdk(gw, who="alice", **kw):
    return openai.OpenAI(base_url=gw.base + "/v1", api_key=KEYS[who], max_retries=0, timeout=10, **kw)


def chat(gw, who="alice", headers=None, **kw):
    """(the SDK's ChatCompletion, x-fastgw-cache)."""
    raw = sdk(gw, who).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MSGS, extra_headers=headers or {}, **kw)
    return raw.parse(), raw.headers.get("x-fastgw-cache")


def stream(gw, who="alice", headers=None, **kw):
    """(the SDK's chunks, x-fastgw-cache)."""
    with sdk(gw, who).chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=MSGS, stream=True, extra_headers=headers or {}, **kw) as r:
        return [c.model_dump() for c in r.parse()], r.headers.get("x-fastgw-cache")


def metric(gw, name: str, **labels) -> float:
    text = httpx.get(gw.base + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()))


def test_same_consumer_hits_other_consumer_and_changed_parameter_miss(tmp_path, mock, start_gateway):
    gw = gateway(start_gateway, tmp_path, mock)
    first, h1 = chat(gw)
    sent = mock.stats.requests
    again, h2 = chat(gw)
    assert (h1, h2) == ("miss", "hit")
    assert again.model_dump() == first.model_dump()          # the SDK sees the same object: id and created too
    assert mock.stats.requests == sent                        # a hit never reaches the upstream
    _, h3 = chat(gw, "bob")                                   # another consumer: its own entry (scope consumer)
    assert h3 == "miss" and mock.stats.requests == sent + 1
    _, h4 = chat(gw, max_tokens=17)                           # a parameter that changes the answer
    assert h4 == "miss" and mock.stats.requests == sent + 2
    _, h5 = chat(gw, user="someone-else")                     # `user` does not change the answer
    assert h5 == "hit"
    _, h6 = chat(gw, temperature=0.7)                         # sampling asked: not cacheable by default
    assert h6 == "bypass"
    _, h7 = chat(gw, n=2)
    assert h7 == "bypass"
    wait_for(lambda: len(gw.access_lines()) >= 7, what="seven access-log lines")
    caches = [line["cache"] for line in gw.access_lines()]
    assert caches == ["miss", "hit", "miss", "miss", "hit", "bypass", "bypass"]
    hit_line = gw.access_lines()[1]
    assert hit_line["status"] == 200 and hit_line["prompt_tokens"] == 0 and hit_line["attempts"] == 0
    assert metric(gw, "fastgw_cache_lookups_total", result="hit") == 2
    assert metric(gw, "fastgw_cache_lookups_total", result="miss") == 3
    assert metric(gw, "fastgw_cache_bytes_total", direction="served") > 0
    assert metric(gw, "fastgw_cache_bytes_total", direction="stored") > 0


def test_group_scope_and_client_cache_control(tmp_path, mock, start_gateway):
    gw = gateway(start_gateway, tmp_path, mock, cache='scope = "group"')
    first, h1 = chat(gw, "alice")
    sent = mock.stats.requests
    same_group, h2 = chat(gw, "bob")
    _, h3 = chat(gw, "carol")
    assert (h1, h2, h3) == ("miss", "hit", "miss") and same_group == first and mock.stats.requests == sent + 1
    _, h4 = chat(gw, headers={"cache-control": "no-store"})
    assert h4 == "bypass"
    # x-mock-echo-headers makes the mock answer differently (client headers are no part of the key)
    refreshed, h5 = chat(gw, headers={"cache-control": "no-cache", "x-mock-echo-headers": "1"})
    assert h5 == "refresh" and refreshed.choices[0].message.content != first.choices[0].message.content
    after, h6 = chat(gw, "bob")
    assert h6 == "hit" and after == refreshed                   # the refresh replaced the entry


def test_streams_replay_identically_and_serve_json_clients(tmp_path, mock, start_gateway):
    gw = gateway(start_gateway, tmp_path, mock)
    chunks, h1 = stream(gw)
    replay, h2 = stream(gw)
    assert (h1, h2) == ("miss", "hit")
    assert replay == chunks and all(c["usage"] is None for c in chunks)   # the usage chunk the gateway asked for
    with_usage, h3 = stream(gw, stream_options={"include_usage": True})   # stays hidden unless asked
    assert h3 == "hit" and with_usage[:-1] == chunks and with_usage[-1]["usage"]["total_tokens"] > 0
    whole, h4 = chat(gw)                                      # a JSON client from the stored stream
    assert h4 == "hit" and whole.id == chunks[0]["id"] and whole.created == chunks[0]["created"]
    assert whole.choices[0].message.content == "".join(c["choices"][0]["delta"].get("content") or ""
                                                        for c in chunks if c["choices"])
    assert whole.usage.total_tokens == with_usage[-1]["usage"]["total_tokens"]


def test_json_entry_serves_a_stream_client(tmp_path, mock, start_gateway):
    gw = gateway(start_gateway, tmp_path, mock)
    whole, h1 = chat(gw)
    chunks, h2 = stream(gw, stream_options={"include_usage": True})
    assert (h1, h2) == ("miss", "hit")
    assert {c["id"] for c in chunks} == {whole.id}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole.choices[0].message.content
    assert chunks[-1]["usage"] == whole.usage.model_dump() and chunks[-2]["choices"][0]["finish_reason"] == "stop"


def test_failed_or_cut_streams_are_never_stored(tmp_path, mock, start_gateway):
    gw = gateway(start_gateway, tmp_path, mock)
    try:
        stream(gw, headers={"x-mock-reset-after": "3"})       # the upstream dies mid-stream
        raise AssertionError("a cut stream must not end cleanly")
    except (httpx.HTTPError, openai.APIError):
        pass
    try:
        chat(gw, headers={"x-mock-status": "500"})
    except openai.InternalServerError:
        pass
    _, h = stream(gw)
    assert h == "miss"                                        # neither the cut stream nor the 500 was stored
    _, h = stream(gw)
    assert h == "hit"


def test_two_workers_share_the_memory_store(tmp_path, mock, start_gateway):
    gw = gateway(start_gateway, tmp_path, mock, workers=2)
    first, _ = chat(gw)
    sent = mock.stats.requests
    seen = set()
    for _ in range(20):                                       # new connections: the kernel spreads them over workers
        r = httpx.post(gw.base + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": MSGS},
                       headers={"authorization": f"Bearer {KEYS['alice']}", "connection": "close"}, timeout=10)
        assert r.headers["x-fastgw-cache"] == "hit" and r.json()["id"] == first.id
        seen.add(r.headers["x-request-id"].split("-")[2])     # req-<start>-<worker>-<n>
    assert mock.stats.requests == sent
    assert len(seen) == 2, f"all requests landed on worker(s) {seen}"


def test_a_hit_costs_no_tokens_but_counts_as_a_request(tmp_path, mock, start_gateway):
    rules = ('[[rules]]\nper = ["consumer"]\nwindow = "day"\nrequests = 3\n'
             '[[rules]]\nper = ["consumer"]\nwindow = "day"\ntokens = 2000\n')
    gw = gateway(start_gateway, tmp_path, mock, rate_limit=rules)
    _, h = chat(gw, max_tokens=5)
    raw = sdk(gw).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSGS, max_tokens=5)
    assert raw.headers["x-fastgw-cache"] == "hit"
    tokens_left = int(raw.headers["x-ratelimit-remaining-tokens"])
    raw = sdk(gw).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSGS, max_tokens=5)
    # the reservation of the second hit's admission saw the first hit's tokens given back in full
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) == tokens_left
    try:
        chat(gw, max_tokens=5)                                # the fourth request: the request limit holds
        raise AssertionError("the request limit must refuse the fourth request")
    except openai.RateLimitError:
        pass


def test_redis_backend_shared_by_instances_and_outage_is_a_miss(tmp_path, mock, start_gateway, redis_server):
    cfg = f'backend = "redis"\n[cache.redis]\nurl = "{redis_server.url}"\ntimeout = 0.2\nconnect_timeout = 0.2'
    a = gateway(start_gateway, tmp_path, mock, cache=cfg)
    b = gateway(start_gateway, tmp_path, mock, cache=cfg)
    first, h1 = chat(a)
    assert h1 == "miss"
    got = wait_for(lambda: chat(b)[0] if chat(b)[1] == "hit" else None, what="instance b hits a's entry")
    assert got.model_dump() == first.model_dump()
    chunks, _ = stream(a, max_tokens=9)
    replay = wait_for(lambda: (lambda r: r[0] if r[1] == "hit" else None)(stream(b, max_tokens=9)),
                      what="b replays a's stream")
    assert replay == chunks
    redis_server.kill()                                       # down: every lookup is a miss, never an error
    _, h = chat(a)
    assert h == "miss"
    _, h = chat(b, max_tokens=3)
    assert h == "miss"
    redis_server.restart()                                    # back, empty: misses until answers are stored again
    assert chat(a, max_tokens=4)[1] == "miss"
    wait_for(lambda: chat(a, max_tokens=4)[1] == "hit", what="a stores and hits again once Redis is back")
    assert chat(b, max_tokens=4)[1] == "hit"


def test_ttl_per_model_and_a_translated_provider(tmp_path, mock, start_gateway):
    # model_ttl by the config's model name: 0 = never cached, 1 s = expires; an Anthropic deployment's answer is
    # cached as the OpenAI-shaped answer its client got, and served identically.
    root = mock.url.removesuffix("/v1")
    models = f"""
[[models]]
name = "never"
[[models.deployments]]
url = "{mock.url}"
[[models]]
name = "fast"
[[models.deployments]]
url = "{mock.url}"
[[models]]
name = "claude"
[[models.deployments]]
url = "{root}"
provider = "anthropic"
model = "claude-sonnet-4-20250514"
key_env = "ANTHROPIC_TEST_KEY"
"""
    d = tmp_path / "policies"
    d.mkdir()
    (d / "10-auth.toml").write_text('policy = "key-auth"\n' + "".join(
        f'[[consumers]]\nname = "{n}"\nkeys = ["{hash_key(k)}"]\n' for n, k in KEYS.items()))
    cfg = (f'policies_dir = "{d}"\n[cache]\nenabled = true\nmodel_ttl = {{ never = 0, fast = 1.0 }}\n'
           + models + model_config(mock.url, name="*"))
    gw = start_gateway(cfg, env={"ANTHROPIC_TEST_KEY": "sk-ant-test"})

    def ask(model):
        raw = sdk(gw).chat.completions.with_raw_response.create(model=model, messages=MSGS, max_tokens=20)
        return raw.parse(), raw.headers.get("x-fastgw-cache")

    assert [ask("never")[1] for _ in range(2)] == ["bypass", "bypass"]
    assert [ask("fast")[1], ask("fast")[1]] == ["miss", "hit"]
    assert ask("gpt-4o-mini")[1] == "miss"
    wait_for(lambda: ask("fast")[1] == "miss", timeout=5, what="the 1 s entry to expire")
    assert ask("gpt-4o-mini")[1] == "hit"                       # the default ttl (3600 s) still holds
    first, h1 = ask("claude")
    again, h2 = ask("claude")
    assert (h1, h2) == ("miss", "hit") and again.model_dump() == first.model_dump()
    assert first.choices[0].message.content
