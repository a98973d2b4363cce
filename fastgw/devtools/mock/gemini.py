"""The Gemini API (v1beta) of the mock: POST /v1beta/models/{model}:generateContent, :streamGenerateContent and
:countTokens, shaped as Google's reference and its recorded responses (tests/data/wire/gemini/) show them.

The key comes in an x-goog-api-key header or a key= query parameter (any non-empty value; else 403
PERMISSION_DENIED). The body needs a non-empty `contents` (else 400 INVALID_ARGUMENT, Google's message), each
content's role "user" or "model" (or none). Fields are camelCase as Google sends them; requests may also use
the snake_case names the API accepts (function_declarations, tool_config, generation_config).

A text answer is x-mock-chunks pieces, at most generationConfig.maxOutputTokens of them (then finishReason
MAX_TOKENS, else STOP), rendered once per key into byte templates. usageMetadata: promptTokenCount is
len(body) // 4, candidatesTokenCount the number of pieces (left out when 0: proto3 JSON omits zeros). Streams:
  ?alt=sse   one SSE event per piece, `data: {...}\\r\\n\\r\\n`; every event carries usageMetadata with the prompt
             count, the last one has finishReason and the candidates count too (as Gemini sends them)
  no alt     the same GenerateContentResponse objects as one JSON array, streamed element by element
             (`[{...}`, `,\\r\\n{...}`, ..., `]`): Gemini's default, which the REST clients that do not ask
             for SSE read
x-mock-no-usage does not apply (Gemini always reports usage).

Function calling: when tools hold functionDeclarations, toolConfig.functionCallingConfig.mode is not NONE and
the last user turn has no functionResponse part, the answer is one functionCall part calling the first
declared function (the first of allowedFunctionNames when given) with args built from its parameters schema
(tools.example_arguments), finishReason STOP; a stream sends it in one event, as Gemini does.

Errors have Google's shape, {"error": {"code", "message", "status"}}: 400 INVALID_ARGUMENT, 403
PERMISSION_DENIED, 404 NOT_FOUND, 429 RESOURCE_EXHAUSTED (with a RetryInfo detail), 500 INTERNAL, 503
UNAVAILABLE, ...
"""
from __future__ import annotations

import time

import orjson

from fastgw.devtools.mock import tools
from fastgw.devtools.mock.wire import (
    PROMPT_TOKENS as _P, TOTAL_TOKENS as _T, Canned, JsonReply, MockRequest, Refusal, StreamReply, TemplateCache,
    fill, frame, pieces, template)

PREFIX = b"/v1beta/models/"
JSON = b"application/json; charset=UTF-8"
SSE = b"text/event-stream"

_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
           409: "ABORTED", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL", 501: "UNIMPLEMENTED",
           503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
UNREGISTERED = ("Method doesn't allow unregistered callers (callers without established identity). "
                "Please use API Key or other form of API consumer identity to call this API.")
NO_CONTENTS = "* GenerateContentRequest.contents: contents is not specified\n"


def error_status(status: int) -> str:
    return _STATUS.get(status, "INTERNAL" if status >= 500 else "INVALID_ARGUMENT")


def error_body(status: int, message: str, code: str | None = None) -> bytes:
    """Google's error JSON for `status` (the route table's error function; `code` has no place in it)."""
    error = {"code": status, "message": message, "status": error_status(status)}
    if status == 429:
        error["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1s"}]
    return orjson.dumps({"error": error})


# -- rendering ------------------------------------------------------------------------------------------------

def _usage(candidates: int | None) -> dict:
    """usageMetadata; `candidates` None in a stream's events before the last (they count the prompt only)."""
    details = [{"modality": "TEXT", "tokenCount": _P}]
    if candidates is None:
        return {"promptTokenCount": _P, "totalTokenCount": _P, "promptTokensDetails": details}
    usage = {"promptTokenCount": _P, "candidatesTokenCount": candidates, "totalTokenCount": _T,
             "promptTokensDetails": details, "candidatesTokensDetails": [{"modality": "TEXT",
                                                                          "tokenCount": candidates}]}
    if not candidates:
        del usage["candidatesTokenCount"], usage["candidatesTokensDetails"]
    return usage


def _render(model: str, stream: bool, sse: bool, parts: list[dict], finish: str, candidates: int) -> Canned:
    """A response of `parts`: one object, or (stream) one event per part, the last with finishReason."""
    created = int(time.time())
    base = {"modelVersion": model, "responseId": f"mock{created:x}"}

    def response(part_list, last):
        candidate = {"content": {"parts": part_list, "role": "model"}}
        if last:
            candidate["finishReason"] = finish
        candidate["index"] = 0
        return dict(candidates=[candidate], usageMetadata=_usage(candidates if last else None), **base)

    if not stream:
        return Canned(body=template(response(parts, True)))
    objects = [template(response([p], i == len(parts) - 1)) for i, p in enumerate(parts)]
    if sse:
        events = [b"data: " + o + b"\r\n\r\n" for o in objects]
        return Canned(events=events, templated=range(len(events)))
    events = [(b"[" if i == 0 else b",\r\n") + o for i, o in enumerate(objects)] + [frame(b"]")]
    return Canned(events=events, templated=range(len(objects)))


def render_text(model: str, stream: bool, sse: bool, n: int, finish: str, content: str | None = None) -> Canned:
    """A text answer of n canned pieces (or `content` as one piece); a stream sends one piece per event."""
    texts = pieces(n, content)
    if stream:
        parts = [{"text": t} for t in texts] or [{"text": ""}]
    else:
        parts = [{"text": "".join(texts)}]
    return _render(model, stream, sse, parts, finish, n)


def render_function_call(model: str, stream: bool, sse: bool, name: str, args: dict) -> tuple[Canned, int]:
    """A call of function `name`; (answer, candidatesTokenCount)."""
    candidates = len(tools.fragments(tools.arguments_json(args)))
    return _render(model, stream, sse, [{"functionCall": {"name": name, "args": args}}], "STOP", candidates), \
        candidates


_TEXT = TemplateCache(render_text)


# -- the request ----------------------------------------------------------------------------------------------

def _field(obj: dict, camel: str, snake: str):
    value = obj.get(camel)
    return obj.get(snake) if value is None else value


def _checked(req: MockRequest) -> dict:
    """The request body, after Gemini's key and body checks (a Refusal in Google's words)."""
    if not req.header(b"x-goog-api-key") and not req.query_param("key"):
        raise Refusal(403, UNREGISTERED)
    try:
        obj = orjson.loads(req.body)
    except orjson.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        raise Refusal(400, "Invalid JSON payload received. Expected an object.")
    return obj


def _check_contents(contents) -> None:
    if not contents:
        raise Refusal(400, NO_CONTENTS)
    if not isinstance(contents, list):
        raise Refusal(400, "Invalid JSON payload received. Invalid value at 'contents': expected a list.")
    for i, content in enumerate(contents):
        if not isinstance(content, dict):
            raise Refusal(400, f"Invalid JSON payload received. Invalid value at 'contents[{i}]'.")
        if content.get("role") not in (None, "user", "model"):
            raise Refusal(400, "Please use a valid role: user, model.")
        if not content.get("parts"):
            raise Refusal(400, f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty.\n")


def _function_call(obj: dict) -> tuple[str, dict] | None:
    """(name, args) of the function the answer calls, or None for a text answer (see the docstring)."""
    declarations = []
    for tool in obj.get("tools") or ():
        if isinstance(tool, dict):
            declared = _field(tool, "functionDeclarations", "function_declarations")
            if isinstance(declared, list):
                declarations += [d for d in declared if isinstance(d, dict) and isinstance(d.get("name"), str)]
    if not declarations:
        return None
    config = _field(obj, "toolConfig", "tool_config")
    calling = _field(config, "functionCallingConfig", "function_calling_config") if isinstance(config, dict) else None
    calling = calling if isinstance(calling, dict) else {}
    mode = calling.get("mode")
    if (isinstance(mode, str) and mode.upper() == "NONE") or _answers_function_responses(obj["contents"]):
        return None
    allowed = _field(calling, "allowedFunctionNames", "allowed_function_names")
    if allowed:
        declaration = next((d for name in allowed for d in declarations if d["name"] == name), None)
        if declaration is None:
            raise Refusal(400, f"allowedFunctionNames {allowed!r} names no declared function.")
    else:
        declaration = declarations[0]
    schema = declaration.get("parameters")
    if schema is None:
        schema = _field(declaration, "parametersJsonSchema", "parameters_json_schema")
    return declaration["name"], tools.example_arguments(schema)


def _answers_function_responses(contents: list) -> bool:
    """True when the last user turn carries a functionResponse part: the model answers it with text."""
    last_user = next((c for c in reversed(contents) if c.get("role", "user") == "user"), None)
    parts = last_user.get("parts") if last_user is not None else None
    return isinstance(parts, list) and any(
        isinstance(p, dict) and ("functionResponse" in p or "function_response" in p) for p in parts)


def _max_output_tokens(obj: dict) -> int | None:
    config = _field(obj, "generationConfig", "generation_config")
    if not isinstance(config, dict):
        return None
    value = _field(config, "maxOutputTokens", "max_output_tokens")
    return value if value.__class__ is int and value > 0 else None


# -- handlers -----------------------------------------------------------------------------------------------

def generate(req: MockRequest, obj: dict, model: str, stream: bool):
    _check_contents(obj.get("contents"))
    sse = stream and req.query_param("alt") == "sse"
    content_type = SSE if sse else JSON
    prompt = len(req.body) // 4
    call = _function_call(obj) if "tools" in obj else None
    if call is not None:  # rendered for this request only: the declarations are the client's
        canned, candidates = render_function_call(model, stream, sse, *call)
        if stream:
            return StreamReply(canned.events_for(prompt, candidates), content_type)
        return JsonReply(200, canned.body_for(prompt, candidates))
    n = req.chunks
    finish = "STOP"
    limit = _max_output_tokens(obj)
    if limit is not None and n > limit:
        n, finish = limit, "MAX_TOKENS"
    if stream:
        return StreamReply(_TEXT.get(model, True, sse, n, finish).events_for(prompt, n), content_type)
    if req.echo_headers:  # one piece: the headers; rendered for this request only (never cached)
        return JsonReply(200, fill(render_text(model, False, False, 1, finish, req.echoed_headers()).body, prompt, 1))
    return JsonReply(200, _TEXT.get(model, False, False, n, finish).body_for(prompt, n))


def count_tokens(req: MockRequest, obj: dict, model: str, stream: bool) -> JsonReply:
    inner = obj.get("generateContentRequest")
    _check_contents((inner if isinstance(inner, dict) else obj).get("contents"))
    n = len(req.body) // 4
    return JsonReply(200, orjson.dumps({"totalTokens": n, "promptTokensDetails": [
        {"modality": "TEXT", "tokenCount": n}]}))


# method -> (handler, streams)
_METHODS = {
    "generateContent": (generate, False),
    "streamGenerateContent": (generate, True),
    "countTokens": (count_tokens, False),
}


_CHAT_METHODS = ["generateContent", "countTokens", "createCachedContent", "batchGenerateContent"]
# GET /v1beta/models: (id, displayName, supportedGenerationMethods); an embedding model among them, as Google's
# list has them.
MODELS = (("gemini-2.5-pro", "Gemini 2.5 Pro", _CHAT_METHODS),
          ("gemini-2.5-flash", "Gemini 2.5 Flash", _CHAT_METHODS),
          ("text-embedding-004", "Text Embedding 004", ["embedContent"]),
          ("gemini-2.0-flash", "Gemini 2.0 Flash", _CHAT_METHODS))


def list_models(req: MockRequest) -> JsonReply:
    """GET /v1beta/models: the page at `pageToken` of `pageSize` models (default 50, at most 1000)."""
    if not req.header(b"x-goog-api-key") and not req.query_param("key"):
        raise Refusal(403, UNREGISTERED)
    try:
        size = int(req.query_param("pageSize") or 50)
        start = int(req.query_param("pageToken") or 0)
    except ValueError:
        raise Refusal(400, "Invalid pageSize or pageToken.") from None
    if size < 1 or not 0 <= start <= len(MODELS):
        raise Refusal(400, "Invalid pageSize or pageToken.")
    size = min(size, 1000)
    out = {"models": [{"name": f"models/{i}", "version": "001", "displayName": name, "description": name,
                       "inputTokenLimit": 1048576, "outputTokenLimit": 65536,
                       "supportedGenerationMethods": methods} for i, name, methods in MODELS[start:start + size]]}
    if start + size < len(MODELS):
        out["nextPageToken"] = str(start + size)       # opaque to clients; an offset here
    return JsonReply(200, orjson.dumps(out))


def models(req: MockRequest):
    """POST /v1beta/models/{model}:{method}."""
    model, _, method = req.path[len(PREFIX):].decode("latin-1").rpartition(":")
    handler = _METHODS.get(method)
    if not model or handler is None:
        raise Refusal(404, f"Method not found: {req.path.decode('latin-1')}")
    obj = _checked(req)
    return handler[0](req, obj, model, handler[1])


ROUTES = (
    (b"GET", b"/v1beta/models", list_models),
    (b"POST", PREFIX + b"*", models),
)
