"""The model catalog (fastgw.routing.catalog) on a real loop against the built-in mock, which lists models in
OpenAI's, Anthropic's and Gemini's formats: merging, paging, caching, failing upstreams, the first wait and the
policies' visibility hooks."""
import asyncio
import io
import socket
import time

import orjson
import pytest
import uvloop

from fastgw.devtools.mock import anthropic as mock_anthropic, gemini as mock_gemini, openai as mock_openai
from fastgw.devtools.mock import start_mock
from fastgw.errors import GatewayError
from fastgw.observability.logs import Logger
from fastgw.proxy.exchange import Exchange
from fastgw.routing import catalog as catalog_module
from fastgw.routing.catalog import ModelCatalog
from fastgw.routing.router import Router
from fastgw.routing.upstream_models import fetch_models
from fastgw.runtime import config

ENV = {"ANT": "sk-ant", "GEM": "gm", "EMPTY": ""}
GEMINI_CHAT = [m[0] for m in mock_gemini.MODELS if "generateContent" in m[2]]


@pytest.fixture
def loop():
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    loop.close()


@pytest.fixture
def mock(loop):
    server = loop.run_until_complete(start_mock("127.0.0.1", 0))
    yield server
    server.close()


def deployment(url, **fields) -> str:
    extra = "".join(f'{k} = "{v}"\n' for k, v in fields.items())
    return f'[[models.deployments]]\nurl = "{url}"\n{extra}'


def make(loop, toml: str, cache_s=60.0, visible=()):
    log = io.StringIO()
    router = Router(config.parse(toml), env=ENV)
    return ModelCatalog(loop, router, cache_s, Logger(log), visible), log


def events(log: io.StringIO) -> list[str]:
    return [orjson.loads(line)["event"] for line in log.getvalue().splitlines()]


def listed(cat, ex=None) -> list[str]:
    return [m["id"] for m in orjson.loads(cat.answer(ex or exchange(), "/v1/models"))["data"]]


def exchange(consumer=""):
    ex = Exchange("r", "127.0.0.1", b"GET", "/v1/models", None, 0.0)
    ex.consumer = consumer
    return ex


def settle(loop, cat):
    """Run the loop until the refresh ready() started is over."""
    while cat.task is not None:
        loop.run_until_complete(asyncio.sleep(0.01))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_virtual_names_first_then_each_wildcard_upstream_once(loop, mock):
    m = f"http://127.0.0.1:{mock.port}"
    cat, _ = make(loop, f"""
[[models]]
name = "my-alias"
{deployment(m + "/v1")}
[[models]]
name = "gpt-4o"
{deployment(m + "/v1", model="gpt-4o-2024-08-06")}
[[models]]
name = "*"
{deployment(m + "/v1")}
{deployment(m, provider="anthropic", key_env="ANT")}
{deployment(m, provider="gemini", key_env="GEM")}
{deployment(m + "/v1")}
{deployment(m + "/v1", model="pinned")}
{deployment(m, provider="azure", model="dep", key_env="ANT")}
""")
    before = mock.mock_stats.requests
    assert not cat.ready()                             # the first refresh is running
    settle(loop, cat)
    assert cat.ready()
    # Asked: the two OpenAI pass-throughs, Anthropic and Gemini; not the deployment with its own model nor Azure.
    assert mock.mock_stats.requests - before == 4
    ids = listed(cat)
    assert ids == (["my-alias", "gpt-4o"] + [i for i in mock_openai.MODELS if i != "gpt-4o"]
                   + [i for i, _, _ in mock_anthropic.MODELS] + GEMINI_CHAT)
    entry = orjson.loads(cat.answer(exchange(), "/v1/models/gpt-4o"))
    assert entry == {"id": "gpt-4o", "object": "model", "created": catalog_module.CREATED, "owned_by": "fastgw"}
    assert orjson.loads(cat.answer(exchange(), "/v1/models/claude-opus-4-1"))["owned_by"] == "anthropic"
    with pytest.raises(GatewayError) as e:
        cat.answer(exchange(), "/v1/models/text-embedding-004")    # Gemini's, but not a chat model
    assert (e.value.status, e.value.code, e.value.param) == (404, "model_not_found", "model")


def test_every_page_of_a_paginated_list_is_fetched(loop, mock):
    m = f"http://127.0.0.1:{mock.port}"
    router = Router(config.parse(f'[[models]]\nname = "*"\n{deployment(m, provider="anthropic", key_env="ANT")}'
                                 f'{deployment(m, provider="gemini", key_env="GEM")}'), env=ENV)
    ant, gem = router.wildcard.deployments
    for d, want in ((ant, [i for i, _, _ in mock_anthropic.MODELS]), (gem, GEMINI_CHAT)):
        before = mock.mock_stats.requests
        got = loop.run_until_complete(fetch_models(d, page_size=1))
        assert [x["id"] for x in got] == want
        assert mock.mock_stats.requests - before >= len(want)   # one page per model
        assert loop.run_until_complete(fetch_models(d)) == got  # the same in one page


def test_stale_lists_are_refreshed_in_the_background_while_listings_answer_at_once(loop, mock):
    cat, _ = make(loop, f'[[models]]\nname = "*"\n{deployment(f"http://127.0.0.1:{mock.port}/v1")}', cache_s=0.2)
    cat.ready()
    settle(loop, cat)
    before = mock.mock_stats.requests
    assert cat.ready() and cat.task is None            # fresh: nothing fetched
    loop.run_until_complete(asyncio.sleep(0.25))
    assert cat.ready() and cat.task is not None        # stale: answered now, refreshed meanwhile
    assert listed(cat) == list(mock_openai.MODELS)
    settle(loop, cat)
    assert mock.mock_stats.requests == before + 1


def test_a_failing_upstream_contributes_nothing_and_is_logged_once_per_streak(loop, mock):
    port = closed_port()
    cat, log = make(loop, f"""
[[models]]
name = "mine"
{deployment("http://127.0.0.1:1/v1")}
[[models]]
name = "*"
{deployment(f"http://127.0.0.1:{port}/v1")}
{deployment(f"http://127.0.0.1:{mock.port}/v1")}
""", cache_s=0.05)
    for _ in range(3):                                 # three refreshes, all failing for the first upstream
        cat.ready()
        settle(loop, cat)
        assert listed(cat) == ["mine"] + list(mock_openai.MODELS)
        loop.run_until_complete(asyncio.sleep(0.06))
    assert events(log) == ["upstream model list unavailable"]
    assert f"127.0.0.1:{port}" in log.getvalue()
    revived = loop.run_until_complete(start_mock("127.0.0.1", port))
    try:
        cat.ready()
        settle(loop, cat)
        assert events(log) == ["upstream model list unavailable", "upstream model list available again"]
    finally:
        revived.close()


def test_an_upstream_that_answers_errors_or_garbage_is_a_failure_too(loop, mock):
    async def garbage(reader, writer):                 # a 200 whose body is not a model list
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
        writer.close()

    bad = loop.run_until_complete(asyncio.start_server(garbage, "127.0.0.1", 0))
    bad_port = bad.sockets[0].getsockname()[1]
    try:
        # An empty key: the mock answers 401, as Anthropic does.
        unauthorized = deployment(f"http://127.0.0.1:{mock.port}", provider="anthropic", key_env="EMPTY")
        cat, log = make(loop, f'[[models]]\nname = "*"\n{unauthorized}{deployment(f"http://127.0.0.1:{bad_port}/v1")}')
        assert not cat.ready()
        settle(loop, cat)
        assert listed(cat) == []
        assert events(log) == ["upstream model list unavailable"] * 2
        assert "status 401" in log.getvalue() and "is not a JSON object" in log.getvalue()
    finally:
        bad.close()


def test_the_first_listing_waits_for_a_slow_upstream_only_up_to_the_first_wait(loop, monkeypatch):
    monkeypatch.setattr(catalog_module, "FIRST_WAIT", 0.3)
    slow = loop.run_until_complete(start_mock("127.0.0.1", 0, delay_ms=800))
    try:
        cat, _ = make(loop, f'[[models]]\nname = "mine"\n{deployment("http://127.0.0.1:1/v1")}'
                            f'[[models]]\nname = "*"\n{deployment(f"http://127.0.0.1:{slow.port}/v1")}')
        answered = loop.create_future()
        t0 = time.monotonic()
        assert not cat.ready()
        cat.when_ready(lambda: answered.set_result((time.monotonic() - t0, listed(cat))))
        cat.when_ready(lambda: None)                   # a second waiter shares the timer
        waited, ids = loop.run_until_complete(answered)
        assert 0.25 <= waited < 1.0 and ids == ["mine"]
        assert cat.ready()                             # later listings do not wait: the deadline is past
        assert cat.task is not None                    # the slow list is still being fetched
        cat.close()
        loop.run_until_complete(asyncio.sleep(0.01))
        assert cat.task is None
    finally:
        while slow.mock_stats.active_requests:        # the mock answers what it was sent, though nobody reads it
            loop.run_until_complete(asyncio.sleep(0.05))
        slow.close()


def test_without_a_listing_upstream_nothing_is_fetched(loop):
    cat, _ = make(loop, f'[[models]]\nname = "a"\n{deployment("http://127.0.0.1:1/v1")}'
                        f'[[models]]\nname = "*"\n{deployment("http://127.0.0.1:1/v1", model="pinned")}')
    assert cat.ready() and cat.task is None and cat.sources == []
    assert listed(cat) == ["a"]


def test_policies_hide_models_from_the_list_and_from_retrieval(loop):
    def visible(ex, model):
        return ex.consumer != "restricted" or model.startswith("gpt-4o")

    names = ["gpt-4o", "gpt-4o-mini", "claude", "org/gpt-4o-x"]
    cat, _ = make(loop, "".join(f'[[models]]\nname = "{n}"\n{deployment("http://127.0.0.1:1/v1")}' for n in names),
                  visible=(visible,))
    assert listed(cat, exchange("restricted")) == ["gpt-4o", "gpt-4o-mini"]
    assert listed(cat, exchange("other")) == names
    assert orjson.loads(cat.answer(exchange("other"), "/v1/models/org%2Fgpt-4o-x"))["id"] == "org/gpt-4o-x"
    for hidden in ("claude", "org%2Fgpt-4o-x", "nope", ""):
        with pytest.raises(GatewayError) as e:
            cat.answer(exchange("restricted"), "/v1/models/" + hidden)
        assert e.value.status == 404 and e.value.code == "model_not_found"
