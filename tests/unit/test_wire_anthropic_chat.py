"""fastgw.providers.wire.anthropic_chat: OpenAI chat clients in front of an Anthropic Messages upstream.

Upstream samples are recorded Anthropic wire data under tests/data/wire/anthropic/ (SOURCES.md says where
each comes from). What the translation produces for the client is read back with the real openai SDK (its
types, its stream reader, its error classes); stream translations are also checked against the anthropic
SDK's own reading of the same upstream stream.
"""
import re
from pathlib import Path

import anthropic
import httpx
import httpx2
import openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from fastgw.errors import GatewayError
from fastgw.providers.wire.anthropic_chat import (
    MessagesToChatStream,
    MessagesUsageReader,
    chat_request_to_messages,
    messages_error_to_chat,
    messages_response_to_chat,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "wire" / "anthropic"
UPSTREAM_MODEL = "claude-sonnet-4-5-20250929"


def sample(name: str) -> bytes:
    return (DATA / name).read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# Helpers: an SSE splitter (as the relay splits) and the real SDKs reading what the gateway would send

class SSESplitter:
    """WHATWG event-stream parsing, fed in arbitrary pieces: lines end in CRLF, LF or CR (a CRLF may be split
    across pieces); a blank line dispatches the event if it has data; `event` and `data` fields, one leading
    space after the colon dropped; comments and other fields ignored. Yields (event name or None, data)."""

    _EOL = re.compile(rb"\r\n|\r|\n")

    def __init__(self):
        self.buf = b""
        self.name = None
        self.data = []
        self.after_cr = False       # the last line ended in CR: an LF at the start of the next piece belongs to it

    def feed(self, piece: bytes) -> list:
        if not piece:
            return []
        if self.after_cr and piece.startswith(b"\n"):
            piece = piece[1:]
        self.after_cr = False
        self.buf += piece
        events = []
        while (m := self._EOL.search(self.buf)) is not None:
            if m.group() == b"\r" and m.end() == len(self.buf):
                self.after_cr = True
            line, self.buf = self.buf[:m.start()], self.buf[m.end():]
            self._line(line, events)
        return events

    def _line(self, line: bytes, events: list) -> None:
        if not line:
            if self.data:
                events.append((self.name, b"\n".join(self.data)))
            self.name, self.data = None, []
            return
        if line.startswith(b":"):
            return
        field, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if field == b"event":
            self.name = value.decode()
        elif field == b"data":
            self.data.append(value)


def translate(pieces, include_usage=False, model="claude-via-gw"):
    """Feed the upstream body, in these pieces, through a splitter and a MessagesToChatStream."""
    splitter = SSESplitter()
    stream = MessagesToChatStream(model, include_usage)
    out = []
    for piece in pieces:
        for name, data in splitter.feed(piece):
            out.extend(stream.event(name, data))
    out.extend(stream.finish())
    return out, stream


def same_second(blocks) -> bytes:
    """The output with `created` (the wall clock) zeroed, so two runs compare byte for byte."""
    return re.sub(rb'"created":\d+', b'"created":0', b"".join(blocks))


def chunks_of(blocks) -> list[dict]:
    """The JSON chunks of translated output, each validated as the openai SDK's ChatCompletionChunk."""
    for block in blocks:
        assert block.startswith(b"data: ") and block.endswith(b"\n\n"), block
    payloads = [block[6:-2] for block in blocks if block != b"data: [DONE]\n\n"]
    chunks = [orjson.loads(p) for p in payloads]
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    return chunks


def openai_client(status: int, body: bytes, content_type: str) -> openai.OpenAI:
    """The real openai SDK, its HTTP answered in memory with what the gateway would send."""
    transport = httpx.MockTransport(
        lambda request: httpx.Response(status, headers={"content-type": content_type}, content=body))
    return openai.OpenAI(api_key="sk-client", base_url="http://gateway.test/v1", max_retries=0,
                         http_client=httpx.Client(transport=transport))


def openai_reads_stream(blocks) -> list:
    client = openai_client(200, b"".join(blocks), "text/event-stream")
    return list(client.chat.completions.create(model="claude-via-gw", messages=[{"role": "user", "content": "hi"}],
                                               stream=True))


def anthropic_final_message(body: bytes) -> dict:
    """The anthropic SDK's own accumulation of an upstream stream into the final Message."""
    transport = httpx2.MockTransport(      # the anthropic SDK runs on httpx2
        lambda request: httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=body))
    client = anthropic.Anthropic(api_key="sk-ant", base_url="http://upstream.test", max_retries=0,
                                 http_client=httpx2.Client(transport=transport))
    with client.messages.stream(model=UPSTREAM_MODEL, max_tokens=100,
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        return stream.get_final_message().model_dump(mode="json")


def refused(body, status=400) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        chat_request_to_messages(body, UPSTREAM_MODEL, 1024)
    assert info.value.status == status
    return info.value


USER_HI = [{"role": "user", "content": "Hi"}]


# ---------------------------------------------------------------------------------------------------------------
# Request

def test_minimal_request_gets_the_upstream_model_and_the_default_max_tokens():
    out = chat_request_to_messages({"model": "claude-via-gw", "messages": USER_HI}, UPSTREAM_MODEL, 1024)
    assert out == {"model": UPSTREAM_MODEL, "max_tokens": 1024,
                   "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}


@pytest.mark.parametrize("fields, expected", [
    ({"max_tokens": 50}, 50),
    ({"max_completion_tokens": 70}, 70),
    ({"max_tokens": 50, "max_completion_tokens": 70}, 70),      # OpenAI's current name wins
])
def test_max_tokens(fields, expected):
    assert chat_request_to_messages({"messages": USER_HI, **fields}, UPSTREAM_MODEL, 1024)["max_tokens"] == expected


@pytest.mark.parametrize("value", [0, -1, 1.5, "100", True])
def test_bad_max_tokens_is_a_400(value):
    err = refused({"messages": USER_HI, "max_tokens": value})
    assert (err.param, err.code) == ("max_tokens", "invalid_value")


def test_system_and_developer_messages_become_one_system_prompt_and_same_role_turns_merge():
    body = {"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in "}, {"type": "text", "text": "French."}]},
        {"role": "user", "content": [{"type": "text", "text": "How are you?"}]},
        {"role": "assistant", "content": "Bien."},
        {"role": "assistant", "content": [{"type": "text", "text": "Et vous ?"}]},
        {"role": "user", "content": "Bien aussi.", "name": "ann"},      # names: nothing to map them to
    ]}
    out = chat_request_to_messages(body, UPSTREAM_MODEL, 1024)
    assert out["system"] == "You are terse.\n\nAnswer in French."
    assert out["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "How are you?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Bien."}, {"type": "text", "text": "Et vous ?"}]},
        {"role": "user", "content": [{"type": "text", "text": "Bien aussi."}]},
    ]


def test_sampling_fields_stop_stream_and_user():
    body = {"messages": USER_HI, "temperature": 0.7, "top_p": 0.9, "stop": "END", "stream": True,
            "stream_options": {"include_usage": True}, "user": "user-42", "seed": 7, "n": 1, "logprobs": False,
            "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "response_format": {"type": "text"},
            "modalities": ["text"], "parallel_tool_calls": True, "store": False}
    out = chat_request_to_messages(body, UPSTREAM_MODEL, 1024)
    assert out == {"model": UPSTREAM_MODEL, "max_tokens": 1024, "messages": out["messages"], "temperature": 0.7,
                   "top_p": 0.9, "stop_sequences": ["END"], "stream": True, "metadata": {"user_id": "user-42"}}
    out = chat_request_to_messages({"messages": USER_HI, "stop": ["a", "b"], "stream": False, "temperature": 1},
                                   UPSTREAM_MODEL, 1024)
    assert (out["stop_sequences"], out["temperature"]) == (["a", "b"], 1)
    assert "stream" not in out


def test_temperature_above_1_is_refused_not_rescaled():
    err = refused({"messages": USER_HI, "temperature": 1.2})
    assert (err.param, err.code) == ("temperature", "unsupported_parameter")
    assert "above 1" in err.message
    assert refused({"messages": USER_HI, "temperature": -0.1}).param == "temperature"
    assert refused({"messages": USER_HI, "temperature": "hot"}).param == "temperature"


@pytest.mark.parametrize("field, value", [
    ("n", 2), ("logprobs", True), ("top_logprobs", 3), ("presence_penalty", 0.5), ("frequency_penalty", -1),
    ("logit_bias", {"50256": -100}), ("response_format", {"type": "json_object"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
    ("audio", {"voice": "alloy", "format": "wav"}), ("modalities", ["text", "audio"]),
    ("reasoning_effort", "high"), ("prediction", {"type": "content", "content": "x"}),
    ("web_search_options", {}), ("functions", [{"name": "f"}]),
])
def test_fields_anthropic_cannot_express_are_a_400_naming_the_field(field, value):
    err = refused({"messages": USER_HI, field: value})
    assert (err.param, err.code, err.type) == (field, "unsupported_parameter", "invalid_request_error")
    assert field in err.message


def test_unknown_field_is_a_400():
    err = refused({"messages": USER_HI, "frobnicate": 1})
    assert (err.param, err.code) == ("frobnicate", "unsupported_parameter")


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
    "strict": True}}


def test_tools_become_input_schemas():
    no_params = {"type": "function", "function": {"name": "now"}}
    out = chat_request_to_messages({"messages": USER_HI, "tools": [WEATHER_TOOL, no_params]}, UPSTREAM_MODEL, 1024)
    assert out["tools"] == [
        {"name": "get_weather", "description": "Current weather",
         "input_schema": WEATHER_TOOL["function"]["parameters"]},
        {"name": "now", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in out


@pytest.mark.parametrize("choice, parallel, expected", [
    ("auto", None, {"type": "auto"}),
    ("none", None, {"type": "none"}),
    ("required", None, {"type": "any"}),
    ({"type": "function", "function": {"name": "get_weather"}}, None, {"type": "tool", "name": "get_weather"}),
    (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
    ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
    ({"type": "function", "function": {"name": "get_weather"}}, False,
     {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}),
    ("none", False, {"type": "none"}),
    (None, True, None),
])
def test_tool_choice_and_parallel_tool_calls(choice, parallel, expected):
    body = {"messages": USER_HI, "tools": [WEATHER_TOOL]}
    if choice is not None:
        body["tool_choice"] = choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    assert chat_request_to_messages(body, UPSTREAM_MODEL, 1024).get("tool_choice") == expected


def test_tool_choice_without_tools():
    out = chat_request_to_messages({"messages": USER_HI, "tool_choice": "none", "parallel_tool_calls": False},
                                   UPSTREAM_MODEL, 1024)
    assert "tool_choice" not in out and "tools" not in out
    assert refused({"messages": USER_HI, "tool_choice": "required"}).param == "tool_choice"


@pytest.mark.parametrize("body, param, code", [
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type", "unsupported_parameter"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "allowed_tools", "allowed_tools": {}}}, "tool_choice",
     "unsupported_parameter"),
    ({"tools": [WEATHER_TOOL], "tool_choice": "sometimes"}, "tool_choice", "invalid_value"),
])
def test_tool_definitions_anthropic_cannot_take(body, param, code):
    err = refused({"messages": USER_HI, **body})
    assert (err.param, err.code) == (param, code)


def test_multi_turn_with_tool_calls_and_results():
    body = {"messages": [
        {"role": "system", "content": "Use the tools."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"location\": \"Paris\"}"}},
            {"id": "call_2", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"location\": \"Rome\"}"}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C, cloudy"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "24C, sunny"}]},
        {"role": "assistant", "content": "Paris 18C, Rome 24C. Want more?", "tool_calls": [
            {"id": "call_3", "type": "function", "function": {"name": "now", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "call_3", "content": ""},
        {"role": "user", "content": "No, thanks."},
    ], "tools": [WEATHER_TOOL, {"type": "function", "function": {"name": "now"}}]}
    out = chat_request_to_messages(body, UPSTREAM_MODEL, 1024)
    assert out["system"] == "Use the tools."
    assert out["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"location": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"location": "Rome"}}]},
        {"role": "user", "content": [     # consecutive tool messages: one user turn, the results first
            {"type": "tool_result", "tool_use_id": "call_1", "content": "18C, cloudy"},
            {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "24C, sunny"}]}]},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Paris 18C, Rome 24C. Want more?"},
            {"type": "tool_use", "id": "call_3", "name": "now", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_3"},
            {"type": "text", "text": "No, thanks."}]},
    ]


@pytest.mark.parametrize("arguments", ["{\"location\": ", "not json", "[1, 2]", "\"Paris\""])
def test_tool_call_arguments_that_are_not_a_json_object_are_a_400(arguments):
    body = {"messages": USER_HI + [{"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]}]}
    err = refused(body)
    assert err.param == "messages[1].tool_calls[0].function.arguments"


def test_images():
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Compare"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "high"}},
        {"type": "image_url", "image_url": {"url": "https://example.test/cat.jpg"}},
        {"type": "image_url", "image_url": {"url": "data:image/jpg;base64,/9j/4AAQ"}},
    ]}]}
    assert chat_request_to_messages(body, UPSTREAM_MODEL, 1024)["messages"][0]["content"] == [
        {"type": "text", "text": "Compare"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.test/cat.jpg"}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}},
    ]


@pytest.mark.parametrize("url, code", [
    ("data:image/bmp;base64,Qk0=", "unsupported_parameter"),
    ("data:image/png,rawbytes", "invalid_value"),
    ("ftp://example.test/cat.png", "invalid_value"),
])
def test_images_anthropic_cannot_take_are_a_400(url, code):
    err = refused({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]})
    assert (err.param, err.code) == ("messages[0].content[0].image_url.url", code)


@pytest.mark.parametrize("messages, param, code", [
    ([{"role": "narrator", "content": "x"}], "messages[0].role", "invalid_value"),
    ([{"role": "function", "name": "f", "content": "x"}], "messages[0].role", "unsupported_parameter"),
    ([{"role": "user", "content": [{"type": "video", "video": {}}]}], "messages[0].content[0].type", "invalid_value"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}],
     "messages[0].content[0].type", "unsupported_parameter"),
    ([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}]}],
     "messages[0].content[0].type", "invalid_value"),
    ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id", "invalid_value"),
    ([{"role": "user", "content": None}], "messages[0].content", "invalid_value"),
    ([{"role": "system", "content": "only a system prompt"}], "messages", "invalid_value"),
    ([], "messages", "invalid_value"),
])
def test_bad_messages_are_a_400(messages, param, code):
    err = refused({"messages": messages})
    assert (err.param, err.code) == (param, code)


# ---------------------------------------------------------------------------------------------------------------
# Response

def test_text_response():
    out = messages_response_to_chat(orjson.loads(sample("response_text.json")), "claude-via-gw")
    ChatCompletion.model_validate(out)
    assert out["id"] == "chatcmpl-msg_013Zva2CMHLNnXjNJJKqJ2EF"
    assert (out["object"], out["model"]) == ("chat.completion", "claude-via-gw")
    assert out["choices"] == [{"index": 0, "logprobs": None, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "Hi! My name is Claude.", "refusal": None}}]
    assert out["usage"] == {"prompt_tokens": 2095, "completion_tokens": 503, "total_tokens": 2598,
                            "prompt_tokens_details": {"cached_tokens": 0}}
    assert isinstance(out["created"], int) and out["created"] > 1_700_000_000


def test_tool_use_response_drops_thinking_and_counts_cache_tokens_as_prompt():
    out = messages_response_to_chat(orjson.loads(sample("response_tool_use.json")), "claude-via-gw")
    completion = ChatCompletion.model_validate(out)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I'll check the current weather in San Francisco for you."
    [call] = choice.message.tool_calls
    assert (call.id, call.type, call.function.name) == ("toolu_01A09q90qw90lq917835lq9", "function", "get_weather")
    assert orjson.loads(call.function.arguments) == {"location": "San Francisco, CA", "unit": "celsius"}
    assert out["usage"] == {"prompt_tokens": 50 + 200 + 1200, "completion_tokens": 87, "total_tokens": 1537,
                            "prompt_tokens_details": {"cached_tokens": 1200}}


def test_tool_use_only_response_has_null_content():
    resp = orjson.loads(sample("response_tool_use.json"))
    resp["content"] = [b for b in resp["content"] if b["type"] == "tool_use"]
    assert messages_response_to_chat(resp, "m")["choices"][0]["message"]["content"] is None


@pytest.mark.parametrize("stop_reason, finish_reason", [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("pause_turn", "stop"), ("max_tokens", "length"),
    ("model_context_window_exceeded", "length"), ("tool_use", "tool_calls"), ("refusal", "content_filter"),
    ("a_reason_from_the_future", "stop"),
])
def test_stop_reasons(stop_reason, finish_reason):
    resp = orjson.loads(sample("response_text.json"))
    resp["stop_reason"] = stop_reason
    out = messages_response_to_chat(resp, "m")
    ChatCompletion.model_validate(out)
    assert out["choices"][0]["finish_reason"] == finish_reason


@pytest.mark.parametrize("resp", [
    [], {"content": []}, {"id": "msg_1", "content": "text", "usage": {}}, {"id": "msg_1", "content": []},
    {"id": "msg_1", "content": [{"text": "no type"}], "usage": {}},
    {"id": "msg_1", "content": [], "usage": {"input_tokens": "many"}},
])
def test_malformed_response_is_a_502(resp):
    with pytest.raises(GatewayError) as info:
        messages_response_to_chat(resp, "m")
    assert (info.value.status, info.value.type, info.value.code) == (502, "upstream_error", "upstream_malformed")


# ---------------------------------------------------------------------------------------------------------------
# Errors

@pytest.mark.parametrize("status, body, client_status, code, sdk_error", [
    (529, sample("error_overloaded_529.json"), 503, "upstream_overloaded", openai.InternalServerError),
    (429, sample("error_rate_limit_429.json"), 429, "rate_limit_exceeded", openai.RateLimitError),
    (400, sample("error_invalid_request_400.json"), 400, None, openai.BadRequestError),
])
def test_recorded_errors(status, body, client_status, code, sdk_error):
    got_status, error = messages_error_to_chat(status, body)
    upstream_message = orjson.loads(body)["error"]["message"]
    assert got_status == client_status
    assert error["error"]["code"] == code
    assert error["error"]["message"] == upstream_message       # the client is told what Anthropic said
    client = openai_client(got_status, orjson.dumps(error), "application/json")
    with pytest.raises(sdk_error) as info:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == client_status
    assert info.value.code == code
    assert info.value.message.endswith(upstream_message)


def anthropic_error(kind: str, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_1"})


@pytest.mark.parametrize("status, kind, client_status, code", [
    (401, "authentication_error", 502, "upstream_auth_failed"),
    (403, "permission_error", 502, "upstream_permission_denied"),
    (402, "billing_error", 502, "upstream_billing"),
    (404, "not_found_error", 502, "upstream_not_found"),
    (413, "request_too_large", 413, "request_too_large"),
    (500, "api_error", 502, "upstream_error"),
    (504, "timeout_error", 504, "upstream_timeout"),
    (409, "conflict_error", 409, None),
])
def test_error_statuses(status, kind, client_status, code):
    got_status, error = messages_error_to_chat(status, anthropic_error(kind, "details from Anthropic"))
    assert (got_status, error["error"]["code"]) == (client_status, code)
    assert "details from Anthropic" in error["error"]["message"]
    assert set(error["error"]) == {"message", "type", "param", "code"}
    if client_status == 502:
        assert error["error"]["type"] == "upstream_error"


def test_key_errors_say_the_gateway_key_is_at_fault():
    _, error = messages_error_to_chat(401, anthropic_error("authentication_error", "invalid x-api-key"))
    assert "gateway" in error["error"]["message"] and "not the client's key" in error["error"]["message"]


@pytest.mark.parametrize("body", [b"<html>502 Bad Gateway</html>", b"", b'{"detail": "nope"}', b"[1]"])
def test_error_body_that_is_not_an_anthropic_error_is_a_502(body):
    got_status, error = messages_error_to_chat(503, body)
    assert got_status == 502
    assert (error["error"]["type"], error["error"]["code"]) == ("upstream_error", "upstream_error")
    assert "HTTP 503" in error["error"]["message"]


# ---------------------------------------------------------------------------------------------------------------
# Streams

def test_text_stream():
    blocks, stream = translate([sample("stream_text.txt")])
    chunks = chunks_of(blocks)
    assert blocks[-1] == b"data: [DONE]\n\n"
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": "", "refusal": None}, {"content": "Hello"}, {"content": "!"}, {}]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "stop"]
    assert {c["id"] for c in chunks} == {"chatcmpl-msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY"}
    assert {c["model"] for c in chunks} == {"claude-via-gw"}
    assert all("usage" not in c for c in chunks)            # the client did not ask for usage...
    assert (stream.prompt_tokens, stream.completion_tokens, stream.complete) == (25, 15, True)   # ...still recorded
    read = openai_reads_stream(blocks)
    assert "".join(c.choices[0].delta.content or "" for c in read) == "Hello!"


def test_stream_with_include_usage_ends_with_a_usage_chunk():
    blocks, _ = translate([sample("stream_text.txt")], include_usage=True)
    chunks = chunks_of(blocks)
    assert all(c["usage"] is None for c in chunks[:-1])     # as OpenAI: "usage": null until the last chunk
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 25, "completion_tokens": 15, "total_tokens": 40,
                                   "prompt_tokens_details": {"cached_tokens": 0}}
    assert openai_reads_stream(blocks)[-1].usage.total_tokens == 40


def test_text_deltas_reach_the_client_in_the_call_that_brings_them():
    events = SSESplitter().feed(sample("stream_text.txt"))
    stream = MessagesToChatStream("m", False)
    for name, data in events:
        out = stream.event(name, data)
        if b"text_delta" in data:
            [block] = out
            assert orjson.loads(data)["delta"]["text"] == orjson.loads(block[6:])["choices"][0]["delta"]["content"]


def test_tool_use_stream():
    blocks, stream = translate([sample("stream_tool_use.txt")], include_usage=True)
    chunks = chunks_of(blocks)
    tool_deltas = [c["choices"][0]["delta"]["tool_calls"] for c in chunks
                   if c["choices"] and "tool_calls" in c["choices"][0]["delta"]]
    assert tool_deltas[0] == [{"index": 0, "id": "toolu_01NRLabsLyVHZPKxbKvkfSMn", "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}]
    assert tool_deltas[1:] == [[{"index": 0, "function": {"arguments": a}}]
                               for a in ["{\"locati", "on\": \"P", "ar", "is\"}"]]
    state = ChatCompletionStreamState()
    for chunk in openai_reads_stream(blocks):
        state.handle_chunk(chunk)
    final = state.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.choices[0].message.content == "I'll check the current weather in Paris for you."
    assert orjson.loads(final.choices[0].message.tool_calls[0].function.arguments) == {"location": "Paris"}
    assert (stream.prompt_tokens, stream.completion_tokens) == (377, 65)


@pytest.mark.parametrize("name", ["stream_text.txt", "stream_tool_use.txt"])   # the thinking sample has no
def test_stream_and_non_stream_translations_agree(name):                       # usage, which the SDK requires
    """What the openai SDK assembles from the translated stream equals the non-stream translation of the
    message the anthropic SDK assembles from the same upstream stream."""
    blocks, _ = translate([sample(name)], include_usage=True)
    state = ChatCompletionStreamState()
    for chunk in openai_reads_stream(blocks):
        state.handle_chunk(chunk)
    streamed = state.get_final_completion()
    whole = ChatCompletion.model_validate(messages_response_to_chat(anthropic_final_message(sample(name)), "m"))
    assert streamed.choices[0].message.content == whole.choices[0].message.content
    assert streamed.choices[0].finish_reason == whole.choices[0].finish_reason
    assert ([(c.id, c.function.name, orjson.loads(c.function.arguments))
             for c in streamed.choices[0].message.tool_calls or []] ==
            [(c.id, c.function.name, orjson.loads(c.function.arguments))
             for c in whole.choices[0].message.tool_calls or []])
    assert streamed.usage.prompt_tokens == whole.usage.prompt_tokens
    assert streamed.usage.completion_tokens == whole.usage.completion_tokens


def test_thinking_is_dropped_and_a_stream_without_usage_reports_none():
    blocks, stream = translate([sample("stream_thinking.txt")])
    chunks = chunks_of(blocks)
    assert [c["choices"][0]["delta"] for c in chunks][1:] == [
        {"content": "The greatest common divisor of 1071 and 462 is **21**."}, {}]
    assert b"Euclidean" not in b"".join(blocks)
    assert (stream.prompt_tokens, stream.completion_tokens, stream.complete) == (-1, -1, True)


@pytest.mark.parametrize("name", ["stream_text.txt", "stream_tool_use.txt", "stream_thinking.txt"])
def test_stream_split_at_every_byte_boundary_translates_the_same(name):
    body = sample(name)
    whole, _ = translate([body], include_usage=True)
    expected = same_second(whole)
    for i in range(len(body) + 1):
        split, stream = translate([body[:i], body[i:]], include_usage=True)
        assert same_second(split) == expected, f"split at byte {i}"
        assert stream.complete


@settings(max_examples=100, deadline=None)
@given(data=st.data(), crlf=st.booleans())
def test_stream_in_random_pieces_and_line_endings_translates_the_same(data, crlf):
    body = sample("stream_tool_use.txt")
    expected = same_second(translate([body], include_usage=True)[0])
    if crlf:
        body = body.replace(b"\n", b"\r\n")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=30)))
    pieces = [body[a:b] for a, b in zip([0] + cuts, cuts + [len(body)])]
    assert same_second(translate(pieces, include_usage=True)[0]) == expected


def test_error_event_mid_stream():
    blocks, stream = translate([sample("stream_error.txt")])
    assert blocks[-1] == b'data: {"error":{"message":"Overloaded","type":"api_error","param":null,' \
                         b'"code":"upstream_overloaded"}}\n\n'
    assert b"[DONE]" not in b"".join(blocks)
    assert not stream.complete and stream.finish() == []
    assert stream.event("message_stop", b'{"type": "message_stop"}') == []     # nothing after the error
    with pytest.raises(openai.APIError) as info:
        openai_reads_stream(blocks)
    assert info.value.message == "Overloaded"


def test_stream_cut_short_is_not_complete():
    body = sample("stream_text.txt")
    blocks, stream = translate([body[:body.index(b"event: message_delta")]])
    assert not stream.complete and blocks[-1] != b"data: [DONE]\n\n"
    assert stream.completion_tokens == -1 and stream.prompt_tokens == 25
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks_of(blocks))


@pytest.mark.parametrize("events", [
    [("message_start", b"{not json")],
    [("message_start", b'{"type": "message_start"}')],
    [("content_block_delta",
      b'{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x"}}')],
    [("message_start", b'{"type": "message_start", "message": {"id": "msg_1"}}'),
     ("content_block_delta", b'{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta"}}')],
    [("message_start", b'[1, 2]')],
])
def test_malformed_stream_data_is_a_502(events):
    stream = MessagesToChatStream("m", False)
    with pytest.raises(GatewayError) as info:
        for name, data in events:
            stream.event(name, data)
    assert (info.value.status, info.value.code) == (502, "upstream_malformed")


def test_unknown_event_types_are_ignored():
    stream = MessagesToChatStream("m", False)
    stream.event("message_start", b'{"type": "message_start", "message": {"id": "msg_1"}}')
    assert stream.event("new_kind", b'{"type": "new_kind", "x": 1}') == []
    assert stream.event(None, b'{"type": "content_block_delta", "index": 0, "delta": {"type": "new_delta"}}') == []


# ---------------------------------------------------------------------------------------------------------------
# Usage reader for /v1/messages passed through

@pytest.mark.parametrize("name, prompt, completion", [
    ("stream_text.txt", 25, 15), ("stream_tool_use.txt", 377, 65), ("stream_thinking.txt", -1, -1)])
def test_usage_reader(name, prompt, completion):
    reader = MessagesUsageReader()
    for event_name, data in SSESplitter().feed(sample(name)):
        assert reader.event(event_name, data) == []
    assert (reader.prompt_tokens, reader.completion_tokens, reader.complete) == (prompt, completion, True)
    assert reader.finish() == []


def test_usage_reader_counts_cache_tokens_and_reads_events_without_names():
    reader = MessagesUsageReader()
    reader.event(None, orjson.dumps({"type": "message_start", "message": {"id": "msg_1", "usage": {
        "input_tokens": 10, "cache_read_input_tokens": 1000, "cache_creation_input_tokens": 200,
        "output_tokens": 1}}}))
    reader.event(None, b'{"type": "message_delta", "delta": {"stop_reason": "end_turn"}, '
                       b'"usage": {"output_tokens": 9}}')
    assert (reader.prompt_tokens, reader.cached_tokens, reader.completion_tokens) == (1210, 1000, 9)
    assert not reader.complete
    reader.event(None, b'{"type": "message_stop"}')
    assert reader.complete


def test_usage_reader_does_not_parse_text_deltas():
    reader = MessagesUsageReader()
    assert reader.event("content_block_delta", b"not even json") == []      # skipped by its name, unread
    with pytest.raises(GatewayError):
        reader.event("message_start", b"not json")


@pytest.mark.parametrize("message", [
    "prompt is too long: 215000 tokens > 200000 maximum",
    "input length and `max_tokens` exceed context limit: 197000 + 8192 > 200000, decrease input length or "
    "`max_tokens` and try again"])
def test_a_prompt_over_the_window_is_openais_context_length_exceeded(message):
    body = orjson.dumps({"type": "error", "error": {"type": "invalid_request_error", "message": message}})
    status, err = messages_error_to_chat(400, body)
    assert status == 400 and err["error"]["code"] == "context_length_exceeded"
    other = orjson.dumps({"type": "error", "error": {"type": "invalid_request_error", "message": "bad field"}})
    assert messages_error_to_chat(400, other)[1]["error"]["code"] is None
