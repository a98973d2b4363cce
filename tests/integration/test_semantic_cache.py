"""The semantic cache through `fastgw serve`, with the openai SDK as the client and two built-in mocks as upstreams
(one answers chat, the other embeds prompts: its vectors are hashed bags of words, so paraphrases are close):
a paraphrase hits with its similarity reported, an unrelated prompt and another consumer miss, entries reach every
worker, the cache's controls apply, and an embeddings deployment that is down means misses, never errors."""
from __future__ import annotations

import re
import socket

import httpx
import numpy as np
import openai
import orjson
import pytest

from fastgw.devtools.mock.openai import EMBEDDING_DIM, _embedding, _words
from fastgw.policies.auth.policy import hash_key
from tests.conftest import free_port
from tests.integration.conftest import MockThread, wait_for

KEYS = {"alice": "sk-alice-semantic", "bob": "sk-bob-semantic"}
ASKED = "What is the capital of France?"


@pytest.fixture
def embedder():
    m = MockThread()
    yield m
    m.stop()


def gateway(start_gateway, tmp_path, mock, embeddings_url: str, semantic: str = "", workers: int = 1,
            cache: str = ""):
    d = tmp_path / "policies"
    d.mkdir(exist_ok=True)
    consumers = "".join(f'[[consumers]]\nname = "{n}"\nkeys = ["{hash_key(k)}"]\n' for n, k in KEYS.items())
    (d / "10-auth.toml").write_text('policy = "key-auth"\n' + consumers)
    config = f"""policies_dir = "{d}"
[cache]
enabled = true
{cache}
[cache.semantic]
models = ["gpt-4o-mini"]
embeddings_model = "embedder"
threshold = 0.8
{semantic}
[[models]]
name = "gpt-4o-mini"
[[models.deployments]]
url = "{mock.url}"
[[models]]
name = "embedder"
[[models.deployments]]
url = "{embeddings_url}"
model = "text-embedding-3-small"
"""
    return start_gateway(config, workers=workers)


def chat(gw, text: str, who="alice", headers=None, **kw):
    """(the SDK's ChatCompletion, the response's headers). The mock's answer echoes the request's headers, so
    `x-asked` tells which request an answer was made for (headers are no part of any cache key)."""
    c = openai.OpenAI(base_url=gw.base + "/v1", api_key=KEYS[who], max_retries=0, timeout=10)
    raw = c.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": text}],
        extra_headers={"x-mock-echo-headers": "1", "x-asked": text, **(headers or {})}, **kw)
    return raw.parse(), raw.headers


def made_for(answer) -> str:
    return orjson.loads(answer.choices[0].message.content)["x-asked"]


def stream(gw, text: str, who="alice"):
    c = openai.OpenAI(base_url=gw.base + "/v1", api_key=KEYS[who], max_retries=0, timeout=10)
    with c.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": text}], stream=True) as r:
        return [ch.model_dump() for ch in r.parse()], r.headers


def similarity(a: str, b: str) -> float:
    """What the gateway should find: the cosine of the mock's vectors of the two prompts as the gateway embeds
    them (fastgw.cache.semantic_text: "role: text")."""
    va, vb = (np.array(_embedding(_words(f"user: {t}"), EMBEDDING_DIM, "float")) for t in (a, b))
    return float(va @ vb / np.linalg.norm(va) / np.linalg.norm(vb))


def metric(gw, name: str, **labels) -> float:
    text = httpx.get(gw.base + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()))


def test_paraphrase_hits_with_its_similarity_unrelated_and_other_consumer_miss(tmp_path, mock, embedder,
                                                                              start_gateway):
    gw = gateway(start_gateway, tmp_path, mock, embedder.url)
    first, h1 = chat(gw, ASKED)
    assert h1["x-fastgw-cache"] == "miss" and "x-fastgw-cache-similarity" not in h1
    sent, embedded = mock.stats.requests, embedder.stats.requests
    assert embedded == 1                                     # the gateway's own embeddings request

    paraphrase = "what's the capital of france"
    near = "What is the capital city of France?"
    assert similarity(ASKED, paraphrase) > 0.99 and 0.8 < similarity(ASKED, near) < 0.9
    for text in (paraphrase, near):
        again, h = chat(gw, text)
        assert h["x-fastgw-cache"] == "hit"
        assert float(h["x-fastgw-cache-similarity"]) == pytest.approx(similarity(ASKED, text), abs=1e-3)
        assert again.model_dump() == first.model_dump()     # the stored answer: same id, created, content
        assert made_for(again) == ASKED
    chunks, hs = stream(gw, paraphrase)                      # a stream client is told the stored answer
    assert hs["x-fastgw-cache"] == "hit" and {c["id"] for c in chunks} == {first.id}
    assert mock.stats.requests == sent                       # no hit reached the chat upstream

    unrelated, hu = chat(gw, "Tell me a joke about cats")
    assert hu["x-fastgw-cache"] == "miss" and made_for(unrelated) == "Tell me a joke about cats"
    other, hb = chat(gw, paraphrase, who="bob")              # the default scope: bob has his own entries
    assert hb["x-fastgw-cache"] == "miss" and made_for(other) == paraphrase
    longer, hm = chat(gw, paraphrase, max_tokens=9)          # other parameters: another question
    assert hm["x-fastgw-cache"] == "miss" and made_for(longer) == paraphrase
    assert mock.stats.requests == sent + 3

    wait_for(lambda: len(gw.access_lines()) >= 7, what="seven access-log lines")
    lines = gw.access_lines()
    assert [ln["cache"] for ln in lines] == ["miss", "hit", "hit", "hit", "miss", "miss", "miss"]
    sims = [ln["cache_similarity"] for ln in lines]
    assert sims[0] is None and sims[4:] == [None] * 3
    assert sims[2] == pytest.approx(similarity(ASKED, near), abs=1e-4)
    assert lines[1]["prompt_tokens"] == 0 and lines[1]["attempts"] == 0
    assert metric(gw, "fastgw_cache_lookups_total", result="semantic_hit") == 3
    assert metric(gw, "fastgw_cache_lookups_total", result="miss") == 4


def test_exact_hits_and_controls_need_no_embedding(tmp_path, mock, embedder, start_gateway):
    gw = gateway(start_gateway, tmp_path, mock, embedder.url)
    first, _ = chat(gw, ASKED)
    _, h = chat(gw, ASKED)
    assert h["x-fastgw-cache"] == "hit" and "x-fastgw-cache-similarity" not in h
    _, h = chat(gw, "what's the capital of france", headers={"cache-control": "no-store"})
    assert h["x-fastgw-cache"] == "bypass"
    assert embedder.stats.requests == 1                      # the exact hit and the bypass embedded nothing
    # no-cache: the answer replaces the entry and its prompt is indexed (embedded after the answer)
    fresh, h = chat(gw, "capital of France?", headers={"cache-control": "no-cache"})
    assert h["x-fastgw-cache"] == "refresh" and made_for(fresh) == "capital of France?"
    wait_for(lambda: embedder.stats.requests == 2, what="the refreshed prompt's embedding")
    again, h = chat(gw, "the capital of france")
    assert h["x-fastgw-cache"] == "hit" and made_for(again) in (ASKED, "capital of France?")


def test_embeddings_down_means_misses_not_errors(tmp_path, mock, start_gateway):
    with socket.socket() as closed:                          # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{closed.getsockname()[1]}/v1"
        gw = gateway(start_gateway, tmp_path, mock, down)
        first, h1 = chat(gw, ASKED)
        second, h2 = chat(gw, "what's the capital of france")
        assert (h1["x-fastgw-cache"], h2["x-fastgw-cache"]) == ("miss", "miss")
        assert made_for(second) == "what's the capital of france"
        _, h3 = chat(gw, ASKED)                              # the exact cache works without embeddings
        assert h3["x-fastgw-cache"] == "hit"
    assert metric(gw, "fastgw_upstream_errors_total", upstream="cache-embeddings") >= 1


def test_embeddings_that_never_answer_mean_misses(tmp_path, mock, start_gateway):
    with socket.socket() as silent:                          # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        gw = gateway(start_gateway, tmp_path, mock, url, semantic="timeout = 0.2\nretry_interval = 0")
        for text in (ASKED, "what's the capital of france"):
            answer, h = chat(gw, text)
            assert h["x-fastgw-cache"] == "miss" and answer.choices[0].message.content
    assert metric(gw, "fastgw_upstream_errors_total", upstream="cache-embeddings", kind="timeout") == 2


def test_entries_reach_every_worker(tmp_path, mock, embedder, start_gateway):
    gw = gateway(start_gateway, tmp_path, mock, embedder.url, workers=2)
    _, h = chat(gw, ASKED)
    stored_by = worker_of(h)
    # New connections spread over the workers: go on until the other worker answers a paraphrase.
    for _ in range(60):
        _, h = chat(gw, "what's the capital of france")
        assert h["x-fastgw-cache"] == "hit"
        if worker_of(h) != stored_by:
            break
    else:
        raise AssertionError("the other worker never answered")


def test_redis_backend(tmp_path, mock, embedder, start_gateway, redis_server):
    cfg = f'backend = "redis"\n[cache.redis]\nurl = "{redis_server.url}"\ntimeout = 0.5\nconnect_timeout = 0.5'
    gw = gateway(start_gateway, tmp_path, mock, embedder.url, cache=cfg)
    _, h1 = chat(gw, ASKED)
    wait_for(lambda: chat(gw, ASKED)[1]["x-fastgw-cache"] == "hit", what="the entry in Redis")  # stored async
    again, h2 = chat(gw, "what's the capital of france")
    assert (h1["x-fastgw-cache"], h2["x-fastgw-cache"]) == ("miss", "hit") and made_for(again) == ASKED
    redis_server.kill()                                      # down: the entry the index names cannot be read
    answer, h3 = chat(gw, "the capital of France")
    assert h3["x-fastgw-cache"] == "miss" and made_for(answer) == "the capital of France"


def worker_of(headers) -> str:
    return re.fullmatch(r"req-[0-9a-f]+-(\d+)-\d+", headers["x-request-id"]).group(1)


def test_config_is_checked(tmp_path):
    import subprocess
    import sys
    bad = tmp_path / "bad.toml"
    bad.write_text(f"""[cache]
enabled = true
[cache.semantic]
models = ["gpt-4o-mini"]
embeddings_model = "nope"
[[models]]
name = "gpt-4o-mini"
[[models.deployments]]
url = "http://127.0.0.1:{free_port()}/v1"
""")
    r = subprocess.run([sys.executable, "-m", "fastgw", "check-config", str(bad)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "cache.semantic.embeddings_model" in (r.stdout + r.stderr)
