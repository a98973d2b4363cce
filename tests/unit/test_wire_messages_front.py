"""fastgw.providers.wire.messages_front: the Anthropic Messages API in front of an OpenAI-format deployment.

Inputs are recorded wire samples in tests/data/wire/messages_front/ (each file names its source in `_source` or
in SSE comment lines). Outputs are checked against the real SDKs: Anthropic messages and stream events are
validated with the `anthropic` SDK's pydantic types, streams are read and accumulated by the SDK's own client
(talking to an in-memory transport that serves the translated bytes), and translated chat requests must be
accepted by the `openai` SDK's chat.completions.create, whose keyword arguments are OpenAI's parameters.
"""
import inspect
import re
from pathlib import Path

import anthropic
import httpx  # the openai SDK's HTTP client
import httpx2  # the anthropic SDK's
import openai
import orjson
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from anthropic.types.shared import ErrorResponse
from hypothesis import given, settings, strategies as st
from pydantic import TypeAdapter

from fastgw.errors import GatewayError
from fastgw.providers.wire.messages_front import (
    ChatToMessagesStream,
    chat_error_to_messages,
    chat_response_to_message,
    count_tokens_local,
    messages_request_to_chat,
)
from fastgw.tokens.exact import count_prompt, count_text, encoding_for_model

DATA = Path(__file__).parent.parent / "data" / "wire" / "messages_front"
CLIENT_MODEL = "claude-sonnet-4-5"   # what the Anthropic client asked for
UPSTREAM_MODEL = "gpt-4o-mini"       # the deployment's model
REQUESTS = sorted(p.stem for p in DATA.glob("request_*.json"))
STREAMS = {"text": ("stream_text.txt", "response_text.json"),
           "tool_calls": ("stream_tool_calls.txt", "response_tool_calls.json")}
EVENT = TypeAdapter(RawMessageStreamEvent)


def sample(name: str):
    return orjson.loads((DATA / name).read_bytes())


# -- the relay's job, done here as the relay will: split an event-stream body into events (WHATWG rules) -------

_EOL = re.compile(rb"\r\n|\r|\n")


class EventSplitter:
    """Lines end with CRLF, LF or CR; a blank line dispatches the event if it has data; `:` lines are comments;
    data lines are joined with LF; one space after the colon is dropped."""

    def __init__(self):
        self.buf, self.name, self.data = b"", None, []

    def feed(self, chunk: bytes) -> list[tuple[str | None, bytes]]:
        self.buf += chunk
        events = []
        while (m := _EOL.search(self.buf)) is not None:
            if m.group() == b"\r" and m.end() == len(self.buf):
                break  # maybe the first half of a CRLF split across chunks
            line, self.buf = self.buf[:m.start()], self.buf[m.end():]
            if not line:
                if self.data:
                    events.append((self.name, b"\n".join(self.data)))
                self.name, self.data = None, []
                continue
            if line.startswith(b":"):
                continue
            field, _, value = line.partition(b":")
            value = value[1:] if value.startswith(b" ") else value
            if field == b"data":
                self.data.append(value)
            elif field == b"event":
                self.name = value.decode()
        return events


def translate_stream(body: bytes, pieces=None) -> tuple[bytes, ChatToMessagesStream]:
    """The upstream body (in `pieces`, default whole) through the splitter and the translator."""
    translator, splitter, out = ChatToMessagesStream(CLIENT_MODEL), EventSplitter(), []
    for piece in pieces or [body]:
        for name, data in splitter.feed(piece):
            blocks = translator.event(name, data)
            assert all(b.endswith(b"\n\n") and b.startswith(b"event: ") for b in blocks)
            out += blocks
    out += translator.finish()
    return b"".join(out), translator


def client_events(sse: bytes) -> list[dict]:
    """The translated stream as an Anthropic client reads it: each block's `event:` name must be its type, and
    each event must validate as the SDK's RawMessageStreamEvent."""
    events = []
    for name, data in EventSplitter().feed(sse):
        event = orjson.loads(data)
        assert name == event["type"]
        if name == "ping":  # not one of the SDK's stream event types: its stream skips pings
            assert event == {"type": "ping"}
        elif name != "error":
            EVENT.validate_python(event)
        events.append(event)
    return events


def sdk_client(handler) -> anthropic.Anthropic:
    """The real anthropic SDK client, its HTTP served in memory by `handler` (the gateway's side)."""
    return anthropic.Anthropic(api_key="test", base_url="http://gateway.test", max_retries=0,
                               http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))


def sdk_final_message(sse: bytes) -> Message:
    """What `client.messages.stream(...).get_final_message()` makes of the translated stream."""
    client = sdk_client(lambda request: httpx2.Response(200, headers={"content-type": "text/event-stream"},
                                                        content=sse))
    with client.messages.stream(model=CLIENT_MODEL, max_tokens=1024,
                                messages=[{"role": "user", "content": "Hi"}]) as stream:
        for _ in stream:
            pass
        final = stream.get_final_message()
    return Message.model_validate(final.to_dict())


# -- requests ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", REQUESTS)
def test_request_translation(name):
    s = sample(f"{name}.json")
    assert messages_request_to_chat(s["request"], UPSTREAM_MODEL) == s["chat"]


@pytest.mark.parametrize("name", REQUESTS)
def test_samples_are_what_the_anthropic_sdk_sends(name):
    """Each recorded request is byte-for-byte the JSON the SDK sends for the same call (fields the installed SDK
    no longer declares, temperature and top_p, go through extra_body as a client would send them)."""
    request = sample(f"{name}.json")["request"]
    sent = []

    def handler(req):
        sent.append(orjson.loads(req.content))
        if b'"stream":true' in req.content:
            return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=b"")
        return httpx2.Response(200, json=chat_response_to_message(sample("response_text.json")["response"],
                                                                   CLIENT_MODEL))

    declared = inspect.signature(anthropic.resources.Messages.create).parameters
    kwargs = {k: v for k, v in request.items() if k in declared}
    extra = {k: v for k, v in request.items() if k not in declared}
    result = sdk_client(handler).messages.create(**kwargs, extra_body=extra or None)
    if hasattr(result, "close"):
        result.close()
    assert sent == [request]


@pytest.mark.parametrize("name", REQUESTS)
def test_translated_requests_are_openai_parameters(name):
    """The openai SDK's create() takes OpenAI's parameters as keyword arguments (an unknown one is a TypeError)
    and sends them as they are."""
    chat = sample(f"{name}.json")["chat"]
    sent = []

    def handler(req):
        sent.append(orjson.loads(req.content))
        return httpx.Response(500)

    client = openai.OpenAI(api_key="test", base_url="http://upstream.test/v1", max_retries=0,
                           http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(**chat)
    assert sent == [chat]


def test_tool_choice_and_options():
    base = {"model": CLIENT_MODEL, "max_tokens": 100, "messages": [{"role": "user", "content": "Hi"}],
            "tools": [{"name": "f", "input_schema": {"type": "object"}, "strict": True, "type": "custom",
                       "cache_control": {"type": "ephemeral"}}]}

    def chat(**fields):
        return messages_request_to_chat({**base, **fields}, UPSTREAM_MODEL)

    assert chat()["tools"] == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"},
                                                                 "strict": True}}]
    assert chat(tool_choice={"type": "auto"})["tool_choice"] == "auto"
    assert "parallel_tool_calls" not in chat(tool_choice={"type": "auto"})
    assert chat(tool_choice={"type": "any"})["tool_choice"] == "required"
    assert chat(tool_choice={"type": "none"})["tool_choice"] == "none"
    named = chat(tool_choice={"type": "tool", "name": "f", "disable_parallel_tool_use": True})
    assert named["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert named["parallel_tool_calls"] is False
    # hints that change nothing in the answer are dropped; so are null fields and a disabled thinking
    dropped = chat(cache_control={"type": "ephemeral"}, thinking={"type": "disabled"}, top_k=None, stream=False)
    assert dropped == chat()
    assert chat(thinking={"type": "adaptive"}) == chat()
    assert chat(service_tier="standard_only")["service_tier"] == "default"
    assert chat(output_config={"effort": "high"})["reasoning_effort"] == "high"
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"],
              "additionalProperties": False}
    assert chat(output_config={"format": {"type": "json_schema", "schema": schema}})["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": True}}


def test_assistant_turn_with_only_thinking_still_has_content():
    """OpenAI refuses an assistant message with neither content nor tool_calls."""
    body = {"messages": [{"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "EmwKAhgBEgy"}]},
                         {"role": "user", "content": "Go on"}]}
    assert messages_request_to_chat(body, UPSTREAM_MODEL)["messages"][1] == {"role": "assistant", "content": ""}


# The requests an OpenAI chat deployment cannot serve: (field to set or message content, the param named).
WEB_SEARCH = {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}
TOOL = {"name": "w", "input_schema": {"type": "object"}}
PDF = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0x"}}
REFUSED = [
    ({"top_k": 5}, "top_k"),
    ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, "thinking"),
    ({"tools": [TOOL, WEB_SEARCH]}, "tools[1].type"),
    ({"tools": [dict(TOOL, input_examples=[{"a": 1}])]}, "tools[0].input_examples"),
    ({"metadata": {"user_id": "u", "team": "x"}}, "metadata.team"),
    ({"container": "container_011CZkZaBF1tNoB5wlCeusgy"}, "container"),
    ({"mcp_servers": [{"type": "url", "url": "https://example.com/sse", "name": "x"}]}, "mcp_servers"),
    ({"messages": [{"role": "user", "content": [PDF]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "see"},
        {"type": "search_result", "source": "https://x", "title": "t", "content": [{"type": "text", "text": "x"}]}]}]},
     "messages[0].content[1].type"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "file", "file_id": "file_011CNha8iCJcU1wXNR6q4V8w"}}]}]},
     "messages[0].content[0].source.type"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}]}]},
     "messages[0].content[0].content[0].type"),
    ({"messages": [{"role": "assistant", "content": [
        {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "q"}}]}]},
     "messages[0].content[0].type"),
    ({"system": [{"type": "text", "text": "a"}, PDF]}, "system[1].type"),
    ({"output_config": {"format": {"type": "regex", "pattern": "a+"}}}, "output_config.format"),
]


@pytest.mark.parametrize("fields,param", REFUSED, ids=[p for _, p in REFUSED])
def test_unsupported_fields_are_400s_naming_the_field(fields, param):
    body = {"model": CLIENT_MODEL, "max_tokens": 100, "messages": [{"role": "user", "content": "Hi"}], **fields}
    with pytest.raises(GatewayError) as err:
        messages_request_to_chat(body, UPSTREAM_MODEL)
    assert (err.value.status, err.value.code, err.value.param) == (400, "unsupported_parameter", param)
    assert param in err.value.message
    assert orjson.loads(err.value.body())["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("body,param", [
    ({"max_tokens": 1}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}, "messages[0].content[0].text"),
    ({"messages": [], "stop_sequences": "END"}, "stop_sequences"),
    ({"messages": [], "tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
    ({"messages": [], "service_tier": ["auto"]}, "service_tier"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_malformed_requests_are_400s(body, param):
    with pytest.raises(GatewayError) as err:
        messages_request_to_chat(body, UPSTREAM_MODEL)
    assert (err.value.status, err.value.param) == (400, param)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                        st.sampled_from(["type", "role", "content", "text", "messages", "system", "tools",
                                         "tool_choice", "source", "name", "input", "tool_use_id", "metadata",
                                         "choices", "message", "delta", "tool_calls", "function", "arguments",
                                         "index", "finish_reason", "usage", "error", "id"]), inner, max_size=4),
                    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_any_json_is_translated_or_refused_never_a_crash(value):
    for call, status in ((lambda: messages_request_to_chat(value, UPSTREAM_MODEL), 400),
                         (lambda: chat_response_to_message(value, CLIENT_MODEL), 502),
                         (lambda: ChatToMessagesStream(CLIENT_MODEL).event(None, orjson.dumps(value)), 502)):
        try:
            call()
        except GatewayError as err:
            assert err.status == status


# -- responses -----------------------------------------------------------------------------------------

def test_text_response():
    message = chat_response_to_message(sample("response_text.json")["response"], CLIENT_MODEL)
    Message.model_validate(message)
    assert message == {
        "id": "msg_B9MBs8CjcvOU2jLn4n570S5qMJKcT", "type": "message", "role": "assistant", "model": CLIENT_MODEL,
        "content": [{"type": "text", "text": "Hello! How can I assist you today?"}],
        "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 19, "output_tokens": 10, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0}}


def test_tool_calls_response_and_cached_tokens():
    message = chat_response_to_message(sample("response_tool_calls.json")["response"], CLIENT_MODEL)
    Message.model_validate(message)
    assert message["content"] == [
        {"type": "tool_use", "id": "call_12345xyz", "name": "get_weather", "input": {"location": "San Francisco, CA"}},
        {"type": "tool_use", "id": "call_67890abc", "name": "get_weather", "input": {"location": "Paris, France"}}]
    assert message["stop_reason"] == "tool_use"
    # 1290 prompt tokens of which 1152 were read from the cache
    assert message["usage"] == {"input_tokens": 138, "output_tokens": 46, "cache_creation_input_tokens": 0,
                                "cache_read_input_tokens": 1152}


def test_response_through_the_sdk():
    message = chat_response_to_message(sample("response_tool_calls.json")["response"], CLIENT_MODEL)
    client = sdk_client(lambda request: httpx2.Response(200, json=message))
    got = client.messages.create(model=CLIENT_MODEL, max_tokens=10, messages=[{"role": "user", "content": "Hi"}])
    assert got.content[1].input == {"location": "Paris, France"} and got.usage.cache_read_input_tokens == 1152


def _response(finish, content="Hi", calls=None, refusal=None):
    message = {"role": "assistant", "content": content, "refusal": refusal}
    if calls is not None:
        message["tool_calls"] = calls
    return {"id": "chatcmpl-1", "choices": [{"index": 0, "message": message, "finish_reason": finish}]}


CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize("finish,calls,stop_reason", [
    ("stop", None, "end_turn"), ("length", None, "max_tokens"), ("content_filter", None, "refusal"),
    ("tool_calls", [CALL], "tool_use"),
    ("stop", [CALL], "tool_use"),          # Ollama and others say "stop" when they call tools
    ("length", [CALL], "max_tokens"),      # a call cut short is not a call to run
    ("something_new", None, "end_turn"),
])
def test_stop_reasons(finish, calls, stop_reason):
    assert chat_response_to_message(_response(finish, calls=calls), CLIENT_MODEL)["stop_reason"] == stop_reason


@pytest.mark.parametrize("arguments,input_", [
    ('{"a": [1, 2]}', {"a": [1, 2]}),
    ("", {}),                              # a call without arguments
    ('{"a": 1', {"_raw": '{"a": 1'}),      # the model's broken JSON, kept for the tool to reject
    ("[1, 2]", {"_raw": "[1, 2]"}),        # input must be an object
    ({"a": 1}, {"a": 1}),                  # servers that send the object itself
])
def test_tool_call_arguments(arguments, input_):
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    message = chat_response_to_message(_response("tool_calls", content=None, calls=[call]), CLIENT_MODEL)
    Message.model_validate(message)
    assert message["content"] == [{"type": "tool_use", "id": "call_1", "name": "f", "input": input_}]


def test_refusal_is_text_and_missing_usage_is_zero():
    message = chat_response_to_message(_response("content_filter", content=None, refusal="I can't help."),
                                       CLIENT_MODEL)
    Message.model_validate(message)
    assert message["content"] == [{"type": "text", "text": "I can't help."}]
    assert message["stop_reason"] == "refusal"
    assert message["usage"]["input_tokens"] == message["usage"]["output_tokens"] == 0


@pytest.mark.parametrize("resp", [
    [], {}, {"choices": []}, {"choices": [{"message": "Hi"}]},
    {"choices": [{"message": {"tool_calls": [{"function": {"arguments": "{}"}}]}}]},
    {"choices": [{"message": {"tool_calls": {"id": "x"}}}]},
], ids=["list", "empty", "no-choices", "message-not-object", "call-without-name", "tool-calls-not-array"])
def test_malformed_responses_are_502s(resp):
    with pytest.raises(GatewayError) as err:
        chat_response_to_message(resp, CLIENT_MODEL)
    assert (err.value.status, err.value.type, err.value.code) == (502, "upstream_error", "upstream_malformed")


# -- streams -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", STREAMS)
def test_stream_accumulates_to_the_non_stream_translation(name):
    stream_file, response_file = STREAMS[name]
    sse, translator = translate_stream((DATA / stream_file).read_bytes())
    client_events(sse)
    expected = Message.model_validate(chat_response_to_message(sample(response_file)["response"], CLIENT_MODEL))
    assert sdk_final_message(sse).model_dump() == expected.model_dump()
    assert translator.complete


def test_text_stream_events_in_order():
    sse, _ = translate_stream((DATA / "stream_text.txt").read_bytes())
    events = client_events(sse)
    assert [e["type"] for e in events] == (["message_start", "ping", "content_block_start"]
                                           + ["content_block_delta"] * 9
                                           + ["content_block_stop", "message_delta", "message_stop"])
    start = events[0]["message"]
    assert start["id"] == "msg_B9MBs8CjcvOU2jLn4n570S5qMJKcT" and start["model"] == CLIENT_MODEL
    assert start["usage"]["input_tokens"] == 0  # not known before the usage chunk at the end
    assert events[2] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert events[3] == {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}
    assert events[-2] == {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                          "usage": {"input_tokens": 19, "output_tokens": 10, "cache_creation_input_tokens": 0,
                                    "cache_read_input_tokens": 0}}


def test_each_text_delta_goes_out_in_the_same_call_and_message_delta_waits_for_usage():
    translator = ChatToMessagesStream(CLIENT_MODEL)
    events = EventSplitter().feed((DATA / "stream_text.txt").read_bytes())
    out = [translator.event(name, data) for name, data in events]
    types = [[orjson.loads(b.split(b"\ndata: ", 1)[1])["type"] for b in blocks] for blocks in out]
    assert types[1] == ["content_block_start", "content_block_delta"]  # the first text, at once
    assert types[2] == ["content_block_delta"]
    assert types[-3] == ["content_block_stop"]                         # finish_reason: no usage yet
    assert types[-2] == ["message_delta"]                              # the usage chunk
    assert types[-1] == ["message_stop"]                               # [DONE]
    assert (translator.prompt_tokens, translator.completion_tokens, translator.complete) == (19, 10, True)
    assert translator.finish() == []


def test_tool_stream_usage_and_blocks():
    sse, translator = translate_stream((DATA / "stream_tool_calls.txt").read_bytes())
    events = client_events(sse)
    starts = [e for e in events if e["type"] == "content_block_start"]
    assert [(e["index"], e["content_block"]["id"]) for e in starts] == [(0, "call_12345xyz"), (1, "call_67890abc")]
    assert all(e["content_block"]["input"] == {} for e in starts)
    assert (translator.prompt_tokens, translator.completion_tokens) == (1290, 46)  # OpenAI's terms, cache included


@pytest.mark.parametrize("name", STREAMS)
def test_stream_split_at_every_byte_boundary(name):
    body = (DATA / STREAMS[name][0]).read_bytes()
    whole, _ = translate_stream(body)
    for k in range(1, len(body)):
        assert translate_stream(body, [body[:k], body[k:]])[0] == whole, k


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(sorted(STREAMS)), st.lists(st.integers(min_value=0, max_value=4000), max_size=40),
       st.booleans())
def test_stream_split_anywhere_with_any_line_endings(name, cuts, crlf):
    body = (DATA / STREAMS[name][0]).read_bytes()
    if crlf:  # WHATWG allows CRLF; cutting between CR and LF must not end a line twice
        body = body.replace(b"\n", b"\r\n")
    whole, _ = translate_stream(body)
    edges = [0, *sorted(c % (len(body) + 1) for c in cuts), len(body)]
    assert translate_stream(body, [body[a:b] for a, b in zip(edges, edges[1:])])[0] == whole


def test_error_event_mid_stream():
    sse, translator = translate_stream((DATA / "stream_error.txt").read_bytes())
    events = client_events(sse)
    assert [e["type"] for e in events][-2:] == ["content_block_delta", "error"]
    assert events[-1] == {"type": "error", "error": {
        "type": "api_error", "message": "The server had an error while processing your request. Sorry about that!"}}
    ErrorResponse.model_validate(events[-1])
    assert not translator.complete and translator.finish() == []
    # the SDK raises on it, with the body
    client = sdk_client(lambda request: httpx2.Response(200, headers={"content-type": "text/event-stream"},
                                                        content=sse))
    with pytest.raises(anthropic.APIStatusError) as err:
        with client.messages.stream(model=CLIENT_MODEL, max_tokens=10,
                                    messages=[{"role": "user", "content": "Hi"}]) as stream:
            for _ in stream:
                pass
    assert err.value.body == events[-1]
    assert translator.event(None, b"[DONE]") == []  # nothing after an error


def _chunk(delta=None, finish=None, usage=None, choices=True):
    chunk = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}] if choices else []}
    if usage is not None:
        chunk["usage"] = usage
    return orjson.dumps(chunk)


def _run(*datas) -> tuple[list[dict], ChatToMessagesStream]:
    translator = ChatToMessagesStream(CLIENT_MODEL)
    blocks = [b for data in datas for b in translator.event(None, data)] + translator.finish()
    return client_events(b"".join(blocks)), translator


def test_done_without_usage_still_ends_the_message():
    events, translator = _run(_chunk({"role": "assistant", "content": "Hi"}), _chunk(finish="stop"), b"[DONE]")
    assert [e["type"] for e in events][-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert events[-2]["usage"]["output_tokens"] == 0
    assert (translator.prompt_tokens, translator.completion_tokens, translator.complete) == (-1, -1, True)


def test_usage_in_the_finish_chunk_sends_message_delta_at_once():
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    translator = ChatToMessagesStream(CLIENT_MODEL)
    translator.event(None, _chunk({"content": "Hi"}))
    out = translator.event(None, _chunk(finish="length", usage=usage))
    assert b"event: message_delta" in out[-1] and b'"stop_reason":"max_tokens"' in out[-1]


def test_broken_stream_is_not_complete():
    events, translator = _run(_chunk({"content": "Hi"}))
    assert events[-1]["type"] == "content_block_delta"
    assert not translator.complete


def test_text_then_tool_call_and_stop_means_tool_use():
    events, _ = _run(
        _chunk({"role": "assistant", "content": "Let me look."}),
        _chunk({"tool_calls": [{"index": 0, "id": "call_9", "type": "function",
                                "function": {"name": "f", "arguments": '{"q":'}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": ' "x"}'}}]}),
        _chunk(finish="stop"), _chunk(choices=False, usage={"prompt_tokens": 3, "completion_tokens": 4}), b"[DONE]")
    message = Message.model_validate(sdk_final_message(b"".join(
        b"event: %s\ndata: %s\n\n" % (e["type"].encode(), orjson.dumps(e)) for e in events)).model_dump())
    assert [b.type for b in message.content] == ["text", "tool_use"]
    assert message.content[1].input == {"q": "x"}
    assert message.stop_reason == "tool_use"


@pytest.mark.parametrize("data", [
    b"not json", b"[1]", _chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
    orjson.dumps({"choices": [{"index": 0, "delta": "x"}]}), orjson.dumps({"choices": {"index": 0}}),
], ids=["not-json", "not-object", "call-without-name", "delta-not-object", "choices-not-array"])
def test_malformed_stream_events_are_502s(data):
    with pytest.raises(GatewayError) as err:
        ChatToMessagesStream(CLIENT_MODEL).event(None, data)
    assert (err.value.status, err.value.code) == (502, "upstream_malformed")


def test_a_tool_call_resumed_after_another_is_a_502():
    translator = ChatToMessagesStream(CLIENT_MODEL)
    for index in (0, 1):
        translator.event(None, _chunk({"tool_calls": [{"index": index, "id": f"c{index}", "type": "function",
                                                       "function": {"name": "f", "arguments": ""}}]}))
    with pytest.raises(GatewayError) as err:
        translator.event(None, _chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}))
    assert err.value.code == "upstream_malformed"


# -- errors --------------------------------------------------------------------------------------------

ERRORS = sample("errors.json")["cases"]


@pytest.mark.parametrize("case", ERRORS, ids=[f"{c['status']}-{c['type']}" for c in ERRORS])
def test_errors(case):
    status, body = chat_error_to_messages(case["status"], case["body"].encode())
    assert (status, body) == (case["status"], {"type": "error", "error": {"type": case["type"],
                                                                          "message": case["message"]}})
    if case["type"] != "request_too_large":  # documented by Anthropic, not (yet) in the SDK's union of types
        ErrorResponse.model_validate(body)
    # the SDK raises the error of that status and keeps the body
    client = sdk_client(lambda request: httpx2.Response(status, json=body))
    with pytest.raises(anthropic.APIStatusError) as err:
        client.messages.create(model=CLIENT_MODEL, max_tokens=10, messages=[{"role": "user", "content": "Hi"}])
    assert err.value.status_code == status and err.value.body == body
    assert case["message"].strip() in str(err.value)


def test_gateway_errors_translate():
    refusal = GatewayError(400, "`top_k` has no equivalent", param="top_k", code="unsupported_parameter")
    assert chat_error_to_messages(refusal.status, refusal.body()) == (
        400, {"type": "error", "error": {"type": "invalid_request_error", "message": "`top_k` has no equivalent"}})


# -- count_tokens --------------------------------------------------------------------------------------

def test_count_tokens_by_hand():
    encoding = encoding_for_model("gpt-4o")
    body = {"model": CLIENT_MODEL, "system": "Be brief.", "messages": [{"role": "user", "content": "Hello, world"}]}
    # cookbook formula: 3 per message + its role and content + 3 to prime the reply
    expected = 3 + (3 + count_text("system", encoding) + count_text("Be brief.", encoding)) + (
        3 + count_text("user", encoding) + count_text("Hello, world", encoding))
    assert count_tokens_local(body, "gpt-4o") == {"input_tokens": expected}


@pytest.mark.parametrize("name", REQUESTS)
def test_count_tokens_counts_the_translated_prompt_as_count_prompt_does(name):
    request = sample(f"{name}.json")["request"]
    chat = messages_request_to_chat(request, UPSTREAM_MODEL)
    expected = count_prompt(orjson.dumps(chat), "/v1/chat/completions", UPSTREAM_MODEL)
    # count_tokens requests carry no max_tokens; sampling and thinking fields do not change the prompt
    body = {k: v for k, v in request.items() if k != "max_tokens"} | {"thinking": {"type": "enabled",
                                                                                   "budget_tokens": 2048}}
    assert count_tokens_local(body, UPSTREAM_MODEL) == {"input_tokens": expected} and expected > 0


def test_count_tokens_refuses_what_it_cannot_translate():
    with pytest.raises(GatewayError) as err:
        count_tokens_local({"messages": [{"role": "user", "content": [PDF]}]}, UPSTREAM_MODEL)
    assert err.value.code == "unsupported_parameter"
