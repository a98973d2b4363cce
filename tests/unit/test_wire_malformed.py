"""The wire translations given JSON of a shape they do not expect (a list where a string goes, a count out of
range, nesting deeper than orjson writes): a translation or a GatewayError naming the fault, never another
exception. Cases the fuzzers found (tests/fuzz, wire_*) or the review of their findings did; each is also in
the fuzz corpus."""
import time

import orjson
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import TypeAdapter

from fastgw.errors import GatewayError
from fastgw.protocol.http import HEAD, RequestParser
from fastgw.providers.anthropic import MESSAGES_PASS_THROUGH
from fastgw.providers.json_body import token_count
from fastgw.providers.wire.anthropic_chat import (
    MessagesToChatStream, chat_request_to_messages, messages_response_to_chat)
from fastgw.providers.wire.encode import client_json, upstream_json
from fastgw.providers.wire.gemini_chat import GeminiToChatStream, chat_request_to_gemini, gemini_response_to_chat
from fastgw.providers.wire.messages_front import (
    ChatToMessagesStream, chat_error_to_messages, chat_response_to_message, messages_request_to_chat)
from fastgw.proxy.exchange import Exchange

USER = [{"role": "user", "content": "hi"}]


def nested(depth: int):
    value = []
    for _ in range(depth - 1):
        value = [value]
    return value


def refused(call, *args):
    with pytest.raises(GatewayError) as info:
        call(*args)
    return info.value


# -- requests: 400, naming the field --------------------------------------------------------------------------


@pytest.mark.parametrize("body,param", [
    # a content part whose type is an object (the fuzzer's first wire finding: TypeError, unhashable)
    ({"messages": [{"role": "user", "content": [{"type": {}}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "system", "content": [{"type": ["text"]}]}]}, "messages[0].content[0].type"),
])
def test_anthropic_request_part_type_not_a_string(body, param):
    e = refused(chat_request_to_messages, body, "claude", 1024)
    assert (e.status, e.param) == (400, param)


@pytest.mark.parametrize("extra,param", [
    ({"reasoning_effort": ["high"]}, "reasoning_effort"),
    ({"tool_choice": {"type": "function", "function": ["f"]}}, "tool_choice"),
    ({"tool_choice": {"type": "allowed_tools", "allowed_tools": ["x"]}}, "tool_choice"),
    ({"tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": ["auto"], "tools": []}}}, "tool_choice"),
    ({"tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": 7}}}, "tool_choice"),
    ({"tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto",
                                                                 "tools": [{"type": "function", "function": 1}]}}},
     "tool_choice"),
])
def test_gemini_request_values_of_the_wrong_type(extra, param):
    e = refused(chat_request_to_gemini, {"messages": USER, **extra})
    assert (e.status, e.param) == (400, param)


def test_gemini_request_audio_format_and_signature_of_the_wrong_type():
    audio = {"type": "input_audio", "input_audio": {"format": ["wav"], "data": "AAAA"}}
    e = refused(chat_request_to_gemini, {"messages": [{"role": "user", "content": [audio]}]})
    assert (e.status, e.param) == (400, "messages[0].content[0].input_audio")
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}, "extra_content": ["x"]}
    out = chat_request_to_gemini({"messages": USER + [{"role": "assistant", "tool_calls": [call]}]})
    assert out["contents"][1]["parts"] == [{"functionCall": {"name": "f", "args": {}}}]   # no signature to send


def test_request_nested_deeper_than_orjson_writes_is_a_400():
    deep = {"type": "object", "properties": {"x": nested(300)}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": deep}}]
    body = chat_request_to_messages({"messages": USER, "tools": tools}, "claude", 1024)
    e = refused(client_json, body)
    assert (e.status, e.code) == (400, "invalid_value") and "254" in e.message
    call = {"type": "tool_use", "id": "t", "name": "f", "input": {"x": nested(300)}}
    e = refused(messages_request_to_chat, {"messages": [{"role": "assistant", "content": [call]}]}, "gpt")
    assert e.status == 400


# -- answers: a translation the SDK types accept, or 502 ---------------------------------------------------------


def test_anthropic_answer_with_an_odd_stop_reason_and_deep_tool_input():
    msg = {"id": "m", "content": [{"type": "text", "text": "hi"}], "usage": {"input_tokens": 1},
           "stop_reason": ["end_turn"]}
    ChatCompletion.model_validate(messages_response_to_chat(msg, "claude"))
    msg["content"] = [{"type": "tool_use", "id": "t", "name": "f", "input": {"a": nested(300)}}]
    assert refused(messages_response_to_chat, msg, "claude").code == "upstream_malformed"


@pytest.mark.parametrize("count", [-1, 2**53, 2**64 - 1, True, 1.5, "3"])
def test_token_counts_out_of_range_are_malformed_or_unknown(count):
    msg = {"id": "m", "content": [], "usage": {"input_tokens": count}}
    assert refused(messages_response_to_chat, msg, "claude").status == 502
    resp = {"candidates": [{"content": {"parts": [{"text": "x"}]}, "finishReason": ["STOP"]}],
            "usageMetadata": {"promptTokenCount": count}}
    assert refused(gemini_response_to_chat, resp, "gemini").status == 502
    chat = {"choices": [{"message": {"content": "x"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": count}}
    out = chat_response_to_message(chat, "claude")
    Message.model_validate(out)
    assert out["usage"]["input_tokens"] == 0
    assert token_count(count) == 0


def test_gemini_answer_with_an_odd_finish_reason():
    resp = {"candidates": [{"content": {"parts": [{"text": "x"}]}, "finishReason": {"r": 1}}]}
    out = gemini_response_to_chat(resp, "gemini")
    ChatCompletion.model_validate(out)
    assert out["choices"][0]["finish_reason"] == "stop"


def test_chat_answer_with_a_tool_call_id_that_is_not_a_string():
    chat = {"choices": [{"message": {"tool_calls": [{"id": ["x"], "function": {"name": "f", "arguments": "{}"}}]},
                         "finish_reason": "tool_calls"}]}
    out = chat_response_to_message(chat, "claude")
    Message.model_validate(out)
    assert out["content"][0]["id"] == "call_0"


def test_an_error_nested_deeper_than_python_recurses():
    body = b'{"error":' * 1000 + b'"deep"' + b"}" * 1000
    assert chat_error_to_messages(500, body)[1]["error"]["message"] == "deep"


def test_passed_through_usage_out_of_range_counts_nothing():
    # Found by fuzzing: the Messages API pass-through read usage with int(), so a count past int64 raised
    # OverflowError (and "x" ValueError) after the answer had been relayed.
    p = RequestParser()
    p.feed(b"POST /v1/messages HTTP/1.1\r\nhost: gw\r\ncontent-length: 0\r\n\r\n")
    assert p.next_event() == HEAD
    ex = Exchange("r", "127.0.0.1", b"POST", "/v1/messages", p, time.perf_counter())
    ex.endpoint = "/v1/messages"
    body = b'{"usage":{"input_tokens":18446744073709551615,"cache_read_input_tokens":"x","output_tokens":2}}'
    assert MESSAGES_PASS_THROUGH.response_body(ex, 200, body) == body
    assert (ex.prompt_tokens, ex.completion_tokens) == (0, 2)


# -- streams ------------------------------------------------------------------------------------------------------

_EVENT = TypeAdapter(RawMessageStreamEvent)


def chat_chunks(blocks):
    for block in blocks:
        obj = orjson.loads(block.removeprefix(b"data: "))
        if "error" not in obj:
            ChatCompletionChunk.model_validate(obj)


def test_anthropic_stream_events_of_odd_shapes():
    s = MessagesToChatStream("claude", True)
    start = {"type": "message_start", "message": {"id": "m", "usage": {"input_tokens": 1}}}
    chat_chunks(s.event("message_start", orjson.dumps(start)))
    # a text block whose text is not a string: nothing to send (was a chunk whose content was a list)
    assert s.event(None, b'{"type":"content_block_start","index":0,"content_block":{"type":"text","text":[1]}}') == []
    # a delta whose index is a list (was TypeError: unhashable)
    assert s.event(None, b'{"type":"content_block_delta","index":[0],'
                         b'"delta":{"type":"input_json_delta","partial_json":"{"}}') == []
    # an error whose type is an object (was TypeError: unhashable)
    blocks = s.event("error", b'{"type":"error","error":{"type":{},"message":"boom"}}')
    assert orjson.loads(blocks[0][6:])["error"]["message"].endswith("boom")


def test_gemini_stream_with_an_odd_finish_reason_and_deep_args():
    s = GeminiToChatStream("gemini", False)
    chat_chunks(s.event(None, b'{"candidates":[{"content":{"parts":[{"text":"x"}]},"finishReason":[1]}]}'))
    s = GeminiToChatStream("gemini", False)
    deep = (b'{"candidates":[{"content":{"parts":[{"functionCall":{"name":"f","args":{"a":' + b"[" * 300
            + b"]" * 300 + b"}}}]}}]}")
    assert refused(s.event, None, deep).code == "upstream_malformed"


def test_chat_stream_tool_call_id_and_usage_of_odd_types():
    s = ChatToMessagesStream("claude")
    chunk = {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": {"x": 1},
                                                                 "function": {"name": "f", "arguments": ""}}]}}],
             "usage": {"prompt_tokens": -5, "completion_tokens": 2**64 - 1}}
    for block in s.event(None, orjson.dumps(chunk)):
        name, data = block.split(b"\n")[:2]
        event = orjson.loads(data.removeprefix(b"data: "))
        if event["type"] != "ping":
            _EVENT.validate_python(event)
        if event["type"] == "content_block_start":
            assert event["content_block"]["id"] == "call_0"
    assert (s.prompt_tokens, s.completion_tokens) == (-1, -1)
    assert upstream_json({"ok": 1}) == b'{"ok":1}'
