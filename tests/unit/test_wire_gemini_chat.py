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
from fastgw.providers.wire.gemini_chat import chat_request_to_gemini

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
