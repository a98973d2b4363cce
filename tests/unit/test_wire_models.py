"""The providers' model lists -> OpenAI's, against recorded bodies (tests/data/wire/models/SOURCES.md), and the
built-in mock's lists in the same shapes."""
import os

import openai
import orjson
import pytest
from hypothesis import given, strategies as st

from fastgw.devtools.mock import anthropic as mock_anthropic, gemini as mock_gemini
from fastgw.devtools.mock.wire import MockRequest
from fastgw.errors import GatewayError
from fastgw.providers import PROVIDERS
from fastgw.providers.wire.models import anthropic_models, gemini_models, openai_models

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "wire", "models")


def sample(name: str) -> bytes:
    with open(os.path.join(DATA, name), "rb") as f:
        return f.read()


def test_openai_list_keeps_ids_created_and_owners():
    models, cursor = openai_models(sample("openai_list.json"))
    assert cursor == ""
    assert models == [{"id": f"model-id-{i}", "object": "model", "created": 1686935002, "owned_by": owner}
                      for i, owner in enumerate(("organization-owner", "organization-owner", "openai"))]
    for m in models:                                   # what the openai SDK reads
        assert openai.types.Model.model_validate(m).id == m["id"]


def test_anthropic_pages_chain_on_last_id_and_dates_become_unix_seconds():
    first, cursor = anthropic_models(sample("anthropic_list_page1.json"))
    assert cursor == "claude-3-7-sonnet-20250219"      # has_more: the next page is after the last id
    last, end = anthropic_models(sample("anthropic_list_last.json"))
    assert end == ""
    assert [(m["id"], m["created"], m["owned_by"]) for m in first + last] == [
        ("claude-sonnet-4-20250514", 1747872000, "anthropic"),
        ("claude-3-7-sonnet-20250219", 1740355200, "anthropic"),
        ("claude-3-5-haiku-20241022", 1729555200, "anthropic")]
    assert all(m["object"] == "model" for m in first + last)


def test_gemini_ids_lose_their_prefix_and_models_that_cannot_chat_are_left_out():
    models, cursor = gemini_models(sample("gemini_list.json"))
    assert cursor == "Chhtb2RlbHMvZ2VtaW5pLTIuNS1mbGFzaA=="
    assert models == [{"id": "gemini-2.0-flash", "object": "model", "created": 0, "owned_by": "google"},
                      {"id": "gemini-2.5-flash", "object": "model", "created": 0, "owned_by": "google"}]


@pytest.mark.parametrize("translate, body", [
    (openai_models, b"not json"),
    (openai_models, b"[]"),
    (openai_models, b'{"object": "list"}'),
    (openai_models, b'{"data": [{"object": "model"}]}'),
    (openai_models, b'{"data": ["gpt-4o"]}'),
    (anthropic_models, b'{"data": [{"id": 7}]}'),
    (anthropic_models, b'{"error": {"type": "authentication_error"}}'),
    (gemini_models, b'{"models": {"name": "models/x"}}'),
    (gemini_models, b'{"models": [{"name": ""}]}'),
])
def test_a_body_that_is_not_the_list_is_an_upstream_malformed_502(translate, body):
    with pytest.raises(GatewayError) as e:
        translate(body)
    assert (e.value.status, e.value.code, e.value.type) == (502, "upstream_malformed", "upstream_error")


def test_odd_but_valid_fields_do_not_fail_the_list():
    models, _ = openai_models(b'{"data": [{"id": "m", "created": "yesterday", "owned_by": null}]}')
    assert models == [{"id": "m", "object": "model", "created": 0, "owned_by": ""}]
    models, cursor = anthropic_models(b'{"data": [{"id": "c", "created_at": "soon"}], "has_more": true}')
    assert models[0]["created"] == 0 and cursor == ""   # more pages, but no id to continue after: stop


@given(st.lists(st.text(min_size=1), max_size=20))
def test_every_id_comes_through_in_order(ids):
    body = orjson.dumps({"data": [{"id": i, "object": "model", "created": 1, "owned_by": "o"} for i in ids]})
    assert [m["id"] for m in openai_models(body)[0]] == ids
    body = orjson.dumps({"models": [{"name": f"models/{i}", "supportedGenerationMethods": ["generateContent"]}
                                    for i in ids]})
    assert [m["id"] for m in gemini_models(body)[0]] == ids


# -- the providers' requests for their lists ------------------------------------------------------------------

def test_each_format_asks_its_own_path_and_pages():
    assert PROVIDERS["openai"].models_target("/v1", "", 1000) == "/v1/models"
    assert PROVIDERS["openai"].models_target("/api/v1", "", 1000) == "/api/v1/models"
    assert PROVIDERS["anthropic"].models_target("", "", 1000) == "/v1/models?limit=1000"
    assert PROVIDERS["anthropic"].models_target("/v1", "claude a/b", 5) == "/v1/models?limit=5&after_id=claude%20a%2Fb"
    assert PROVIDERS["gemini"].models_target("/v1beta", "", 1000) == "/v1beta/models?pageSize=1000"
    assert PROVIDERS["gemini"].models_target("", "ab+/=", 9) == "/v1beta/models?pageSize=9&pageToken=ab%2B%2F%3D"
    assert PROVIDERS["azure"].models_target("", "", 1000) is None   # a deployment is one model


# -- the mock answers in the recorded shapes -------------------------------------------------------------------

def mock_get(handler, query: str, headers):
    r = handler(MockRequest(b"GET", b"/", query.encode(), headers, b"", 1, False, False))
    return r.status, orjson.loads(r.body)


def test_the_mocks_lists_have_the_recorded_fields_and_page_like_the_providers():
    recorded = orjson.loads(sample("anthropic_list_page1.json"))
    status, page = mock_get(mock_anthropic.list_models, "limit=2", [(b"x-api-key", b"k")])
    assert status == 200 and set(page) == set(recorded) and page["has_more"] is True
    assert all(set(m) == set(recorded["data"][0]) for m in page["data"])
    status, rest = mock_get(mock_anthropic.list_models, f"limit=2&after_id={page['last_id']}", [(b"x-api-key", b"k")])
    assert rest["has_more"] is False
    assert [m["id"] for m in page["data"] + rest["data"]] == [m[0] for m in mock_anthropic.MODELS]
    assert mock_get(mock_anthropic.list_models, "", [])[0] == 401

    recorded = orjson.loads(sample("gemini_list.json"))
    status, page = mock_get(mock_gemini.list_models, "pageSize=3", [(b"x-goog-api-key", b"k")])
    assert status == 200 and set(page) == set(recorded)
    assert all(set(m) <= set(recorded["models"][2]) for m in page["models"])
    status, rest = mock_get(mock_gemini.list_models, f"pageSize=3&pageToken={page['nextPageToken']}",
                            [(b"x-goog-api-key", b"k")])
    assert "nextPageToken" not in rest
    assert [m["name"] for m in page["models"] + rest["models"]] == [f"models/{m[0]}" for m in mock_gemini.MODELS]
