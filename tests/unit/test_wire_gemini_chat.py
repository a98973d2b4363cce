"""fastgw.providers.wire.gemini_chat: OpenAI Chat Completions <-> the Gemini API (v1beta).

The Gemini side is recorded wire data (tests/data/wire/gemini/, README.md there says where each shape comes
from); the OpenAI side is checked with the real `openai` SDK types and its own stream accumulator."""
import pathlib
import re

import openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.shared import ErrorObject

from fastgw.errors import GatewayError
from fastgw.providers.wire.gemini_chat import (GeminiToChatStream, chat_request_to_gemini, gemini_error_to_chat,
                                               gemini_response_to_chat)

DATA = pathlib.Path(__file__).resolve().parent.parent / "data" / "wire" / "gemini"


def load(name):
    return orjson.loads((DATA / name).read_bytes())


def refused(body, status=400):
    with pytest.raises(GatewayError) as info:
        chat_request_to_gemini(body)
    assert info.value.status == status
    return info.value


USER = {"role": "user", "content": "Hi"}

# ------------------------------------------------------------------------------------------------ request


def test_roles_system_instruction_and_generation_config():
    body = {
        "model": "gemini-2.5-flash", "stream": False, "user": "u-1", "store": False, "metadata": {"a": "b"},
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in English."}]},
            {"role": "user", "content": "Hi", "name": "ann"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": [{"type": "text", "text": "Sky colour?"}]},
        ],
        "max_tokens": 100, "temperature": 0.2, "top_p": 0.9, "top_k": 40, "stop": "END", "n": 2, "seed": 7,
        "presence_penalty": 0.5, "frequency_penalty": -0.5,
    }
    assert chat_request_to_gemini(body) == {
        "systemInstruction": {"parts": [{"text": "Be brief."}, {"text": "Answer in English."}]},
        "contents": [
            {"role": "user", "parts": [{"text": "Hi"}]},
            {"role": "model", "parts": [{"text": "Hello!"}]},
            {"role": "user", "parts": [{"text": "Sky colour?"}]},
        ],
        "generationConfig": {
            "maxOutputTokens": 100, "temperature": 0.2, "topP": 0.9, "topK": 40, "stopSequences": ["END"],
            "candidateCount": 2, "seed": 7, "presencePenalty": 0.5, "frequencyPenalty": -0.5,
        },
    }


def test_max_completion_tokens_wins_and_stop_list_and_no_config_when_nothing_set():
    out = chat_request_to_gemini({"messages": [USER], "max_tokens": 5, "max_completion_tokens": 50,
                                  "stop": ["a", "b"]})
    assert out["generationConfig"] == {"maxOutputTokens": 50, "stopSequences": ["a", "b"]}
    assert chat_request_to_gemini({"messages": [USER]}) == {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]}


def test_consecutive_turns_of_one_role_merge_and_empty_turns_vanish():
    out = chat_request_to_gemini({"messages": [
        {"role": "user", "content": "one"}, {"role": "user", "content": "two"},
        {"role": "assistant", "content": ""}, {"role": "user", "content": "three"},
        {"role": "assistant", "content": None, "tool_calls": []}, {"role": "assistant", "content": "four"},
    ]})
    assert out["contents"] == [
        {"role": "user", "parts": [{"text": "one"}, {"text": "two"}, {"text": "three"}]},
        {"role": "model", "parts": [{"text": "four"}]},
    ]


def test_user_media_parts():
    content = [
        {"type": "text", "text": "Compare:"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "https://example.test/cat.JPG?size=large#top"}},
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
        {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"}},
    ]
    out = chat_request_to_gemini({"messages": [{"role": "user", "content": content}]})
    assert out["contents"][0]["parts"] == [
        {"text": "Compare:"},
        {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
        {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.test/cat.JPG?size=large#top"}},
        {"inlineData": {"mimeType": "audio/wav", "data": "UklGRg=="}},
        {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0="}},
    ]


@pytest.mark.parametrize("part, param", [
    ({"type": "image_url", "image_url": {"url": "https://example.test/image"}}, "messages[0].content[0].image_url.url"),
    ({"type": "image_url", "image_url": {"url": "https://example.test/a.png/x"}},
     "messages[0].content[0].image_url.url"),
    ({"type": "image_url", "image_url": {"url": "data:image/png,%89PNG"}}, "messages[0].content[0].image_url.url"),
    ({"type": "image_url", "image_url": {"url": "ftp://example.test/a.png"}}, "messages[0].content[0].image_url.url"),
    ({"type": "file", "file": {"file_id": "file-abc"}}, "messages[0].content[0].file"),
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "flac"}}, "messages[0].content[0].input_audio"),
    ({"type": "video_url", "video_url": {"url": "https://example.test/a.mp4"}}, "messages[0].content[0]"),
])
def test_user_media_parts_gemini_cannot_take_are_400_naming_the_part(part, param):
    error = refused({"messages": [{"role": "user", "content": [part]}]})
    assert error.param == param and param in error.message


def test_tools_tool_calls_and_tool_results():
    weather = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
               "additionalProperties": False}
    body = {
        "messages": [
            {"role": "user", "content": "Weather in Paris and Tokyo?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_0", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                 "extra_content": {"google": {"thought_signature": "c2lnMQ=="}}},
                {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": ""}},
            ]},
            {"role": "tool", "tool_call_id": "call_0", "content": '{"temp_c": 21}'},
            {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "12:00"}]},
            {"role": "assistant", "content": "Checking Tokyo.", "tool_calls": [
                {"id": "call_0", "type": "function", "function": {"name": "get_forecast", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_0", "content": "[1, 2]"},
        ],
        "tools": [
            {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                              "parameters": weather, "strict": True}},
            {"type": "function", "function": {"name": "get_time"}},
        ],
        "tool_choice": "auto", "parallel_tool_calls": True,
    }
    out = chat_request_to_gemini(body)
    assert out["tools"] == [{"functionDeclarations": [
        {"name": "get_weather", "description": "Current weather", "parametersJsonSchema": weather},
        {"name": "get_time"},
    ]}]
    assert out["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}
    assert out["contents"][1:] == [
        {"role": "model", "parts": [
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "c2lnMQ=="},
            {"functionCall": {"name": "get_time", "args": {}}},
        ]},
        {"role": "user", "parts": [
            {"functionResponse": {"name": "get_weather", "response": {"temp_c": 21}}},
            {"functionResponse": {"name": "get_time", "response": {"content": "12:00"}}},
        ]},
        {"role": "model", "parts": [{"text": "Checking Tokyo."},
                                    {"functionCall": {"name": "get_forecast", "args": {}}}]},
        # call_0 again: the name comes from the latest assistant message that declared it
        {"role": "user", "parts": [{"functionResponse": {"name": "get_forecast", "response": {"content": "[1, 2]"}}}]},
    ]


def test_tool_message_errors():
    call = {"role": "assistant", "tool_calls": [
        {"id": "call_9", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}
    error = refused({"messages": [USER, call]})
    assert error.param == "messages[1].tool_calls[0].function.arguments"
    error = refused({"messages": [USER, {"role": "tool", "tool_call_id": "call_1", "content": "x"}]})
    assert error.param == "messages[1].tool_call_id"
    error = refused({"messages": [USER, {"role": "tool", "tool_call_id": ["x"], "content": "x"}]})
    assert error.param == "messages[1].tool_call_id"
    error = refused({"messages": [USER, {"role": "assistant", "tool_calls": [{"id": "c", "type": "custom",
                                                                               "custom": {"name": "x"}}]}]})
    assert error.param == "messages[1].tool_calls[0]"


@pytest.mark.parametrize("choice, config", [
    ("none", {"mode": "NONE"}),
    ("auto", {"mode": "AUTO"}),
    ("required", {"mode": "ANY"}),
    ({"type": "function", "function": {"name": "f"}}, {"mode": "ANY", "allowedFunctionNames": ["f"]}),
    ({"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
        {"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "g"}}]}},
     {"mode": "ANY", "allowedFunctionNames": ["f", "g"]}),
    ({"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [
        {"type": "function", "function": {"name": "f"}}]}},
     {"mode": "VALIDATED", "allowedFunctionNames": ["f"]}),
])
def test_tool_choice(choice, config):
    tools = [{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "g"}}]
    out = chat_request_to_gemini({"messages": [USER], "tools": tools, "tool_choice": choice})
    assert out["toolConfig"] == {"functionCallingConfig": config}


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": {"type": "custom", "custom": {"name": "x"}}}, "tool_choice"),
    ({"tool_choice": "any"}, "tool_choice"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0]"),
])
def test_tools_gemini_cannot_take(body, param):
    assert refused({"messages": [USER], **body}).param == param


@pytest.mark.parametrize("fmt, config", [
    ({"type": "text"}, None),
    ({"type": "json_object"}, {"responseMimeType": "application/json"}),
    ({"type": "json_schema", "json_schema": {"name": "answer", "strict": True, "schema": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False}}},
     {"responseMimeType": "application/json", "responseJsonSchema": {
         "type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False}}),
    ({"type": "json_schema", "json_schema": {"name": "any"}}, {"responseMimeType": "application/json"}),
])
def test_response_format(fmt, config):
    assert chat_request_to_gemini({"messages": [USER], "response_format": fmt}).get("generationConfig") == config


def test_reasoning_effort_becomes_a_thinking_budget():
    for effort, budget in (("none", 0), ("low", 1024), ("medium", 8192), ("high", 24576)):
        out = chat_request_to_gemini({"messages": [USER], "reasoning_effort": effort})
        assert out["generationConfig"] == {"thinkingConfig": {"thinkingBudget": budget}}


def test_n_above_one_cannot_stream():
    assert refused({"messages": [USER], "n": 3, "stream": True}).param == "n"
    assert chat_request_to_gemini({"messages": [USER], "n": 1, "stream": True})["generationConfig"] == {
        "candidateCount": 1}


@pytest.mark.parametrize("field, value", [
    ("logit_bias", {"50256": -100}), ("logprobs", True), ("top_logprobs", 3), ("audio", {"voice": "alloy"}),
    ("functions", [{"name": "f"}]), ("function_call", "auto"), ("modalities", ["text", "audio"]),
    ("parallel_tool_calls", False), ("reasoning_effort", "minimal"), ("response_format", {"type": "grammar"}),
    ("web_search_options", {"search_context_size": "low"}), ("frobnicate", 1),
])
def test_fields_gemini_cannot_express_are_400_unsupported_parameter(field, value):
    error = refused({"messages": [USER], field: value})
    assert error.code == "unsupported_parameter"
    assert error.param.split(".")[0] == field and f"`{error.param}`" in error.message


def test_harmless_or_default_fields_are_accepted():
    out = chat_request_to_gemini({
        "messages": [USER], "logprobs": False, "logit_bias": None, "parallel_tool_calls": True, "stream": True,
        "stream_options": {"include_usage": True}, "modalities": ["text"], "service_tier": "auto",
        "prompt_cache_key": "k", "safety_identifier": "s", "prediction": {"type": "content", "content": "x"},
        "temperature": None,
    })
    assert out == {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]}


@pytest.mark.parametrize("body, param", [
    ([], "body"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "system", "content": "only a system prompt"}]}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages[0].role"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]"),
])
def test_malformed_requests_are_clear_400s(body, param):
    assert refused(body).param == param


# ----------------------------------------------------------------------------------------------- response


def test_text_response():
    out = gemini_response_to_chat(load("response_text.json"), "my-gemini")
    completion = ChatCompletion.model_validate(out)
    assert completion.id == "chatcmpl-mWRpaNKLHYOkxN8P1qDNyQ4"
    assert completion.model == "my-gemini" and completion.object == "chat.completion"
    (choice,) = completion.choices
    assert (choice.index, choice.finish_reason) == (0, "stop")
    assert choice.message.content == "AI learns patterns from data to make predictions."
    assert choice.message.tool_calls is None
    usage = completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (1034, 9 + 25, 1068)
    assert usage.prompt_tokens_details.cached_tokens == 1024
    assert usage.completion_tokens_details.reasoning_tokens == 25


def test_tool_call_response():
    out = gemini_response_to_chat(load("response_tool_calls.json"), "m")
    completion = ChatCompletion.model_validate(out)
    (choice,) = completion.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None          # the thought part is dropped
    calls = choice.message.tool_calls
    assert [c.id for c in calls] == ["call_0", "call_1"]
    assert [(c.function.name, orjson.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_weather", {"city": "Tokyo", "unit": "celsius"})]
    raw = out["choices"][0]["message"]["tool_calls"]
    signature = "CiQB0e2Kb5x1Lq3mJ0kq9vN2c0yQ2nq6WkqS1e0P6m8yTQ=="
    assert raw[0]["extra_content"] == {"google": {"thought_signature": signature}}
    assert "extra_content" not in raw[1]
    assert (completion.usage.completion_tokens, completion.usage.total_tokens) == (40 + 98, 250)


def test_tool_calls_round_trip_into_the_next_request():
    """The assistant message a client appends to its history comes back to Gemini as the same parts."""
    resp = load("response_tool_calls.json")
    message = gemini_response_to_chat(resp, "m")["choices"][0]["message"]
    history = [USER, message] + [{"role": "tool", "tool_call_id": c["id"], "content": '{"temp_c": 20}'}
                                 for c in message["tool_calls"]]
    out = chat_request_to_gemini({"messages": history})
    calls = [p for p in resp["candidates"][0]["content"]["parts"] if "functionCall" in p]
    assert out["contents"][1] == {"role": "model", "parts": calls}
    assert [p["functionResponse"]["name"] for p in out["contents"][2]["parts"]] == ["get_weather", "get_weather"]


def test_an_empty_signed_text_part_beside_a_tool_call_leaves_content_null():
    parts = [{"functionCall": {"name": "f", "args": {}}}, {"text": "", "thoughtSignature": "c2ln"}]
    out = gemini_response_to_chat({"candidates": [{"content": {"parts": parts}, "finishReason": "STOP"}]}, "m")
    assert out["choices"][0]["message"]["content"] is None
    out = gemini_response_to_chat({"candidates": [{"content": {"parts": [{"text": ""}]}, "finishReason": "STOP"}]},
                                  "m")
    assert out["choices"][0]["message"]["content"] == ""


def test_two_candidates_and_a_safety_stop():
    completion = ChatCompletion.model_validate(gemini_response_to_chat(load("response_two_candidates.json"), "m"))
    assert [(c.index, c.finish_reason, c.message.content) for c in completion.choices] == [
        (0, "stop", "Blue."), (1, "length", "The sky looks blue because shorter")]
    completion = ChatCompletion.model_validate(gemini_response_to_chat(load("response_safety.json"), "m"))
    (choice,) = completion.choices
    assert (choice.finish_reason, choice.message.content) == ("content_filter", None)
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (14, 0)


def test_blocked_prompt_is_a_400_content_filter():
    with pytest.raises(GatewayError) as info:
        gemini_response_to_chat(load("response_blocked_prompt.json"), "m")
    error = info.value
    assert (error.status, error.type, error.code, error.param) == (400, "invalid_request_error", "content_filter",
                                                                   "messages")
    assert "SAFETY" in error.message


# Every FinishReason of google-genai's types.py.
@pytest.mark.parametrize("reason, expected", [
    ("STOP", "stop"), ("MAX_TOKENS", "length"), ("SAFETY", "content_filter"), ("RECITATION", "content_filter"),
    ("BLOCKLIST", "content_filter"), ("PROHIBITED_CONTENT", "content_filter"), ("SPII", "content_filter"),
    ("IMAGE_SAFETY", "content_filter"), ("IMAGE_PROHIBITED_CONTENT", "content_filter"),
    ("IMAGE_RECITATION", "content_filter"), ("LANGUAGE", "stop"), ("OTHER", "stop"),
    ("MALFORMED_FUNCTION_CALL", "stop"), ("UNEXPECTED_TOOL_CALL", "stop"), ("TOO_MANY_TOOL_CALLS", "stop"),
    ("FINISH_REASON_UNSPECIFIED", "stop"), ("NO_IMAGE", "stop"), ("IMAGE_OTHER", "stop"),
])
def test_finish_reasons(reason, expected):
    resp = {"candidates": [{"content": {"parts": [{"text": "x"}], "role": "model"}, "finishReason": reason}]}
    out = ChatCompletion.model_validate(gemini_response_to_chat(resp, "m"))
    assert out.choices[0].finish_reason == expected
    assert out.usage is None and out.id.startswith("chatcmpl-")


@pytest.mark.parametrize("resp", [
    [], {}, {"candidates": "x"}, {"candidates": ["x"]}, {"candidates": [{"content": {"parts": "x"}}]},
    {"candidates": [{"content": {"parts": [{"functionCall": {"args": {}}}]}}]},
    {"candidates": [{"content": {"parts": [{"text": "x"}]}}], "usageMetadata": {"promptTokenCount": "7"}},
])
def test_malformed_responses_are_502(resp):
    with pytest.raises(GatewayError) as info:
        gemini_response_to_chat(resp, "m")
    assert (info.value.status, info.value.type, info.value.code) == (502, "upstream_error", "upstream_malformed")


# ------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name, http, status, type, code", [
    ("error_400.json", 400, 400, "invalid_request_error", "invalid_argument"),
    ("error_api_key.json", 400, 502, "upstream_error", "upstream_auth"),
    ("error_403.json", 403, 502, "upstream_error", "upstream_auth"),
    ("error_404.json", 404, 404, "invalid_request_error", "not_found"),
    ("error_429.json", 429, 429, "rate_limit_error", "resource_exhausted"),
    ("error_500.json", 500, 502, "upstream_error", "upstream_error"),
    ("error_503.json", 503, 503, "api_error", "unavailable"),
    ("error_504.json", 504, 504, "api_error", "deadline_exceeded"),
])
def test_errors(name, http, status, type, code):
    body = (DATA / name).read_bytes()
    got_status, error = gemini_error_to_chat(http, body)
    assert got_status == status
    obj = ErrorObject.model_validate(error["error"])
    assert (obj.type, obj.code, obj.param) == (type, code, None)
    assert orjson.loads(body)["error"]["message"] in obj.message


@pytest.mark.parametrize("http, body, status", [
    (401, b'{"error": {"code": 401, "message": "Request had invalid authentication credentials."}}', 502),
    (413, b'{"error": {"code": 413, "message": "Request payload size exceeds the limit"}}', 413),
    (400, b'[{"error": {"code": 400, "message": "bad", "status": "INVALID_ARGUMENT"}}]', 400),
    (400, b'{"error": {"code": 400, "message": "User location is not supported for the API use.", '
          b'"status": "FAILED_PRECONDITION"}}', 502),
])
def test_error_variants(http, body, status):
    assert gemini_error_to_chat(http, body)[0] == status


@pytest.mark.parametrize("body", [b"", b"<html>502 Bad Gateway</html>", b'{"message": "x"}', b"[1, 2]"])
def test_error_bodies_that_are_not_gemini_errors_are_502(body):
    status, error = gemini_error_to_chat(500, body)
    assert status == 502
    assert ErrorObject.model_validate(error["error"]).code == "upstream_malformed"


# ------------------------------------------------------------------------------------------------- stream

_LINE = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


class EventStreamParser:
    """The WHATWG event-stream rules, fed in arbitrary chunks: the reference the relay's splitter follows."""

    def __init__(self):
        self.buffer = b""
        self.data = []
        self.name = None
        self.first = True
        self.after_cr = False   # the last line ended with CR: an LF starting the next chunk belongs to it

    def feed(self, chunk):
        self.buffer += chunk
        if self.after_cr and self.buffer:
            self.after_cr = False
            if self.buffer.startswith(b"\n"):
                self.buffer = self.buffer[1:]
        if self.first:      # a byte order mark may open the stream, possibly split across chunks
            if len(self.buffer) < 3 and _BOM.startswith(self.buffer):
                return []
            self.first = False
            if self.buffer.startswith(_BOM):
                self.buffer = self.buffer[3:]
        events = []
        while (match := _LINE.search(self.buffer)) is not None:
            line, self.buffer = self.buffer[:match.start()], self.buffer[match.end():]
            self.after_cr = match.group() == b"\r" and not self.buffer
            events += self._line(line)
        return events

    def _line(self, line):
        if not line:
            event = (self.name, b"\n".join(self.data)) if self.data else None
            self.data, self.name = [], None
            return [event] if event else []
        if line.startswith(b":"):
            return []
        field, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            self.data.append(value)
        elif field == b"event":
            self.name = value.decode()
        return []


def translate(chunks, include_usage=True, model="my-gemini"):
    """Feed a body in chunks through the parser and the translator: (client SSE blocks, translator)."""
    parser, stream = EventStreamParser(), GeminiToChatStream(model, include_usage)
    blocks = []
    for chunk in chunks:
        for name, data in parser.feed(chunk):
            blocks += stream.event(name, data)
    blocks += stream.finish()
    return blocks, stream


def payloads(blocks):
    """The JSON of each block (the `created` second left out, it is the clock's), "[DONE]" as is."""
    out = []
    for block in blocks:
        assert block.startswith(b"data: ") and block.endswith(b"\n\n") and block.count(b"\n") == 2
        data = block[6:-2]
        if data == b"[DONE]":
            out.append("[DONE]")
        else:
            obj = orjson.loads(data)
            obj.pop("created", None)
            out.append(obj)
    return out


def accumulate(blocks):
    """The final ChatCompletion the openai SDK builds from the chunks (each validated as a chunk first)."""
    state = ChatCompletionStreamState()
    for block in blocks:
        if block != b"data: [DONE]\n\n":
            state.handle_chunk(ChatCompletionChunk.model_validate(orjson.loads(block[6:])))
    return state.get_final_completion()


def test_text_stream():
    body = (DATA / "stream_text.txt").read_bytes()
    blocks, stream = translate([body])
    chunks = payloads(blocks)
    assert chunks[-1] == "[DONE]"
    assert all(c["id"] == "chatcmpl-4dVoaJXcHbKkxN8Pxp-y4Qo" and c["model"] == "my-gemini" for c in chunks[:-1])
    assert [c["choices"][0]["delta"] for c in chunks[:-2]] == [
        {"role": "assistant", "content": "", "refusal": None},
        {"content": "Hello"}, {"content": " wörld, grüße aus Zürich 🌍"}, {"content": "!"}, {}]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-2]] == [None, None, None, None, "stop"]
    assert all(c["usage"] is None for c in chunks[:-2])
    assert chunks[-2]["choices"] == [] and chunks[-2]["usage"] == {
        "prompt_tokens": 8, "completion_tokens": 12 + 20, "total_tokens": 40,
        "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 20}}
    assert (stream.complete, stream.prompt_tokens, stream.completion_tokens) == (True, 8, 32)
    final = accumulate(blocks)
    assert final.choices[0].message.content == "Hello wörld, grüße aus Zürich 🌍!"
    assert final.usage.total_tokens == 40


def test_each_text_delta_is_sent_in_the_call_that_brings_it():
    body = (DATA / "stream_text.txt").read_bytes()
    stream = GeminiToChatStream("m", include_usage=False)
    per_event = [payloads(stream.event(None, data)) for _, data in EventStreamParser().feed(body)]
    assert [[c["choices"][0]["delta"].get("content") for c in event] for event in per_event] == [
        [""], ["Hello"], [" wörld, grüße aus Zürich 🌍"], ["!", None]]
    assert stream.prompt_tokens == 8 and stream.completion_tokens == 32


def test_without_include_usage_no_usage_anywhere():
    blocks, stream = translate([(DATA / "stream_text.txt").read_bytes()], include_usage=False)
    assert all("usage" not in c for c in payloads(blocks)[:-1])
    assert len(blocks) == 6 and stream.prompt_tokens == 8      # usage is still read for accounting


def test_tool_call_stream():
    blocks, stream = translate([(DATA / "stream_tool_call.txt").read_bytes()])
    chunks = payloads(blocks)
    assert chunks[2]["choices"][0]["delta"] == {"tool_calls": [{
        "id": "call_0", "type": "function", "index": 0,
        "function": {"name": "get_weather", "arguments": '{"city":"Zürich"}'},
        "extra_content": {"google": {"thought_signature": "EpcCCpQCAdHtim9oQm2QeFvK3Ue1fVb2w=="}}}]}
    assert chunks[3]["choices"][0]["finish_reason"] == "tool_calls"
    final = accumulate(blocks)
    message = final.choices[0].message
    assert message.content == "Let me check the weather."
    assert [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls] == [
        ("call_0", "get_weather", '{"city":"Zürich"}')]
    assert (stream.prompt_tokens, stream.completion_tokens) == (95, 22 + 53)


def test_blocked_prompt_stream_ends_with_content_filter():
    blocks, stream = translate([(DATA / "stream_blocked.txt").read_bytes()])
    chunks = payloads(blocks)
    assert [c["choices"][0]["finish_reason"] for c in chunks[:2]] == [None, "content_filter"]
    assert chunks[2]["usage"]["prompt_tokens"] == 17 and chunks[3] == "[DONE]"
    assert stream.complete
    with pytest.raises(openai.ContentFilterFinishReasonError):     # what the SDK makes of a filtered answer
        accumulate(blocks)


def test_truncated_stream_is_not_complete_and_gets_no_end():
    blocks, stream = translate([(DATA / "stream_truncated.txt").read_bytes()])
    assert not stream.complete and stream.finish() == []
    chunks = payloads(blocks)
    assert "[DONE]" not in chunks and all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Once upon a time"
    assert (stream.prompt_tokens, stream.completion_tokens) == (5, -1)


def test_an_error_event_mid_stream_is_passed_on_as_an_openai_error_and_the_stream_stays_incomplete():
    stream = GeminiToChatStream("m", include_usage=False)
    stream.event(None, b'{"candidates": [{"content": {"parts": [{"text": "Hi"}], "role": "model"}}]}')
    (block,) = stream.event(None, (DATA / "error_503.json").read_bytes())
    error = ErrorObject.model_validate(orjson.loads(block[6:])["error"])
    assert (error.code, error.message) == ("unavailable", "The model is overloaded. Please try again later.")
    assert not stream.complete and stream.finish() == []


def test_events_after_the_finish_add_nothing_but_usage():
    stream = GeminiToChatStream("m", include_usage=True)
    stream.event(None, b'{"candidates": [{"content": {"parts": [{"text": "Hi"}]}, "finishReason": "STOP"}]}')
    late = b'{"candidates": [{"content": {"parts": [{"text": "late"}]}}], "usageMetadata": {"promptTokenCount": 3}}'
    assert stream.event(None, late) == []
    assert stream.prompt_tokens == 3
    assert payloads(stream.finish())[0]["usage"]["prompt_tokens"] == 3


@pytest.mark.parametrize("data", [b"not json", b"[1]", b'{"candidates": 5}', b'{"candidates": [{"content": 5}]}'])
def test_unparseable_stream_events_are_502(data):
    with pytest.raises(GatewayError) as info:
        GeminiToChatStream("m", include_usage=False).event(None, data)
    assert (info.value.status, info.value.code) == (502, "upstream_malformed")


STREAMS = ["stream_text.txt", "stream_tool_call.txt", "stream_blocked.txt", "stream_truncated.txt"]


@pytest.mark.parametrize("name", STREAMS)
def test_a_stream_split_at_every_byte_boundary_translates_identically(name):
    body = (DATA / name).read_bytes()
    whole = payloads(translate([body])[0])
    for i in range(1, len(body)):
        assert payloads(translate([body[:i], body[i:]])[0]) == whole, i


@pytest.mark.parametrize("name", STREAMS)
def test_any_line_ending_translates_identically(name):
    body = (DATA / name).read_bytes()
    whole = payloads(translate([body])[0])
    for ending in (b"\n", b"\r"):
        assert payloads(translate([body.replace(b"\r\n", ending)])[0]) == whole
    with_bom = b"\xef\xbb\xbf: keep-alive\r\n\r\n" + body
    for i in range(0, 40):
        assert payloads(translate([with_bom[:i], with_bom[i:]])[0]) == whole, i


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(STREAMS), cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=30))
def test_a_stream_cut_into_many_pieces_translates_identically(name, cuts):
    body = (DATA / name).read_bytes()
    bounds = sorted({c % (len(body) + 1) for c in cuts} | {0, len(body)})
    pieces = [body[a:b] for a, b in zip(bounds, bounds[1:])]
    assert payloads(translate(pieces)[0]) == payloads(translate([body])[0])
