"""OpenAI Chat Completions in front of the Gemini API (v1beta generateContent, streamGenerateContent?alt=sse).

Field names are Gemini's REST (camelCase) ones, as in Google's API reference and the google-genai SDK. The
model goes in the URL (models/<id>:generateContent), so the request translation never writes it.

Choices made where the two APIs differ (each one a deliberate answer, not an accident):
- JSON Schemas travel as JSON Schema: tool parameters go in `parametersJsonSchema` and a json_schema
  response_format in `responseJsonSchema`. Gemini's older `parameters` / `responseSchema` take an OpenAPI
  subset that refuses what OpenAI schemas routinely hold (additionalProperties, $defs, ...).
- System and developer messages, wherever they stand, become the one `systemInstruction`, in order.
- Tool call ids are "call_<n>", unique within one response; a tool message finds its function name in the
  latest assistant message that declared its id (so ids repeated across responses stay unambiguous).
- Gemini's thoughtSignature on a function call (Gemini 3 refuses a tool-call history without it) travels to
  the client as tool_calls[].extra_content.google.thought_signature, the place Google's own OpenAI-compatible
  endpoint uses, and comes back from the assistant message into the functionCall part.
- Thought parts (thought: true) are dropped; their tokens count as completion tokens (reasoning_tokens). So
  are the signatures Gemini puts on text parts: only function-call signatures are required back.
- A prompt Gemini blocks (promptFeedback.blockReason, no candidates) is a 400 with code "content_filter"
  (Azure OpenAI's answer to a filtered prompt). A stream has already answered 200 by then: it ends normally
  with finish_reason "content_filter" instead.
- reasoning_effort none/low/medium/high becomes thinkingConfig.thinkingBudget 0/1024/8192/24576, the mapping
  Google documents for its OpenAI-compatible endpoint.
- Fields that only tune OpenAI's own service (store, metadata, user, prompt_cache_*, service_tier,
  prediction, ...) are ignored; every other field Gemini cannot express is refused with a 400.
"""
from __future__ import annotations

import itertools
import os
import time

import orjson

from fastgw.errors import GatewayError, error_type
from fastgw.providers.wire.encode import upstream_json

# ------------------------------------------------------------------------------------------------ request

# Fields with no effect on the generated answer: safe to drop.
_IGNORED = frozenset({
    "model", "stream", "stream_options", "user", "metadata", "store", "safety_identifier", "prompt_cache_key",
    "prompt_cache_retention", "prompt_cache_options", "service_tier", "prediction",
})
# Fields Gemini cannot express, with the reason given to the client.
_REFUSED = {
    "logit_bias": "Gemini has no token bias",
    "logprobs": "log probabilities are not translated from Gemini",
    "top_logprobs": "log probabilities are not translated from Gemini",
    "audio": "audio output is not available through Gemini's generateContent translation",
    "functions": "the deprecated `functions` is not translated; use `tools`",
    "function_call": "the deprecated `function_call` is not translated; use `tool_choice`",
    "moderation": "Gemini has no OpenAI moderation",
    "web_search_options": "Gemini's search grounding is not translated",
    "verbosity": "Gemini has no verbosity setting",
}
# top_k is not OpenAI's, but clients of OpenAI-compatible servers send it and Gemini has it.
_SAMPLING = {"temperature": "temperature", "top_p": "topP", "top_k": "topK", "seed": "seed",
             "presence_penalty": "presencePenalty", "frequency_penalty": "frequencyPenalty"}
_TRANSLATED = frozenset({
    "messages", "max_tokens", "max_completion_tokens", "n", "stop", "response_format", "reasoning_effort",
    "modalities", "parallel_tool_calls", "tools", "tool_choice", *_SAMPLING,
})
_THINKING_BUDGET = {"none": 0, "low": 1024, "medium": 8192, "high": 24576}
_TOOL_CHOICE_MODE = {"none": "NONE", "auto": "AUTO", "required": "ANY"}
_IMAGE_TYPES = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp",
                "gif": "image/gif", "heic": "image/heic", "heif": "image/heif"}
_AUDIO_TYPES = {"wav": "audio/wav", "mp3": "audio/mp3"}


def _unsupported(param: str, why: str) -> GatewayError:
    return GatewayError(400, f"`{param}`: {why}.", param=param, code="unsupported_parameter")


def _invalid(param: str, why: str) -> GatewayError:
    return GatewayError(400, f"`{param}`: {why}.", param=param, code="invalid_value")


def chat_request_to_gemini(body: dict) -> dict:
    """An OpenAI chat.completions request body -> a Gemini GenerateContentRequest body."""
    if not isinstance(body, dict):
        raise _invalid("body", "the request body must be a JSON object")
    for key, value in body.items():
        if key in _REFUSED and value not in (None, False, {}, []):
            raise _unsupported(key, _REFUSED[key])
        if key not in _IGNORED and key not in _REFUSED and key not in _TRANSLATED:
            raise _unsupported(key, "not a Chat Completions parameter that translates to Gemini")

    system, contents = _messages(body.get("messages"))
    request: dict = {"contents": contents}
    if system:
        request["systemInstruction"] = {"parts": system}
    config = _generation_config(body)
    if config:
        request["generationConfig"] = config
    declarations = _function_declarations(body.get("tools"))
    if declarations:
        request["tools"] = [{"functionDeclarations": declarations}]
    if body.get("tool_choice") is not None:
        request["toolConfig"] = {"functionCallingConfig": _function_calling_config(body["tool_choice"])}
    return request


def _generation_config(body: dict) -> dict:
    config: dict = {}
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is not None:
        config["maxOutputTokens"] = max_tokens
    for ours, theirs in _SAMPLING.items():
        if body.get(ours) is not None:
            config[theirs] = body[ours]
    stop = body.get("stop")
    if stop is not None:
        config["stopSequences"] = [stop] if isinstance(stop, str) else stop
    n = body.get("n")
    if n is not None:
        if body.get("stream") and n != 1:
            raise _unsupported("n", "several choices cannot be streamed from Gemini; use n=1 or stream=false")
        config["candidateCount"] = n
    _response_format(body.get("response_format"), config)
    effort = body.get("reasoning_effort")
    if effort is not None:
        if not isinstance(effort, str) or effort not in _THINKING_BUDGET:
            raise _unsupported("reasoning_effort", f"Gemini takes none, low, medium or high, not {effort!r}")
        config["thinkingConfig"] = {"thinkingBudget": _THINKING_BUDGET[effort]}
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise _unsupported("modalities", "only text output is translated from Gemini")
    if body.get("parallel_tool_calls") is False:
        raise _unsupported("parallel_tool_calls", "Gemini cannot be limited to one tool call per turn")
    return config


def _response_format(fmt, config: dict) -> None:
    if fmt is None:
        return
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return
    if kind == "json_object":
        config["responseMimeType"] = "application/json"
    elif kind == "json_schema":
        config["responseMimeType"] = "application/json"
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise _invalid("response_format.json_schema", "must be an object")
        if spec.get("schema") is not None:
            config["responseJsonSchema"] = spec["schema"]     # `strict` has no Gemini switch: ignored
    else:
        raise _unsupported("response_format.type", f"{kind!r} has no Gemini equivalent")


def _function_declarations(tools) -> list:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _invalid("tools", "must be an array")
    declarations = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise _unsupported(f"tools[{i}]", "only function tools translate to Gemini")
        function = tool["function"]
        if not isinstance(function.get("name"), str):
            raise _invalid(f"tools[{i}].function.name", "must be a string")
        declaration = {"name": function["name"]}
        if function.get("description") is not None:
            declaration["description"] = function["description"]
        if function.get("parameters") is not None:
            declaration["parametersJsonSchema"] = function["parameters"]
        # `strict` is ignored: Gemini has no switch for it, and SDK-made tools (pydantic_function_tool) set it.
        declarations.append(declaration)
    return declarations


def _function_calling_config(choice) -> dict:
    if isinstance(choice, str) and choice in _TOOL_CHOICE_MODE:
        return {"mode": _TOOL_CHOICE_MODE[choice]}
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = _get(choice.get("function"), "name")
        if isinstance(name, str):
            return {"mode": "ANY", "allowedFunctionNames": [name]}
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        allowed = choice.get("allowed_tools")
        tools = _get(allowed, "tools")
        names = [_get(t.get("function"), "name") for t in (tools if isinstance(tools, list) else ())
                 if isinstance(t, dict) and t.get("type") == "function"]
        # VALIDATED: text or a call limited to the names, which is what mode "auto" asks for.
        mode = _get(allowed, "mode")
        mode = {"auto": "VALIDATED", "required": "ANY"}.get(mode) if isinstance(mode, str) else None
        if mode and names and all(isinstance(n, str) for n in names):
            return {"mode": mode, "allowedFunctionNames": names}
    raise _unsupported("tool_choice", "Gemini takes none, auto, required, a named function or allowed function tools")


def _get(obj, key: str):
    """obj[key] when obj is an object that has it, else None (a client may send any JSON where one is due)."""
    return obj.get(key) if isinstance(obj, dict) else None


# -- messages

def _messages(messages) -> tuple[list, list]:
    """(systemInstruction parts, contents). Consecutive turns of one role are merged: Gemini wants them
    alternating, and a run of tool results must form one user turn."""
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "must be a non-empty array")
    system: list = []
    contents: list = []
    tool_names: dict = {}   # tool_call_id -> function name, from the latest assistant message declaring it
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _invalid(where, "must be an object")
        role = message.get("role")
        if role in ("system", "developer"):
            system += _text_parts(message.get("content"), where)
        elif role == "user":
            _append(contents, "user", _user_parts(message.get("content"), where))
        elif role == "assistant":
            _append(contents, "model", _assistant_parts(message, where, tool_names))
        elif role == "tool":
            _append(contents, "user", [_function_response(message, where, tool_names)])
        elif role == "function":
            raise _unsupported(f"{where}.role", "the deprecated function role is not translated; use tool")
        else:
            raise _invalid(f"{where}.role", f"unknown role {role!r}")
    if not contents:
        raise _invalid("messages", "Gemini needs at least one user or assistant message")
    return system, contents


def _append(contents: list, role: str, parts: list) -> None:
    if not parts:
        return      # an empty turn (content "" or null): Gemini refuses empty parts
    if contents and contents[-1]["role"] == role:
        contents[-1]["parts"].extend(parts)
    else:
        contents.append({"role": role, "parts": parts})


def _text_parts(content, where: str, kinds=("text",)) -> list:
    """Text-only content (a string or text parts; `kinds` adds "refusal" for assistants) -> text parts.
    Empty strings are left out: Gemini refuses an empty text part."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []
    if not isinstance(content, list):
        raise _invalid(f"{where}.content", "must be a string or an array of content parts")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in kinds or not isinstance(part.get(kind), str):
            raise _unsupported(f"{where}.content[{j}]", f"only {' and '.join(kinds)} parts are allowed here")
        if part[kind]:
            parts.append({"text": part[kind]})
    return parts


def _user_parts(content, where: str) -> list:
    if not isinstance(content, list):
        return _text_parts(content, where)
    parts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if part["text"]:
                parts.append({"text": part["text"]})
        elif kind == "image_url" and isinstance(part.get("image_url"), dict):
            parts.append(_image_part(part["image_url"].get("url"), f"{at}.image_url.url"))
        elif kind == "input_audio" and isinstance(part.get("input_audio"), dict):
            audio = part["input_audio"]
            mime = _AUDIO_TYPES.get(audio.get("format")) if isinstance(audio.get("format"), str) else None
            if mime is None or not isinstance(audio.get("data"), str):
                raise _invalid(f"{at}.input_audio", "needs base64 `data` and a `format` of wav or mp3")
            parts.append({"inlineData": {"mimeType": mime, "data": audio["data"]}})
        elif kind == "file" and isinstance(part.get("file"), dict):
            data = part["file"].get("file_data")
            if not isinstance(data, str) or not data.startswith("data:"):
                raise _unsupported(f"{at}.file", "Gemini needs the file inline, as a data: URL in `file_data`")
            parts.append(_data_url_part(data, f"{at}.file.file_data"))
        else:
            raise _unsupported(at, f"content part type {kind!r} does not translate to Gemini")
    return parts


def _image_part(url, where: str) -> dict:
    if not isinstance(url, str):
        raise _invalid(where, "must be a string")
    if url.startswith("data:"):
        return _data_url_part(url, where)
    if url.startswith(("https://", "http://")):
        path = url.split("?", 1)[0].split("#", 1)[0]
        mime = _IMAGE_TYPES.get(path.rsplit(".", 1)[-1].lower()) if "." in path.rsplit("/", 1)[-1] else None
        if mime is None:
            raise _unsupported(where, "Gemini needs the image's MIME type and the URL has no known image "
                                      "extension (png, jpg, jpeg, webp, gif, heic, heif); send a data: URL")
        return {"fileData": {"mimeType": mime, "fileUri": url}}
    raise _invalid(where, "must be an http(s) URL or a data: URL")


def _data_url_part(url: str, where: str) -> dict:
    header, comma, data = url.partition(",")
    mime, _, encoding = header[len("data:"):].partition(";")
    if not comma or encoding != "base64" or not mime:
        raise _invalid(where, "a data: URL must be data:<mime type>;base64,<data>")
    return {"inlineData": {"mimeType": mime, "data": data}}


def _assistant_parts(message: dict, where: str, tool_names: dict) -> list:
    if message.get("audio") is not None:
        raise _unsupported(f"{where}.audio", "audio does not translate to Gemini")
    if message.get("function_call") is not None:
        raise _unsupported(f"{where}.function_call", "the deprecated function_call is not translated; use tool_calls")
    parts = _text_parts(message.get("content"), where, kinds=("text", "refusal"))
    calls = message.get("tool_calls")
    if calls is None:
        return parts
    if not isinstance(calls, list):
        raise _invalid(f"{where}.tool_calls", "must be an array")
    for k, call in enumerate(calls):
        at = f"{where}.tool_calls[{k}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or call.get("type", "function") != "function":
            raise _unsupported(at, "only function tool calls translate to Gemini")
        name, arguments = function.get("name"), function.get("arguments")
        if not isinstance(name, str) or not isinstance(call.get("id"), str):
            raise _invalid(at, "needs an `id` and a `function.name`")
        try:
            args = orjson.loads(arguments) if arguments else {}
        except (orjson.JSONDecodeError, TypeError):
            args = None
        if not isinstance(args, dict):
            raise _invalid(f"{at}.function.arguments", "Gemini needs the arguments as a JSON object")
        part = {"functionCall": {"name": name, "args": args}}
        signature = _get(_get(call.get("extra_content"), "google"), "thought_signature")
        if isinstance(signature, str):
            part["thoughtSignature"] = signature
        parts.append(part)
        tool_names[call["id"]] = name
    return parts


def _function_response(message: dict, where: str, tool_names: dict) -> dict:
    call_id = message.get("tool_call_id")
    name = tool_names.get(call_id) if isinstance(call_id, str) else None
    if name is None:
        raise _invalid(f"{where}.tool_call_id", "matches no tool call of an earlier assistant message")
    text = "".join(p["text"] for p in _text_parts(message.get("content"), where))
    try:
        response = orjson.loads(text)
    except orjson.JSONDecodeError:
        response = None
    if not isinstance(response, dict):
        response = {"content": text}
    return {"functionResponse": {"name": name, "response": response}}


# ----------------------------------------------------------------------------------------------- response

_FINISH_REASON = {
    "STOP": "stop", "MAX_TOKENS": "length",
    "SAFETY": "content_filter", "RECITATION": "content_filter", "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter", "IMAGE_SAFETY": "content_filter",
    "IMAGE_PROHIBITED_CONTENT": "content_filter", "IMAGE_RECITATION": "content_filter",
}   # anything else (OTHER, LANGUAGE, MALFORMED_FUNCTION_CALL, ...) has no OpenAI name: "stop"


def _malformed(what: str) -> GatewayError:
    return GatewayError(502, f"Gemini sent a malformed response: {what}.", type="upstream_error",
                        code="upstream_malformed")


def _finish_reason(reason, has_calls: bool) -> str:
    mapped = _FINISH_REASON.get(reason, "stop") if isinstance(reason, str) else "stop"
    return "tool_calls" if mapped == "stop" and has_calls else mapped


def _completion_id(resp: dict) -> str:
    response_id = resp.get("responseId")
    return "chatcmpl-" + (response_id if isinstance(response_id, str) and response_id else os.urandom(12).hex())


def _parts(candidate) -> list:
    """A candidate's answer parts, thoughts left out. A candidate may have no content (a SAFETY stop)."""
    if not isinstance(candidate, dict):
        raise _malformed("a candidate is not an object")
    content = candidate.get("content") or {}
    parts = content.get("parts", []) if isinstance(content, dict) else None
    if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
        raise _malformed("a candidate's content.parts is not an array of objects")
    return [p for p in parts if not p.get("thought")]


def _tool_call(part: dict, number: int) -> dict:
    call = part["functionCall"]
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise _malformed("a functionCall has no name")
    args = call.get("args")
    tool_call = {"id": f"call_{number}", "type": "function",
                 "function": {"name": call["name"], "arguments": upstream_json(args or {}).decode()}}
    if isinstance(part.get("thoughtSignature"), str):
        tool_call["extra_content"] = {"google": {"thought_signature": part["thoughtSignature"]}}
    return tool_call


MAX_COUNT = 2**53      # a token count above this is no count (and sums of counts must fit the exchange's int64)


def _usage(meta) -> dict | None:
    if meta is None:
        return None
    if not isinstance(meta, dict):
        raise _malformed("usageMetadata is not an object")
    counts = {}
    for key in ("promptTokenCount", "toolUsePromptTokenCount", "candidatesTokenCount", "thoughtsTokenCount",
                "cachedContentTokenCount"):
        value = meta.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < MAX_COUNT:
            raise _malformed(f"usageMetadata.{key} is not a token count")
        counts[key] = value
    # promptTokenCount already includes cached tokens; tool-use prompt tokens are input too.
    prompt = counts["promptTokenCount"] + counts["toolUsePromptTokenCount"]
    completion = counts["candidatesTokenCount"] + counts["thoughtsTokenCount"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": counts["cachedContentTokenCount"]},
            "completion_tokens_details": {"reasoning_tokens": counts["thoughtsTokenCount"]}}


def _blocked(resp: dict) -> str | None:
    feedback = resp.get("promptFeedback")
    reason = feedback.get("blockReason") if isinstance(feedback, dict) else None
    return reason if isinstance(reason, str) else None


def gemini_response_to_chat(resp: dict, model: str) -> dict:
    """A Gemini GenerateContentResponse -> an OpenAI chat.completion object for `model`."""
    if not isinstance(resp, dict):
        raise _malformed("the body is not a JSON object")
    candidates = resp.get("candidates")
    if not candidates:
        reason = _blocked(resp)
        if reason is not None:
            raise GatewayError(400, f"Gemini blocked the prompt (blockReason {reason}).", param="messages",
                               code="content_filter")
        raise _malformed("no candidates and no blockReason")
    if not isinstance(candidates, list):
        raise _malformed("candidates is not an array")
    numbers = itertools.count()      # tool call ids, unique across the candidates
    choices = []
    for position, candidate in enumerate(candidates):
        parts = _parts(candidate)
        texts = [p["text"] for p in parts if isinstance(p.get("text"), str)]
        calls = [_tool_call(p, next(numbers)) for p in parts if "functionCall" in p]
        text = "".join(texts)
        # null when there is no text, as OpenAI answers a pure tool call (Gemini may add an empty signed part)
        content = text if text or (texts and not calls) else None
        message = {"role": "assistant", "content": content, "refusal": None}
        if calls:
            message["tool_calls"] = calls
        index = candidate.get("index")
        choices.append({"index": index if isinstance(index, int) else position, "message": message, "logprobs": None,
                        "finish_reason": _finish_reason(candidate.get("finishReason"), bool(calls))})
    completion = {"id": _completion_id(resp), "object": "chat.completion", "created": int(time.time()),
                  "model": model, "choices": choices}
    usage = _usage(resp.get("usageMetadata"))
    if usage is not None:
        completion["usage"] = usage
    return completion


# ------------------------------------------------------------------------------------------------- errors

# Gemini's error status -> the status the client gets. The provider key being refused (UNAUTHENTICATED,
# PERMISSION_DENIED, API_KEY_INVALID) is the gateway's fault, not the client's: 502, never 401/403. So are
# FAILED_PRECONDITION (billing, region) and Gemini's own failures (INTERNAL, UNKNOWN, ...).
_ERROR_STATUS = {
    "INVALID_ARGUMENT": 400, "OUT_OF_RANGE": 400, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}
_PASSED_HTTP = {400, 404, 413, 429, 503, 504}   # when Gemini names no status, the HTTP status passed as is
_AUTH = {"UNAUTHENTICATED", "PERMISSION_DENIED"}


def _openai_error(status: int, message: str, code: str | None, type: str | None = None) -> dict:
    return {"error": {"message": message, "type": type or error_type(status), "param": None, "code": code}}


def _key_invalid(error: dict) -> bool:
    details = error.get("details")
    return isinstance(details, list) and any(
        isinstance(d, dict) and d.get("reason") == "API_KEY_INVALID" for d in details)


def _translate_error(http_status: int, error: dict) -> tuple[int, dict]:
    status = error.get("status") if isinstance(error.get("status"), str) else None
    message = error.get("message") if isinstance(error.get("message"), str) else "(no message)"
    if status in _AUTH or _key_invalid(error) or (status is None and http_status in (401, 403)):
        return 502, _openai_error(502, f"Gemini refused the gateway's credentials for this deployment "
                                       f"({status or http_status}): {message}", "upstream_auth", "upstream_error")
    client_status = _ERROR_STATUS.get(status) if status else (http_status if http_status in _PASSED_HTTP else None)
    if client_status is None:
        return 502, _openai_error(502, f"Gemini failed ({status or http_status}): {message}", "upstream_error",
                                  "upstream_error")
    return client_status, _openai_error(client_status, message, status.lower() if status else None)


def gemini_error_to_chat(status: int, body: bytes) -> tuple[int, dict]:
    """A Gemini error response (HTTP status, body) -> (the status for the client, an OpenAI error object)."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, list) and len(parsed) == 1:
        parsed = parsed[0]      # some Gemini front ends wrap the error in an array
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(error, dict):
        return 502, _openai_error(502, f"Gemini answered HTTP {status} with a body that is not a Gemini error.",
                                  "upstream_malformed", "upstream_error")
    return _translate_error(status, error)


# ------------------------------------------------------------------------------------------------- stream

class GeminiToChatStream:
    """streamGenerateContent?alt=sse events -> chat.completion.chunk SSE blocks (the translator interface of the
    relay). Gemini sends whole GenerateContentResponses with no event names and no end marker: the candidate
    carrying a finishReason is the normal end. Only one candidate is streamed (n > 1 is refused with stream)."""

    def __init__(self, model: str, include_usage: bool):
        self.model = model
        self.include_usage = include_usage
        self.prompt_tokens = -1
        self.completion_tokens = -1
        self.complete = False
        self._id: str | None = None
        self._created = int(time.time())
        self._usage: dict | None = None
        self._started = False       # the role chunk was sent
        self._calls = 0             # tool calls sent: the next one's index and id number

    def event(self, name: str | None, data: bytes) -> list[bytes]:
        try:
            resp = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise _malformed("a stream event is not JSON") from None
        if not isinstance(resp, dict):
            raise _malformed("a stream event is not a JSON object")
        if isinstance(resp.get("error"), dict):
            # An error after the 200: passed on as OpenAI does mid-stream; not complete, so the relay closes.
            error = resp["error"]
            http_status = error["code"] if isinstance(error.get("code"), int) else 500
            return [b"data: " + orjson.dumps(_translate_error(http_status, error)[1]) + b"\n\n"]
        self._note_usage(resp.get("usageMetadata"))
        if self.complete:
            return []
        if self._id is None:
            self._id = _completion_id(resp)
        blocks = [] if self._started else [self._chunk({"role": "assistant", "content": "", "refusal": None})]
        self._started = True
        candidates = resp.get("candidates")
        if not candidates:
            if _blocked(resp) is not None:
                self.complete = True
                blocks.append(self._chunk({}, "content_filter"))
            return blocks
        if not isinstance(candidates, list):
            raise _malformed("candidates is not an array")
        candidate = candidates[0]
        for part in _parts(candidate):
            if "functionCall" in part:
                call = _tool_call(part, self._calls)
                call["index"] = self._calls
                self._calls += 1
                blocks.append(self._chunk({"tool_calls": [call]}))
            elif isinstance(part.get("text"), str) and part["text"]:
                blocks.append(self._chunk({"content": part["text"]}))
        reason = candidate.get("finishReason")
        if reason:
            self.complete = True
            blocks.append(self._chunk({}, _finish_reason(reason, self._calls > 0)))
        return blocks

    def finish(self) -> list[bytes]:
        if not self.complete:
            return []
        blocks = []
        if self.include_usage and self._usage is not None:
            chunk = {"id": self._id, "object": "chat.completion.chunk", "created": self._created,
                     "model": self.model, "choices": [], "usage": self._usage}
            blocks.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
        blocks.append(b"data: [DONE]\n\n")
        return blocks

    def _note_usage(self, meta) -> None:
        """Every chunk may carry usageMetadata, the counts so far; the last one is final."""
        usage = _usage(meta)
        if usage is None:
            return
        self._usage = usage
        if "promptTokenCount" in meta:
            self.prompt_tokens = usage["prompt_tokens"]
        if "candidatesTokenCount" in meta or "thoughtsTokenCount" in meta:
            self.completion_tokens = usage["completion_tokens"]

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> bytes:
        chunk = {"id": self._id, "object": "chat.completion.chunk", "created": self._created, "model": self.model,
                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        if self.include_usage:
            chunk["usage"] = None
        return b"data: " + orjson.dumps(chunk) + b"\n\n"
