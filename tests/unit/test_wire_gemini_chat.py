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
from fastgw.providers.wire.gemini_chat import chat_request_to_gemini, gemini_error_to_chat, gemini_response_to_chat

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
