"""The Anthropic Messages API (anthropic-version 2023-06-01) in front of an OpenAI-format deployment.

An Anthropic client (the `anthropic` SDK, Claude Code) POSTs /v1/messages; when the model is served by an
OpenAI chat deployment the gateway translates the request to chat, and the answer, the stream and the errors
back. Decisions where the two APIs differ:

- Strings stay strings and block lists become content-part lists (system, user, assistant text, tool
  results): no separator is invented to join blocks.
- `max_tokens` stays `max_tokens`, not `max_completion_tokens`: every OpenAI-compatible server (vLLM, Ollama,
  llama.cpp, Azure) knows the old name, not all know the new one. (OpenAI's o-series models refuse the old
  name: their deployments would need the new one.)
- `cache_control` (on the request, blocks, tools) is dropped: it is a caching hint, and OpenAI caches
  prompt prefixes by itself (the cached part comes back as `cache_read_input_tokens`).
- `thinking` {"type": "enabled"} asks for thinking blocks a chat deployment cannot return: 400. "disabled"
  and "adaptive" (the model decides whether to think; not thinking is a valid outcome) are dropped. Thinking
  blocks sent back in assistant turns are dropped (they are Anthropic-signed and mean nothing elsewhere).
- A tool call whose arguments are not a JSON object becomes `{"_raw": "<the arguments>"}` (an empty string:
  `{}`): the client's tool then rejects it and the model sees the error and can retry, where a 502 would
  end an agent's turn for a model's typo. (A stream forwards the argument fragments as they come.)
- finish_reason "stop" with tool calls is `tool_use` (some OpenAI-compatible servers say "stop"): agents
  loop on stop_reason == "tool_use".
- Errors keep their status; 503 stays 503 (the SDK knows it as ServiceUnavailableError) with the type
  `overloaded_error`, so the client retries it like Anthropic's 529; 504 is `timeout_error` as Anthropic's.
  An upstream's 401/403 (the gateway's provider key) should reach this as a 502 first, or the client is told
  its own key is wrong.
- Any request field not handled here is refused (400 unsupported_parameter) rather than silently ignored.
"""
from __future__ import annotations

import secrets

import orjson

from fastgw.errors import GatewayError
from fastgw.providers.wire.encode import client_json, upstream_json
from fastgw.tokens.exact import count_chat

__all__ = [
    "messages_request_to_chat",
    "chat_response_to_message",
    "chat_error_to_messages",
    "ChatToMessagesStream",
    "count_tokens_local",
]


def _unsupported(param: str, why: str) -> GatewayError:
    return GatewayError(400, f"`{param}` {why}", param=param, code="unsupported_parameter")


def _invalid(param: str, why: str) -> GatewayError:
    return GatewayError(400, f"`{param}` {why}", param=param, code="invalid_value")


def _malformed(why: str) -> GatewayError:
    return GatewayError(502, f"The upstream sent a malformed chat completion: {why}", type="upstream_error",
                        code="upstream_malformed")


# ---------------------------------------------------------------------------------------------- request

def messages_request_to_chat(body: dict, model: str) -> dict:
    """An Anthropic /v1/messages request body -> the OpenAI chat request for upstream model `model`."""
    if not isinstance(body, dict):
        raise _invalid("body", "must be a JSON object")
    messages = []
    system = body.get("system")
    if system is not None:
        messages.append({"role": "system", "content": _text_content(system, "system")})
    turns = body.get("messages")
    if not isinstance(turns, list):
        raise _invalid("messages", "must be an array of messages")
    for i, turn in enumerate(turns):
        messages += _turn(turn, f"messages[{i}]")
    chat = {"model": model, "messages": messages}
    for key, value in body.items():
        if value is None or key in _DONE_ABOVE:
            continue
        field = _FIELDS.get(key)
        if field is None:
            raise _unsupported(key, "has no equivalent in the OpenAI chat API")
        field(value, chat, body)
    return chat


def _copy(name: str):
    def field(value, chat, body):
        chat[name] = value
    return field


def _stream(value, chat, body):
    if not isinstance(value, bool):
        raise _invalid("stream", "must be a boolean")
    if value:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}  # an Anthropic client always gets usage


def _stop_sequences(value, chat, body):
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _invalid("stop_sequences", "must be an array of strings")
    if value:
        chat["stop"] = value


def _metadata(value, chat, body):
    if not isinstance(value, dict):
        raise _invalid("metadata", "must be an object")
    for key, item in value.items():
        if key != "user_id":
            raise _unsupported(f"metadata.{key}", "has no equivalent in the OpenAI chat API")
        if item is not None:
            chat["user"] = item


def _top_k(value, chat, body):
    raise _unsupported("top_k", "has no equivalent in the OpenAI chat API (it has no top-k sampling)")


def _thinking(value, chat, body):
    kind = value.get("type") if isinstance(value, dict) else None
    if kind in ("disabled", "adaptive"):
        return
    raise _unsupported("thinking", f"of type {kind!r} asks for thinking blocks, which an OpenAI chat deployment "
                                   "does not return")


def _output_config(value, chat, body):
    if not isinstance(value, dict):
        raise _invalid("output_config", "must be an object")
    for key, item in value.items():
        if item is None:
            continue
        if key == "effort":  # OpenAI's reasoning_effort has the same five levels (and more)
            chat["reasoning_effort"] = item
        elif key == "format" and isinstance(item, dict) and item.get("type") == "json_schema":
            # Anthropic's structured outputs always conform to the schema: OpenAI's strict mode
            chat["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "output", "schema": item.get("schema"),
                                                       "strict": True}}
        else:
            raise _unsupported(f"output_config.{key}", "has no equivalent in the OpenAI chat API")


def _service_tier(value, chat, body):
    tier = {"auto": "auto", "standard_only": "default"}.get(value) if isinstance(value, str) else None
    if tier is None:
        raise _invalid("service_tier", "must be \"auto\" or \"standard_only\"")
    chat["service_tier"] = tier


def _tools(value, chat, body):
    if not isinstance(value, list):
        raise _invalid("tools", "must be an array")
    chat["tools"] = [_tool(tool, f"tools[{i}]") for i, tool in enumerate(value)]


# Tool fields that only steer Anthropic's caching or streaming granularity: dropped.
_TOOL_HINTS = frozenset(("cache_control", "eager_input_streaming"))


def _tool(tool, where: str) -> dict:
    if not isinstance(tool, dict):
        raise _invalid(where, "must be an object")
    if tool.get("type") not in (None, "custom"):
        raise _unsupported(f"{where}.type", f"{tool['type']!r} is an Anthropic server tool, run by Anthropic; an "
                                            "OpenAI-format deployment has no such tool")
    if not isinstance(tool.get("name"), str):
        raise _invalid(f"{where}.name", "must be a string")
    function = {"name": tool["name"]}
    for key, item in tool.items():
        if item is None or key in _TOOL_HINTS or key in ("type", "name"):
            continue
        if key == "description":
            function["description"] = item
        elif key == "input_schema":
            function["parameters"] = item
        elif key == "strict":
            function["strict"] = item
        else:
            raise _unsupported(f"{where}.{key}", "has no equivalent in OpenAI function tools")
    return {"type": "function", "function": function}


def _tool_choice(value, chat, body):
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "auto":
        chat["tool_choice"] = "auto"
    elif kind == "any":
        chat["tool_choice"] = "required"
    elif kind == "none":
        chat["tool_choice"] = "none"
    elif kind == "tool":
        if not isinstance(value.get("name"), str):
            raise _invalid("tool_choice.name", "must be a string")
        chat["tool_choice"] = {"type": "function", "function": {"name": value["name"]}}
    else:
        raise _invalid("tool_choice.type", "must be one of auto, any, tool, none")
    if value.get("disable_parallel_tool_use"):
        chat["parallel_tool_calls"] = False


_DONE_ABOVE = frozenset(("model", "system", "messages", "cache_control"))

# Request field -> how it goes into the chat request. Anything else is refused.
_FIELDS = {
    "max_tokens": _copy("max_tokens"),
    "temperature": _copy("temperature"),  # the same softmax temperature (Anthropic allows 0..1, OpenAI 0..2)
    "top_p": _copy("top_p"),
    "stop_sequences": _stop_sequences,
    "stream": _stream,
    "metadata": _metadata,
    "tools": _tools,
    "tool_choice": _tool_choice,
    "thinking": _thinking,
    "output_config": _output_config,
    "service_tier": _service_tier,
    "top_k": _top_k,
}


def _text_content(value, where: str):
    """A system prompt or tool result: a string as is, text blocks as text parts."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _invalid(where, "must be a string or an array of text blocks")
    parts = []
    for j, block in enumerate(value):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind != "text":
            raise _unsupported(f"{where}[{j}].type", f"{kind!r}: only text blocks can be sent here to an OpenAI "
                                                     "chat deployment")
        parts.append(_text_part(block, f"{where}[{j}]"))
    return parts


def _text_part(block: dict, where: str) -> dict:
    if not isinstance(block.get("text"), str):
        raise _invalid(f"{where}.text", "must be a string")
    return {"type": "text", "text": block["text"]}


def _turn(turn, where: str) -> list[dict]:
    if not isinstance(turn, dict):
        raise _invalid(where, "must be an object")
    role, content = turn.get("role"), turn.get("content")
    if role not in ("user", "assistant"):
        raise _invalid(f"{where}.role", "must be \"user\" or \"assistant\"")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
        raise _invalid(f"{where}.content", "must be a string or an array of content blocks")
    if role == "user":
        return _user_turn(content, f"{where}.content")
    return [_assistant_turn(content, f"{where}.content")]


def _user_turn(blocks: list[dict], where: str) -> list[dict]:
    """Tool results become `tool` messages, placed first: OpenAI wants them right after the assistant's
    tool_calls. The rest of the turn follows as one user message."""
    results, parts = [], []
    for j, block in enumerate(blocks):
        here, kind = f"{where}[{j}]", block.get("type")
        if kind == "text":
            parts.append(_text_part(block, here))
        elif kind == "image":
            parts.append(_image_part(block, here))
        elif kind == "tool_result":
            results.append(_tool_message(block, here))
        else:
            raise _unsupported(f"{here}.type", f"{kind!r} blocks have no equivalent in the OpenAI chat API")
    return results + ([{"role": "user", "content": parts}] if parts else [])


def _image_part(block: dict, where: str) -> dict:
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        url = f"data:{source.get('media_type')};base64,{source.get('data')}"
    elif kind == "url":
        url = source.get("url")
    else:
        raise _unsupported(f"{where}.source.type", f"{kind!r}: only base64 and url images can be sent to an "
                                                   "OpenAI chat deployment")
    if not isinstance(url, str):
        raise _invalid(f"{where}.source", "lacks its data or url")
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_message(block: dict, where: str) -> dict:
    if not isinstance(block.get("tool_use_id"), str):
        raise _invalid(f"{where}.tool_use_id", "must be a string")
    content = _text_content(block.get("content") or "", f"{where}.content")
    if block.get("is_error"):  # OpenAI tool messages have no error flag: say it in the text
        content = f"Error: {content}" if isinstance(content, str) else [{"type": "text", "text": "Error:"}, *content]
    return {"role": "tool", "tool_call_id": block["tool_use_id"], "content": content}


def _assistant_turn(blocks: list[dict], where: str) -> dict:
    parts, calls = [], []
    for j, block in enumerate(blocks):
        here, kind = f"{where}[{j}]", block.get("type")
        if kind == "text":
            parts.append(_text_part(block, here))
        elif kind == "tool_use":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise _invalid(here, "needs a string id and name")
            calls.append({"id": block["id"], "type": "function",
                          "function": {"name": block["name"],
                                       "arguments": client_json(block.get("input", {})).decode()}})
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise _unsupported(f"{here}.type", f"{kind!r} blocks have no equivalent in the OpenAI chat API")
    message = {"role": "assistant", "content": parts or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    return message


# --------------------------------------------------------------------------------------------- response

# OpenAI finish_reason -> Anthropic stop_reason (OpenAI cannot tell a stop sequence from a natural end).
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                 "function_call": "tool_use", "content_filter": "refusal"}


def _stop_reason(finish, called_tools: bool) -> str:
    if called_tools and finish in ("stop", "tool_calls", None):
        return "tool_use"
    return _STOP_REASONS.get(finish, "end_turn") if isinstance(finish, str) else "end_turn"


def _message_id(chat_id) -> str:
    if isinstance(chat_id, str) and chat_id:
        return "msg_" + chat_id.removeprefix("chatcmpl-")
    return "msg_" + secrets.token_hex(12)


def _call_id(call_id, number: int) -> str:
    """A tool call's id, or one made up when the upstream gave none that is a string."""
    return call_id if isinstance(call_id, str) and call_id else f"call_{number}"


def _tool_input(arguments) -> dict:
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, dict):  # a few OpenAI-compatible servers send the object itself
        return arguments
    try:
        value = orjson.loads(arguments)
    except (orjson.JSONDecodeError, TypeError):
        value = None
    return value if isinstance(value, dict) else {"_raw": arguments}


def _usage(usage) -> dict:
    """OpenAI usage -> Anthropic usage: cached prompt tokens are read from the cache, the rest is input."""
    usage = usage if isinstance(usage, dict) else {}
    prompt, completion = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
    details = usage.get("prompt_tokens_details")
    cached = min(_count(details.get("cached_tokens")) if isinstance(details, dict) else 0, prompt)
    return {"input_tokens": prompt - cached, "output_tokens": completion,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


MAX_COUNT = 2**53      # a token count above this is no count (and sums of counts must fit the exchange's int64)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_COUNT


def _count(value) -> int:
    return value if _is_count(value) else 0


def chat_response_to_message(resp: dict, model: str) -> dict:
    """A chat.completion -> an Anthropic message; `model` is the name the client asked for."""
    choices = resp.get("choices") if isinstance(resp, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _malformed("no choices")
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        raise _malformed("a choice without a message")
    content = []
    for text in (message.get("content"), message.get("refusal")):
        if isinstance(text, str) and text:
            content.append({"type": "text", "text": text})
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise _malformed("tool_calls is not an array")
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _malformed("a tool call without a function name")
        content.append({"type": "tool_use", "id": _call_id(call.get("id"), len(content)),
                        "name": function["name"], "input": _tool_input(function.get("arguments"))})
    return {"id": _message_id(resp.get("id")), "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": _stop_reason(choice.get("finish_reason"), bool(calls)),
            "stop_sequence": None, "usage": _usage(resp.get("usage"))}


# ----------------------------------------------------------------------------------------------- errors

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}

# The OpenAI error `type` (or code) of an error event inside a stream, where there is no status.
_ERROR_TYPES_BY_NAME = {"invalid_request_error": "invalid_request_error",
                        "authentication_error": "authentication_error", "permission_error": "permission_error",
                        "not_found_error": "not_found_error", "rate_limit_error": "rate_limit_error",
                        "rate_limit_exceeded": "rate_limit_error", "insufficient_quota": "rate_limit_error",
                        "overloaded_error": "overloaded_error", "upstream_busy": "overloaded_error",
                        "timeout_error": "timeout_error"}


def _error_type(status: int) -> str:
    return _ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")


def _error_message(error) -> str | None:
    """The message of an OpenAI error object, or of the few other shapes servers send ({"detail": ...})."""
    while isinstance(error, dict) and error.get("error") is not None:   # a loop: the nesting may be deep
        error = error["error"]
    if isinstance(error, str):
        return error
    if isinstance(error, dict):
        for key in ("message", "detail"):
            if isinstance(error.get(key), str):
                return error[key]
    return None


def _error(kind: str, message: str) -> dict:
    return {"type": "error", "error": {"type": kind, "message": message}}


def chat_error_to_messages(status: int, body: bytes) -> tuple[int, dict]:
    """An OpenAI-shaped error response (the gateway's or the upstream's; the body may not be JSON) -> the same
    status and Anthropic's error body."""
    try:
        message = _error_message(orjson.loads(body))
    except orjson.JSONDecodeError:
        message = None
    if not message:
        text = body.decode("utf-8", "replace").strip()
        message = text[:1000] if text else f"The upstream answered HTTP {status} with no message."
    return status, _error(_error_type(status), message)


# ----------------------------------------------------------------------------------------------- stream

def _sse(kind: str, payload: dict) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


class ChatToMessagesStream:
    """chat.completion.chunk events -> Anthropic stream events, as they arrive: event() per upstream event
    (its `event:` name, unused by OpenAI, and its data), finish() at the end of the body. prompt_tokens and
    completion_tokens (-1 until the usage chunk) are in OpenAI's terms; complete is set by [DONE]."""

    def __init__(self, model: str):
        self.model = model
        self.prompt_tokens = -1
        self.completion_tokens = -1
        self.complete = False
        self._usage = None            # the last usage object seen
        self._started = False         # message_start sent
        self._blocks = 0              # content blocks opened so far
        self._open = None             # the open block: "text", an OpenAI tool call index, or None
        self._tool_blocks = {}        # OpenAI tool call index -> its block's index
        self._stop_reason = None      # set by the finish_reason chunk
        self._delta_sent = False      # message_delta sent
        self._failed = False          # an error event was relayed: nothing more is

    def event(self, name: str | None, data: bytes) -> list[bytes]:
        if self._failed or self.complete:
            return []
        if data.strip() == b"[DONE]":
            return self._done()
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise _malformed(f"an event that is not JSON: {data[:200]!r}") from None
        if not isinstance(chunk, dict):
            raise _malformed("an event that is not a JSON object")
        if "error" in chunk:
            self._failed = True
            error = chunk["error"]
            kind = (error.get("type") or error.get("code")) if isinstance(error, dict) else None
            message = _error_message(error) or "The upstream stream failed."
            kind = _ERROR_TYPES_BY_NAME.get(kind, "api_error") if isinstance(kind, str) else "api_error"
            return [_sse("error", _error(kind, message))]
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._record_usage(usage)
        out = [] if self._started else self._start(chunk)
        choices = chunk.get("choices") or []  # the usage chunk has none (vLLM: null)
        if not isinstance(choices, list):
            raise _malformed("choices is not an array")
        for choice in choices:
            if not isinstance(choice, dict):
                raise _malformed("a choice that is not an object")
            if choice.get("index", 0) == 0:  # the gateway never asks for n > 1
                out += self._choice(choice)
        # message_delta carries the usage, which OpenAI sends after the finish_reason chunk: wait for it
        if self._stop_reason is not None and not self._delta_sent and isinstance(usage, dict):
            out.append(self._message_delta())
        return out

    def finish(self) -> list[bytes]:
        return []  # message_stop went out at [DONE]; a broken stream gets no fake end

    def _record_usage(self, usage: dict) -> None:
        self._usage = usage
        if _is_count(usage.get("prompt_tokens")):
            self.prompt_tokens = usage["prompt_tokens"]
        if _is_count(usage.get("completion_tokens")):
            self.completion_tokens = usage["completion_tokens"]

    def _start(self, chunk: dict) -> list[bytes]:
        self._started = True
        usage = _usage(self._usage)
        usage["output_tokens"] = 1  # as Anthropic's message_start: the real count comes in message_delta
        message = {"id": _message_id(chunk.get("id")), "type": "message", "role": "assistant",
                   "model": self.model, "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": usage}
        return [_sse("message_start", {"type": "message_start", "message": message}),
                _sse("ping", {"type": "ping"})]

    def _choice(self, choice: dict) -> list[bytes]:
        delta = choice.get("delta") or {}
        if not isinstance(delta, dict):
            raise _malformed("a delta that is not an object")
        out = []
        for text in (delta.get("content"), delta.get("refusal")):
            if isinstance(text, str) and text:
                if self._open != "text":
                    out += self._open_block("text", {"type": "text", "text": ""})
                out.append(self._block_delta({"type": "text_delta", "text": text}))
        calls = delta.get("tool_calls") or []
        if not isinstance(calls, list):
            raise _malformed("tool_calls is not an array")
        for call in calls:
            out += self._tool_delta(call)
        finish = choice.get("finish_reason")
        if finish and self._stop_reason is None:
            out += self._close_block()
            self._stop_reason = _stop_reason(finish, bool(self._tool_blocks))
        return out

    def _tool_delta(self, call) -> list[bytes]:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise _malformed("a tool call delta without a function")
        index = call.get("index", 0)
        if not isinstance(index, int):
            raise _malformed("a tool call delta whose index is not an integer")
        out = []
        if index not in self._tool_blocks:
            if not isinstance(function.get("name"), str):
                raise _malformed(f"tool call {index} starts without a function name")
            block_index = self._blocks
            out += self._open_block(index, {"type": "tool_use", "id": _call_id(call.get("id"), block_index),
                                            "name": function["name"], "input": {}})
            self._tool_blocks[index] = block_index
        elif self._open != index:  # Anthropic cannot reopen a closed block
            raise _malformed(f"tool call {index} continues after another content began")
        arguments = function.get("arguments")
        if isinstance(arguments, dict):  # a few OpenAI-compatible servers send the object itself
            arguments = upstream_json(arguments).decode()
        if isinstance(arguments, str) and arguments:
            out.append(self._block_delta({"type": "input_json_delta", "partial_json": arguments}))
        return out

    def _open_block(self, kind, block: dict) -> list[bytes]:
        out = self._close_block()
        self._open = kind
        self._blocks += 1
        out.append(_sse("content_block_start",
                        {"type": "content_block_start", "index": self._blocks - 1, "content_block": block}))
        return out

    def _block_delta(self, delta: dict) -> bytes:
        return _sse("content_block_delta", {"type": "content_block_delta", "index": self._blocks - 1,
                                            "delta": delta})

    def _close_block(self) -> list[bytes]:
        if self._open is None:
            return []
        self._open = None
        return [_sse("content_block_stop", {"type": "content_block_stop", "index": self._blocks - 1})]

    def _message_delta(self) -> bytes:
        self._delta_sent = True
        stop_reason = self._stop_reason or _stop_reason(None, bool(self._tool_blocks))
        return _sse("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                                      "usage": _usage(self._usage)})

    def _done(self) -> list[bytes]:
        out = [] if self._started else self._start({})
        out += self._close_block()
        if not self._delta_sent:
            out.append(self._message_delta())
        out.append(_sse("message_stop", {"type": "message_stop"}))
        self.complete = True
        return out


# ------------------------------------------------------------------------------------------ count_tokens

# What /v1/messages/count_tokens looks at: the prompt. Sampling and output fields do not change the count.
_PROMPT_FIELDS = ("system", "messages", "tools", "tool_choice")


def count_tokens_local(body: dict, model: str) -> dict:
    """/v1/messages/count_tokens for an OpenAI-format deployment: the translated chat messages counted exactly
    as fastgw.tokens.exact.count_prompt counts a chat request (tool definitions are not counted, as there)."""
    if not isinstance(body, dict):
        raise _invalid("body", "must be a JSON object")
    chat = messages_request_to_chat({k: body[k] for k in _PROMPT_FIELDS if k in body}, model)
    return {"input_tokens": count_chat(chat["messages"], model)}
