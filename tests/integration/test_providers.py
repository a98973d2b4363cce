"""Anthropic, Azure OpenAI and Gemini deployments behind the OpenAI API, and Anthropic's Messages API in front,
through the running gateway against the built-in mock (which answers in each provider's wire format), driven by
the official `openai` and `anthropic` SDKs."""
from __future__ import annotations

import asyncio
import json

import anthropic
import httpx
import openai
import pytest

from fastgw.policies.auth.policy import hash_key
from tests.integration.conftest import wait_for

KEY = "sk-team-key"
ENV = {"ANTHROPIC_KEY": "sk-ant-mock", "GEMINI_KEY": "gm-mock", "AZURE_KEY": "az-mock"}
TRANSLATED = ("claude-sonnet-4", "gemini-2.5-flash")
ALL = ("gpt-4o-mini", "azure-gpt-4o") + TRANSLATED
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def config(mock_port: int, extra: str = "") -> str:
    m = f"http://127.0.0.1:{mock_port}"
    return f"""{extra}
[[models]]
name = "gpt-4o-mini"
[[models.deployments]]
url = "{m}/v1"

[[models]]
name = "azure-gpt-4o"
[[models.deployments]]
url = "{m}"
provider = "azure"
model = "gpt-4o-prod"
api_version = "2024-10-21"
key_env = "AZURE_KEY"

[[models]]
name = "claude-sonnet-4"
[[models.deployments]]
url = "{m}"
provider = "anthropic"
model = "claude-sonnet-4-20250514"
key_env = "ANTHROPIC_KEY"

[[models]]
name = "gemini-2.5-flash"
[[models.deployments]]
url = "{m}"
provider = "gemini"
key_env = "GEMINI_KEY"
"""


@pytest.fixture
def gw(tmp_path, mock, start_gateway):
    return start_gateway(config(mock.port), env=ENV)


@pytest.fixture
def authed(tmp_path, mock, start_gateway):
    """key-auth and a token limit on: the consumer's key works as x-api-key too, and usage of every provider
    is counted."""
    d = tmp_path / "policies"
    d.mkdir()
    (d / "10-auth.toml").write_text(f'policy = "key-auth"\n[[consumers]]\nname = "team"\nkeys = ["{hash_key(KEY)}"]\n')
    (d / "20-rate.toml").write_text('policy = "rate-limit"\n[[rules]]\nwindow = "minute"\ntokens = 1000000\n')
    (d / "30-budget.toml").write_text('policy = "budget"\n[[budgets]]\nconsumer = "*"\nusd = 100.0\nperiod = "day"\n')
    return start_gateway(config(mock.port, f'policies_dir = "{d}"\n'), env=ENV)


def client(gw, key="unused"):
    return openai.OpenAI(base_url=gw.base + "/v1", api_key=key, max_retries=0, timeout=10)


def chat(**kw):
    return dict({"messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Say hello"}]}, **kw)


@pytest.mark.parametrize("model", ALL)
def test_chat_stream_and_usage_through_every_provider(gw, model):
    c = client(gw)
    r = c.chat.completions.create(model=model, **chat())
    text = r.choices[0].message.content
    assert text.startswith("Hello") and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(c.chat.completions.create(model=model, stream=True, stream_options={"include_usage": True},
                                            **chat()))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    plain = list(c.chat.completions.create(model=model, stream=True, **chat()))
    # no usage chunk unless asked for (Azure opens with a choices-less prompt_filter_results chunk: kept)
    assert all(ch.usage is None for ch in plain)
    assert "".join(ch.choices[0].delta.content or "" for ch in plain if ch.choices) == text


@pytest.mark.parametrize("model", TRANSLATED)
def test_async_stream(gw, model):
    async def run():
        c = openai.AsyncOpenAI(base_url=gw.base + "/v1", api_key="x", max_retries=0, timeout=10)
        stream = await c.chat.completions.create(model=model, stream=True, **chat())
        return "".join([ch.choices[0].delta.content or "" async for ch in stream])
    assert asyncio.run(run()).startswith("Hello")


@pytest.mark.parametrize("model", ("gpt-4o-mini",) + TRANSLATED)
def test_tool_calls_and_tool_results(gw, model):
    c = client(gw)
    r = c.chat.completions.create(model=model, tools=[WEATHER], **chat())
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "mock"}
    # streamed: the deltas add up to the same call
    args, names = "", []
    for ch in c.chat.completions.create(model=model, tools=[WEATHER], stream=True, **chat()):
        for tc in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            names += [tc.function.name] if tc.function and tc.function.name else []
            args += tc.function.arguments or "" if tc.function else ""
    assert names == ["get_weather"] and json.loads(args) == {"city": "mock"}
    # the tool's result goes back: the model answers in text
    messages = chat()["messages"] + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    r = c.chat.completions.create(model=model, tools=[WEATHER], messages=messages)
    assert r.choices[0].message.content.startswith("Hello")


@pytest.mark.parametrize("model", ("claude-sonnet-4", "gpt-4o-mini"))
def test_anthropic_sdk_on_the_messages_api(authed, model):
    a = anthropic.Anthropic(base_url=authed.base, api_key=KEY, max_retries=0, timeout=10)
    msg = a.messages.create(model=model, max_tokens=100, system="Be brief.",
                            messages=[{"role": "user", "content": "Say hello"}])
    text = msg.content[0].text
    assert text.startswith("Hello") and msg.stop_reason == "end_turn" and msg.usage.output_tokens > 0
    with a.messages.stream(model=model, max_tokens=100, messages=[{"role": "user", "content": "Say hello"}]) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert streamed == text and final.usage.output_tokens == msg.usage.output_tokens
    tool = {"name": "get_weather", "description": "weather",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    msg = a.messages.create(model=model, max_tokens=100, tools=[tool],
                            messages=[{"role": "user", "content": "Weather in Paris?"}])
    use = [b for b in msg.content if b.type == "tool_use"]
    assert msg.stop_reason == "tool_use" and use[0].name == "get_weather" and use[0].input == {"city": "mock"}
    n = a.messages.count_tokens(model=model, messages=[{"role": "user", "content": "Say hello"}])
    assert n.input_tokens > 0
    # the same key, wrong: the SDK's own error class, in Anthropic's error shape
    bad = anthropic.Anthropic(base_url=authed.base, api_key="sk-wrong", max_retries=0, timeout=10)
    with pytest.raises(anthropic.AuthenticationError) as e:
        bad.messages.create(model=model, max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "authentication_error"
    # accounting counted every provider's usage under the virtual model name
    lines = wait_for(lambda: [x for x in authed.access_lines() if x.get("model") == model and x.get("status") == 200],
                     what="access lines")
    assert all(x["prompt_tokens"] > 0 and x["completion_tokens"] > 0 for x in lines
               if x.get("path") == "/v1/messages")


def test_openai_clients_with_the_gateway_key_on_translated_providers(authed):
    raw = client(authed, KEY).chat.completions.with_raw_response.create(model="claude-sonnet-4", **chat())
    assert int(raw.headers["x-fastgw-overhead-us"]) > 0 and raw.headers["x-request-id"]
    r = raw.parse()
    assert r.choices[0].message.content.startswith("Hello")
    for model in TRANSLATED:   # a stream's usage reaches limits and budgets though the client did not ask for it
        chunks = list(client(authed, KEY).chat.completions.create(model=model, stream=True, **chat()))
        assert all(ch.usage is None for ch in chunks)
    # priced by the virtual name (Anthropic's and Google's list prices), counted from the translated usage
    lines = wait_for(lambda: [x for x in authed.access_lines() if x.get("model") in TRANSLATED
                              and x.get("status") == 200] if len(authed.access_lines()) >= 3 else None,
                     what="three access lines")
    assert len(lines) == 3
    for x in lines:
        assert x["prompt_tokens"] > 0 and x["completion_tokens"] > 0 and x["cost_usd"] > 0, x
    with pytest.raises(openai.AuthenticationError):
        client(authed, "sk-wrong").chat.completions.create(model="gemini-2.5-flash", **chat())


@pytest.mark.parametrize("model,status,cls", [
    ("claude-sonnet-4", 529, openai.InternalServerError), ("claude-sonnet-4", 429, openai.RateLimitError),
    ("claude-sonnet-4", 400, openai.BadRequestError), ("gemini-2.5-flash", 429, openai.RateLimitError),
    ("gemini-2.5-flash", 503, openai.InternalServerError), ("gemini-2.5-flash", 400, openai.BadRequestError)])
def test_provider_errors_become_openai_errors(gw, model, status, cls):
    with pytest.raises(cls) as e:
        client(gw).chat.completions.create(model=model, extra_headers={"x-mock-status": str(status)}, **chat())
    err = e.value.body
    assert set(err) >= {"message", "type", "code"} and err["message"]
    with pytest.raises(cls):   # a stream that is refused before it starts: the same error
        client(gw).chat.completions.create(model=model, stream=True, extra_headers={"x-mock-status": str(status)},
                                           **chat())


def test_azure_content_filter_is_passed_on(gw):
    with pytest.raises(openai.BadRequestError) as e:
        client(gw).chat.completions.create(
            model="azure-gpt-4o", messages=[{"role": "user", "content": "FASTGW_CONTENT_FILTER please"}])
    assert e.value.code == "content_filter"


def test_a_field_the_provider_cannot_express_is_a_clear_400(gw):
    with pytest.raises(openai.BadRequestError) as e:
        client(gw).chat.completions.create(model="claude-sonnet-4", n=2, **chat())
    assert e.value.body["param"] == "n" and e.value.code == "unsupported_parameter"
    r = httpx.post(gw.base + "/v1/embeddings", json={"model": "claude-sonnet-4", "input": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_endpoint"
    r = httpx.post(gw.base + "/v1/messages", json={"model": "gemini-2.5-flash", "max_tokens": 5,
                                                   "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["type"] == "error"


class CannedUpstream:
    """A raw upstream answering every request with fixed bytes (an upstream fault the mock does not make)."""

    def __init__(self, response: bytes):
        import socket
        import threading

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.response = response
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                n = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                             if line.lower().startswith(b"content-length")))
                while len(body) < n:
                    body += conn.recv(65536)
                conn.sendall(self.response)


def _stream_response(events: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % len(events)) + events


@pytest.mark.parametrize("events", [
    b'event: message_start\ndata: {"type":"message_start","message":{not json\n\n',
    # a stream that stops before message_stop: no fake end
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message","role":'
    b'"assistant","content":[],"model":"m","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":3,'
    b'"output_tokens":1}}}\n\nevent: content_block_start\ndata: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"text","text":""}}\n\nevent: content_block_delta\ndata: {"type":'
    b'"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}\n\n'])
def test_a_malformed_or_truncated_provider_stream_is_a_502_or_breaks_off(tmp_path, start_gateway, events):
    up = CannedUpstream(_stream_response(events))
    gw = start_gateway(config(up.port).replace(f"127.0.0.1:{up.port}/v1", f"127.0.0.1:{up.port}"), env=ENV)
    with httpx.stream("POST", gw.base + "/v1/chat/completions", timeout=10,
                      json={"model": "claude-sonnet-4", "stream": True, **chat()}) as r:
        body = b""
        broken = False
        try:
            for part in r.iter_bytes():
                body += part
        except httpx.RemoteProtocolError:   # broken off: the client cannot take it for a whole answer
            broken = True
    # ... or, when the fault was found before anything reached the client, a clean 502
    assert broken or (r.status_code == 502 and json.loads(body)["error"]["type"] == "upstream_error"), body
    assert b"[DONE]" not in body and b'"finish_reason":"stop"' not in body
    assert httpx.get(gw.base + "/healthz").status_code == 200


def test_a_provider_body_that_is_not_json_is_a_502(tmp_path, start_gateway):
    up = CannedUpstream(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5\r\n\r\n{nope")
    gw = start_gateway(config(up.port), env=ENV)
    r = httpx.post(gw.base + "/v1/chat/completions", json={"model": "gemini-2.5-flash", **chat()}, timeout=10)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_malformed"
