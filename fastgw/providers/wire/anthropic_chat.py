"""OpenAI Chat Completions clients in front of an Anthropic Messages upstream (API version 2023-06-01).

  chat_request_to_messages   an OpenAI chat request -> the /v1/messages request body
  messages_response_to_chat  an Anthropic message -> a chat.completion
  messages_error_to_chat     an Anthropic error response -> (status for the client, OpenAI error object)
  MessagesToChatStream       Anthropic stream events -> chat.completion.chunk events (the stream translator)
  MessagesUsageReader        reads usage from a /v1/messages stream that is passed through unchanged

What Anthropic cannot express is refused with a 400 naming the field (code "unsupported_parameter"), never
dropped silently, unless dropping it changes no answer (`seed`, `store`, ...). Malformed upstream data raises a
502 "upstream_malformed". Pure: no I/O, orjson only.
"""
from __future__ import annotations

import re
import time

import orjson

from fastgw.errors import GatewayError
from fastgw.providers.wire.encode import upstream_json

# ---------------------------------------------------------------------------------------------------------------
# Request: OpenAI chat -> Anthropic messages

# Read by the translation below.
_TRANSLATED = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "stream",
    "user", "safety_identifier", "tools", "tool_choice", "parallel_tool_calls",
})
# Accepted and dropped: nothing on the Anthropic side corresponds and no answer depends on them.
_DROPPED = frozenset({
    "seed",                 # best-effort in OpenAI too
    "stream_options",       # include_usage is the stream translator's business, not the upstream's
    "store", "metadata",    # OpenAI's stored completions
    "service_tier", "prompt_cache_key",     # billing and cache-routing hints for OpenAI's own servers
})
# Fields Anthropic has no way to honour: accepted only at a value that changes nothing (OpenAI's default).
_DEFAULT_ONLY = {
    "n": (None, 1),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "web_search_options": (None,),
    "functions": (None,),
    "function_call": (None,),
}
_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
# OpenAI content part types that exist but have no Anthropic equivalent here (a 400 that says so).
_UNSUPPORTED_PARTS = frozenset({"input_audio", "file"})


def _unsupported(message: str, param: str) -> GatewayError:
    return GatewayError(400, message, param=param, code="unsupported_parameter")


def _invalid(message: str, param: str | None) -> GatewayError:
    return GatewayError(400, message, param=param, code="invalid_value")


def chat_request_to_messages(body: dict, model: str, default_max_tokens: int) -> dict:
    """An OpenAI chat request (parsed JSON) -> the Anthropic /v1/messages request body for upstream `model`."""
    if not isinstance(body, dict):
        raise _invalid("The request body must be a JSON object.", None)
    for field, value in body.items():
        if field in _TRANSLATED or field in _DROPPED:
            continue
        defaults = _DEFAULT_ONLY.get(field)
        if defaults is None:
            raise _unsupported(f"Unrecognized request argument supplied: {field}.", field)
        if value not in defaults:
            raise _unsupported(f"`{field}` is not supported by this model's provider (Anthropic), which has no "
                               f"equivalent; leave it unset.", field)

    system, turns = _conversation(body.get("messages"))
    out = {"model": model, "max_tokens": _max_tokens(body, default_max_tokens), "messages": turns}
    if system:
        out["system"] = "\n\n".join(system)

    temperature = body.get("temperature")
    if temperature is not None:
        if not _is_number(temperature) or not 0 <= temperature <= 2:
            raise _invalid("`temperature` must be a number from 0 to 2.", "temperature")
        if temperature > 1:
            # Anthropic's scale is 0..1 and not OpenAI's 0..2 halved, so rescaling would be a guess.
            raise _unsupported(f"`temperature` {temperature} is above 1, the most this model's provider "
                               f"(Anthropic) accepts; use a value from 0 to 1.", "temperature")
        out["temperature"] = temperature
    top_p = body.get("top_p")
    if top_p is not None:
        if not _is_number(top_p) or not 0 <= top_p <= 1:
            raise _invalid("`top_p` must be a number from 0 to 1.", "top_p")
        out["top_p"] = top_p
    stop = _stop_sequences(body.get("stop"))
    if stop:
        out["stop_sequences"] = stop
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _invalid("`stream` must be a boolean.", "stream")
    if stream:
        out["stream"] = True
    user = body.get("user") or body.get("safety_identifier")     # the latter is OpenAI's newer name for it
    if user is not None:
        if not isinstance(user, str):
            raise _invalid("`user` must be a string.", "user")
        out["metadata"] = {"user_id": user}

    tools = _tools(body.get("tools"))
    if tools:
        out["tools"] = tools
    tool_choice = _tool_choice(body.get("tool_choice"), bool(tools), body.get("parallel_tool_calls"))
    if tool_choice is not None:
        out["tool_choice"] = tool_choice
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _max_tokens(body: dict, default: int) -> int:
    for field in ("max_completion_tokens", "max_tokens"):      # the first is OpenAI's current name
        value = body.get(field)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise _invalid(f"`{field}` must be a positive integer.", field)
            return value
    return default          # Anthropic requires max_tokens; OpenAI does not


def _stop_sequences(stop) -> list[str]:
    if stop is None:
        return []
    sequences = [stop] if isinstance(stop, str) else stop
    if not isinstance(sequences, list) or not all(isinstance(s, str) for s in sequences):
        raise _invalid("`stop` must be a string or a list of strings.", "stop")
    return sequences


def _conversation(messages) -> tuple[list[str], list[dict]]:
    """OpenAI messages -> (system texts, Anthropic turns). Anthropic has one top-level system prompt and turns
    that alternate user/assistant, so system and developer messages are lifted out and consecutive turns of one
    role (role tool becomes user) are merged into one."""
    if not isinstance(messages, list) or not messages:
        raise _invalid("`messages` must be a non-empty list.", "messages")
    system: list[str] = []
    turns: list[dict] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _invalid(f"`{where}` must be an object.", where)
        role = message.get("role")
        if role == "system" or role == "developer":
            text = _plain_text(message.get("content"), where)
            if text:
                system.append(text)
            continue
        if role == "user":
            blocks = _user_blocks(message.get("content"), where)
        elif role == "assistant":
            blocks = _assistant_blocks(message, where)
        elif role == "tool":
            role = "user"                   # Anthropic carries tool results in the user turn
            blocks = [_tool_result(message, where)]
        elif role == "function":
            raise _unsupported(f"`{where}`: role `function` (the deprecated functions API) is not supported; "
                               f"use tools and role `tool`.", f"{where}.role")
        else:
            raise _invalid(f"`{where}.role` {role!r} is not one of system, developer, user, assistant, tool.",
                           f"{where}.role")
        if not blocks:
            continue                        # an empty message: Anthropic refuses empty content
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    if not turns:
        raise _invalid("`messages` must hold at least one user or assistant message with content.", "messages")
    return system, turns


def _parts(content, where: str) -> list[dict]:
    """A message's content as a list of parts (a string is one text part)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        return content
    raise _invalid(f"`{where}.content` must be a string or a list of content parts.", f"{where}.content")


def _text_of(part: dict, where: str) -> str:
    text = part.get("text")
    if not isinstance(text, str):
        raise _invalid(f"`{where}.text` must be a string.", f"{where}.text")
    return text


def _part_type_error(kind, where: str, allowed: str) -> GatewayError:
    if isinstance(kind, str) and kind in _UNSUPPORTED_PARTS:
        return _unsupported(f"`{where}`: content parts of type `{kind}` are not supported by this model's "
                            f"provider (Anthropic) through the gateway.", f"{where}.type")
    return _invalid(f"`{where}.type` {kind!r} is not valid here; expected {allowed}.", f"{where}.type")


def _plain_text(content, where: str) -> str:
    """System/developer content: text only."""
    texts = []
    for j, part in enumerate(_parts(content, where)):
        if part.get("type") != "text":
            raise _part_type_error(part.get("type"), f"{where}.content[{j}]", "text")
        texts.append(_text_of(part, f"{where}.content[{j}]"))
    return "".join(texts)


def _user_blocks(content, where: str) -> list[dict]:
    blocks = []
    for j, part in enumerate(_parts(content, where)):
        kind = part.get("type")
        if kind == "text":
            text = _text_of(part, f"{where}.content[{j}]")
            if text:
                blocks.append({"type": "text", "text": text})
        elif kind == "image_url":
            blocks.append(_image(part.get("image_url"), f"{where}.content[{j}].image_url"))
        else:
            raise _part_type_error(kind, f"{where}.content[{j}]", "text or image_url")
    return blocks


def _image(image, where: str) -> dict:
    url = image.get("url") if isinstance(image, dict) else None    # `detail` has no Anthropic equivalent
    if not isinstance(url, str):
        raise _invalid(f"`{where}.url` must be a string.", f"{where}.url")
    if url.startswith("data:"):
        header, comma, data = url[5:].partition(",")
        media_type, *params = header.split(";")
        media_type = media_type.strip().lower()
        if media_type == "image/jpg":
            media_type = "image/jpeg"
        if not comma or "base64" not in params or not data:
            raise _invalid(f"`{where}.url` must be a base64 data URL (data:<type>;base64,<data>).", f"{where}.url")
        if media_type not in _IMAGE_TYPES:
            raise _unsupported(f"`{where}.url`: image type {media_type!r} is not supported by this model's "
                               f"provider (Anthropic accepts image/jpeg, image/png, image/gif, image/webp).",
                               f"{where}.url")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise _invalid(f"`{where}.url` must be an http(s) URL or a base64 data URL.", f"{where}.url")


def _assistant_blocks(message: dict, where: str) -> list[dict]:
    for legacy in ("function_call", "audio"):
        if message.get(legacy) is not None:
            raise _unsupported(f"`{where}.{legacy}` is not supported by this model's provider (Anthropic).",
                               f"{where}.{legacy}")
    blocks = []
    content = message.get("content")
    if content is not None:
        for j, part in enumerate(_parts(content, where)):
            if part.get("type") == "text":
                text = _text_of(part, f"{where}.content[{j}]")
            elif part.get("type") == "refusal":
                text = part.get("refusal")
                if not isinstance(text, str):
                    raise _invalid(f"`{where}.content[{j}].refusal` must be a string.", f"{where}.content[{j}]")
            else:
                raise _part_type_error(part.get("type"), f"{where}.content[{j}]", "text or refusal")
            if text:
                blocks.append({"type": "text", "text": text})
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:   # what the model said when it refused is part of the conversation
        blocks.append({"type": "text", "text": refusal})
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        if not isinstance(tool_calls, list):
            raise _invalid(f"`{where}.tool_calls` must be a list.", f"{where}.tool_calls")
        for k, call in enumerate(tool_calls):
            blocks.append(_tool_use(call, f"{where}.tool_calls[{k}]"))
    return blocks


def _tool_use(call, where: str) -> dict:
    if not isinstance(call, dict) or call.get("type", "function") != "function":
        raise _unsupported(f"`{where}`: only tool calls of type `function` are supported.", f"{where}.type")
    function = call.get("function")
    call_id = call.get("id")
    if not isinstance(call_id, str) or not call_id:
        raise _invalid(f"`{where}.id` must be a non-empty string.", f"{where}.id")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise _invalid(f"`{where}.function.name` must be a string.", f"{where}.function.name")
    arguments = function.get("arguments")
    if not isinstance(arguments, str):
        raise _invalid(f"`{where}.function.arguments` must be a string of JSON.", f"{where}.function.arguments")
    try:
        # "" is what some clients send for a call without arguments; Anthropic wants an object either way.
        tool_input = orjson.loads(arguments) if arguments.strip() else {}
    except orjson.JSONDecodeError:
        raise _invalid(f"`{where}.function.arguments` is not valid JSON.", f"{where}.function.arguments") from None
    if not isinstance(tool_input, dict):
        raise _invalid(f"`{where}.function.arguments` must be a JSON object (Anthropic tool input is one).",
                       f"{where}.function.arguments")
    return {"type": "tool_use", "id": call_id, "name": function["name"], "input": tool_input}


def _tool_result(message: dict, where: str) -> dict:
    tool_call_id = message.get("tool_call_id")
    if not isinstance(tool_call_id, str) or not tool_call_id:
        raise _invalid(f"`{where}.tool_call_id` must be a non-empty string.", f"{where}.tool_call_id")
    result = {"type": "tool_result", "tool_use_id": tool_call_id}
    content = message.get("content")
    if isinstance(content, str):
        if content:                         # content is optional in a tool_result; an empty one is refused
            result["content"] = content
        return result
    texts = []
    for j, part in enumerate(_parts(content, where)):
        if part.get("type") != "text":
            raise _part_type_error(part.get("type"), f"{where}.content[{j}]", "text")
        text = _text_of(part, f"{where}.content[{j}]")
        if text:
            texts.append({"type": "text", "text": text})
    if texts:
        result["content"] = texts
    return result


def _tools(tools) -> list[dict]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _invalid("`tools` must be a list.", "tools")
    out = []
    for k, tool in enumerate(tools):
        where = f"tools[{k}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise _unsupported(f"`{where}`: only tools of type `function` are supported (got {kind!r}).",
                               f"{where}.type")
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _invalid(f"`{where}.function.name` must be a string.", f"{where}.function.name")
        # Anthropic requires a schema; OpenAI allows none for a function without parameters. `strict` is
        # dropped: the upstream then validates the arguments less strictly, the call itself is the same.
        schema = function.get("parameters") or {"type": "object", "properties": {}}
        converted = {"name": function["name"], "input_schema": schema}
        description = function.get("description")
        if description:
            converted["description"] = description
        out.append(converted)
    return out


def _tool_choice(choice, has_tools: bool, parallel_tool_calls) -> dict | None:
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise _invalid("`parallel_tool_calls` must be a boolean.", "parallel_tool_calls")
    if choice is None:
        converted = {"type": "auto"} if has_tools and parallel_tool_calls is False else None
    elif choice == "none":
        converted = {"type": "none"}
    elif choice == "auto":
        converted = {"type": "auto"}
    elif choice == "required":
        converted = {"type": "any"}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _invalid("`tool_choice.function.name` must be a string.", "tool_choice")
        converted = {"type": "tool", "name": function["name"]}
    elif isinstance(choice, dict) and choice.get("type") in ("allowed_tools", "custom"):
        raise _unsupported(f"`tool_choice` of type `{choice['type']}` is not supported by this model's provider "
                           f"(Anthropic).", "tool_choice")
    else:
        raise _invalid("`tool_choice` must be none, auto, required or {\"type\": \"function\", ...}.",
                       "tool_choice")
    if converted is None:
        return None
    if not has_tools:
        if converted["type"] in ("none", "auto"):
            return None                     # nothing to choose from: the same as not saying
        raise _invalid("`tool_choice` requires `tools`.", "tool_choice")
    if parallel_tool_calls is False and converted["type"] != "none":
        converted["disable_parallel_tool_use"] = True
    return converted


# ---------------------------------------------------------------------------------------------------------------
# Response: Anthropic message -> chat.completion

_FINISH_REASONS = {
    "end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop",
    "max_tokens": "length", "model_context_window_exceeded": "length",
    "tool_use": "tool_calls", "refusal": "content_filter",
}


def _malformed(what: str) -> GatewayError:
    return GatewayError(502, f"The upstream (Anthropic) sent malformed data: {what}.", type="upstream_error",
                        code="upstream_malformed")


def _finish_reason(stop_reason) -> str:
    # An unknown (newer) stop reason still ended the answer normally as far as the client can tell.
    return _FINISH_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


MAX_COUNT = 2**53      # a token count above this is no count (and sums of counts must fit the exchange's int64)


def _count(usage: dict, key: str) -> int:
    value = usage.get(key)
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < MAX_COUNT:
        raise _malformed(f"usage.{key} is not a token count")
    return value


def _prompt_tokens(usage: dict) -> tuple[int, int]:
    """(prompt tokens as OpenAI counts them, of which read from the cache). Anthropic's input_tokens excludes
    the cached part; OpenAI's prompt_tokens includes it."""
    cached = _count(usage, "cache_read_input_tokens")
    return _count(usage, "input_tokens") + cached + _count(usage, "cache_creation_input_tokens"), cached


def _chat_usage(prompt: int, completion: int, cached: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def messages_response_to_chat(resp: dict, model: str) -> dict:
    """An Anthropic message -> a chat.completion; `model` is the name the client asked for."""
    if not isinstance(resp, dict) or not isinstance(resp.get("id"), str):
        raise _malformed("the message has no id")
    content = resp.get("content")
    usage = resp.get("usage")
    if not isinstance(content, list) or not isinstance(usage, dict):
        raise _malformed("the message lacks content or usage")
    texts = []
    tool_calls = []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise _malformed("a text block without text")
            texts.append(block["text"])
        elif kind == "tool_use":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise _malformed("a tool_use block without id or name")
            tool_calls.append({"id": block["id"], "type": "function", "function": {
                "name": block["name"], "arguments": upstream_json(block.get("input", {})).decode()}})
        elif kind is None:
            raise _malformed("a content block without a type")
        # thinking, redacted_thinking and server-tool blocks have no place in a chat.completion
    message = {"role": "assistant", "content": "".join(texts) if texts or not tool_calls else None,
               "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    prompt, cached = _prompt_tokens(usage)
    completion = _count(usage, "output_tokens")
    return {
        "id": "chatcmpl-" + resp["id"],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": _finish_reason(resp.get("stop_reason"))}],
        "usage": _chat_usage(prompt, completion, cached),
    }


# ---------------------------------------------------------------------------------------------------------------
# Errors: Anthropic error -> OpenAI error

# The status Anthropic gives each error type (for errors that arrive inside a stream, which have no status).
_STATUS_OF_TYPE = {
    "invalid_request_error": 400, "authentication_error": 401, "billing_error": 402, "permission_error": 403,
    "not_found_error": 404, "request_too_large": 413, "rate_limit_error": 429, "api_error": 500,
    "timeout_error": 504, "overloaded_error": 529,
}
# Statuses that say the gateway's own Anthropic account or configuration is wrong, not the client's request:
# the client gets a 502 (its own key and request are fine). 404 is here too: Anthropic answers 404 for an
# unknown model id or path, and both come from the gateway's deployment config, not from the client (whose
# model name the router already resolved).
_GATEWAY_SIDE = {
    401: ("upstream_auth_failed", "the gateway's Anthropic API key was rejected (a gateway configuration "
                                  "problem, not the client's key)"),
    402: ("upstream_billing", "the gateway's Anthropic account has a billing problem"),
    403: ("upstream_permission_denied", "the gateway's Anthropic API key lacks permission (a gateway "
                                        "configuration problem, not the client's key)"),
    404: ("upstream_not_found", "Anthropic does not know the configured model or path (a gateway "
                                "configuration problem)"),
}


def messages_error_to_chat(status: int, body: bytes) -> tuple[int, dict]:
    """An Anthropic error response (any status; the body may not be JSON) -> (status for the client,
    {"error": {"message", "type", "param", "code"}})."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return 502, _error_object(f"The upstream (Anthropic) failed with HTTP {status} and a body that is not "
                                  f"an Anthropic error.", "upstream_error", "upstream_error")
    return _chat_error(status, error.get("type"), error["message"])


def _chat_error(status: int, kind, message: str) -> tuple[int, dict]:
    kind = kind if isinstance(kind, str) else "error"
    if status == 529:
        return 503, _error_object(message, "api_error", "upstream_overloaded")
    if status == 429:
        return 429, _error_object(message, "rate_limit_error", "rate_limit_exceeded")
    if status == 413:
        return 413, _error_object(message, "invalid_request_error", "request_too_large")
    gateway_side = _GATEWAY_SIDE.get(status)
    if gateway_side is not None:
        code, why = gateway_side
        return 502, _error_object(f"The upstream refused the request: {why}. Anthropic said ({kind}): {message}",
                                  "upstream_error", code)
    if status == 504:
        return 504, _error_object(f"The upstream (Anthropic) timed out: {message}", "upstream_error",
                                  "upstream_timeout")
    if 400 <= status < 500:     # about the request itself (400 invalid_request_error, 409, ...): the client's
        # OpenAI's code for a prompt over the model's window, which clients and context_window_fallbacks read
        code = "context_length_exceeded" if status == 400 and _TOO_LONG.search(message) else None
        return status, _error_object(message, "invalid_request_error", code)
    return 502, _error_object(f"The upstream (Anthropic) failed ({kind}): {message}", "upstream_error",
                              "upstream_error")


# Anthropic's wording for a request over the context window ("prompt is too long: 215000 tokens > 200000
# maximum"; "input length and `max_tokens` exceed context limit: ..."): it has no error code of its own.
_TOO_LONG = re.compile(r"prompt is too long|exceed context limit")


def _error_object(message: str, kind: str, code: str | None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


# ---------------------------------------------------------------------------------------------------------------
# Streams

def _event_json(data: bytes) -> dict:
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise _malformed("an event whose data is not JSON") from None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise _malformed("an event without a type")
    return event


def _field(obj: dict, key: str, kind: type, what: str):
    value = obj.get(key)
    if not isinstance(value, kind):
        raise _malformed(f"{what} without {key}")
    return value


class MessagesToChatStream:
    """Anthropic stream events -> chat.completion.chunk SSE blocks, as OpenAI sends them (the stream translator
    interface: event() per upstream event, finish() at the end of the body; usage and `complete` recorded)."""

    def __init__(self, model: str, include_usage: bool):
        self.model = model
        self.include_usage = include_usage
        self.prompt_tokens = -1
        self.completion_tokens = -1
        self.cached_tokens = 0
        self.complete = False
        self.failed = False             # an error event arrived: the stream is over without its normal end
        self.id = None                  # "chatcmpl-" + the message id, from message_start
        self.created = 0
        self.finish_reason = None
        self.finish_sent = False
        self.tool_index: dict[int, int] = {}    # Anthropic content block index -> OpenAI tool_calls index

    def event(self, name: str | None, data: bytes) -> list[bytes]:
        # `name` is not needed: Anthropic repeats the event type as the data's "type".
        if self.failed or self.complete:
            return []
        event = _event_json(data)
        kind = event["type"]
        if kind == "content_block_delta":
            return self._block_delta(event)
        if kind == "message_start":
            return self._start(event)
        if kind == "content_block_start":
            return self._block_start(event)
        if kind == "message_delta":
            return self._message_delta(event)
        if kind == "message_stop":
            return self._stop()
        if kind == "error":
            return self._error(event)
        return []           # ping, content_block_stop, and event types newer than this code

    def finish(self) -> list[bytes]:
        return [b"data: [DONE]\n\n"] if self.complete else []

    # -- events

    def _start(self, event: dict) -> list[bytes]:
        message = _field(event, "message", dict, "message_start")
        self.id = "chatcmpl-" + _field(message, "id", str, "message_start.message")
        self.created = int(time.time())
        usage = message.get("usage")
        if isinstance(usage, dict):
            self._prompt_usage(usage)
        return [self._chunk_of({"role": "assistant", "content": "", "refusal": None})]

    def _block_start(self, event: dict) -> list[bytes]:
        self._started("content_block_start")
        block = _field(event, "content_block", dict, "content_block_start")
        kind = block.get("type")
        if kind == "tool_use":
            index = len(self.tool_index)
            self.tool_index[_field(event, "index", int, "content_block_start")] = index
            call = {"index": index, "id": _field(block, "id", str, "tool_use block"), "type": "function",
                    "function": {"name": _field(block, "name", str, "tool_use block"), "arguments": ""}}
            return [self._chunk_of({"tool_calls": [call]})]
        if kind == "text" and isinstance(block.get("text"), str) and block["text"]:
            return [self._chunk_of({"content": block["text"]})]
        return []           # an empty text block (its text comes in deltas), thinking, server-tool blocks

    def _block_delta(self, event: dict) -> list[bytes]:
        self._started("content_block_delta")
        delta = _field(event, "delta", dict, "content_block_delta")
        kind = delta.get("type")
        if kind == "text_delta":
            return [self._chunk_of({"content": _field(delta, "text", str, "text_delta")})]
        if kind == "input_json_delta":
            fragment = _field(delta, "partial_json", str, "input_json_delta")
            index = event.get("index")
            index = self.tool_index.get(index) if isinstance(index, int) else None
            if index is None or not fragment:
                return []   # a server tool's input, or the empty first fragment Anthropic sends
            return [self._chunk_of({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})]
        return []           # thinking_delta, signature_delta, citations_delta: no chat.completion equivalent

    def _message_delta(self, event: dict) -> list[bytes]:
        self._started("message_delta")
        usage = event.get("usage")
        if isinstance(usage, dict):
            if usage.get("input_tokens") is not None:   # newer API versions repeat the cumulative input counts
                self._prompt_usage(usage)
            self.completion_tokens = _count(usage, "output_tokens")
        delta = event.get("delta")
        stop_reason = delta.get("stop_reason") if isinstance(delta, dict) else None
        if stop_reason is None:
            return []
        self.finish_reason = _finish_reason(stop_reason)
        return [self._finish_chunk()]

    def _stop(self) -> list[bytes]:
        self._started("message_stop")
        self.complete = True
        out = [] if self.finish_sent else [self._finish_chunk()]    # a stop without a stop_reason: still ended
        if self.include_usage:
            prompt = max(self.prompt_tokens, 0)
            completion = max(self.completion_tokens, 0)
            out.append(self._chunk([], _chat_usage(prompt, completion, self.cached_tokens)))
        return out

    def _error(self, event: dict) -> list[bytes]:
        """An error after the 200 head: the client gets OpenAI's mid-stream error block (the openai SDK raises
        APIError on it) and the stream stays incomplete, so the relay ends it by closing."""
        self.failed = True
        error = event.get("error")
        if not isinstance(error, dict) or not isinstance(error.get("message"), str):
            raise _malformed("an error event without an error")
        kind = error.get("type")
        _, body = _chat_error(_STATUS_OF_TYPE.get(kind, 500) if isinstance(kind, str) else 500, kind, error["message"])
        return [b"data: " + orjson.dumps(body) + b"\n\n"]

    # -- helpers

    def _started(self, what: str) -> None:
        if self.id is None:
            raise _malformed(f"{what} before message_start")

    def _prompt_usage(self, usage: dict) -> None:
        self.prompt_tokens, self.cached_tokens = _prompt_tokens(usage)

    def _finish_chunk(self) -> bytes:
        self.finish_sent = True
        return self._chunk([{"index": 0, "delta": {}, "logprobs": None,
                             "finish_reason": self.finish_reason or "stop"}])

    def _chunk_of(self, delta: dict) -> bytes:
        return self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])

    def _chunk(self, choices: list, usage: dict | None = None) -> bytes:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                 "choices": choices}
        if self.include_usage:
            chunk["usage"] = usage          # OpenAI sends "usage": null on every chunk but the last
        return b"data: " + orjson.dumps(chunk) + b"\n\n"


class MessagesUsageReader:
    """The stream interface for /v1/messages passed through unchanged to Anthropic: the relay forwards the raw
    bytes itself, so event() returns nothing; it records usage (input + cache tokens from message_start,
    cumulative output tokens from message_delta) and `complete` (message_stop)."""

    # Events whose data is read; text deltas (the bulk of a stream) are not parsed at all.
    _READ = frozenset({"message_start", "message_delta", "message_stop"})

    def __init__(self):
        self.prompt_tokens = -1
        self.completion_tokens = -1
        self.cached_tokens = 0
        self.complete = False

    def event(self, name: str | None, data: bytes) -> list[bytes]:
        if name is not None and name not in self._READ:
            return []
        event = _event_json(data)
        kind = event["type"]
        if kind == "message_start":
            usage = _field(event, "message", dict, "message_start").get("usage")
            if isinstance(usage, dict):
                self.prompt_tokens, self.cached_tokens = _prompt_tokens(usage)
        elif kind == "message_delta":
            usage = event.get("usage")
            if isinstance(usage, dict):
                if usage.get("input_tokens") is not None:
                    self.prompt_tokens, self.cached_tokens = _prompt_tokens(usage)
                self.completion_tokens = _count(usage, "output_tokens")
        elif kind == "message_stop":
            self.complete = True
        return []

    def finish(self) -> list[bytes]:
        return []
