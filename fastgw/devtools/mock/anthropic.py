"""The Anthropic Messages API of the mock (anthropic-version 2023-06-01): POST /v1/messages, streamed or not,
with tool use, and POST /v1/messages/count_tokens, shaped as docs.anthropic.com and the `anthropic` SDK's types
(and its recorded streams, tests/data/wire/anthropic/) show them.

A request needs a key, in an x-api-key header (any non-empty value) or as `authorization: Bearer <key>` (which
the `anthropic` SDK 2.x sends; else 401 "x-api-key header is required"), an anthropic-version header (any
value; else 400) and a body Anthropic accepts: model, max_tokens (>= 1) and messages whose roles alternate,
starting with "user"; each refusal names the field, as Anthropic's do.

A text answer is x-mock-chunks pieces, at most max_tokens of them (then stop_reason "max_tokens", else
"end_turn"), rendered once per key into byte templates as the OpenAI ones are; usage.input_tokens is
len(body) // 4, output_tokens the number of pieces (x-mock-no-usage does not apply: Anthropic always reports
usage). A stream is the documented event sequence, each with its `event:` line:
message_start, content_block_start, ping, content_block_delta per piece, content_block_stop, message_delta
(stop_reason, usage.output_tokens), message_stop.

Tool use: when the request has custom tools (with an input_schema), tool_choice is not "none" and the last user
turn carries no tool_result block, the answer calls the first tool (the named one for tool_choice "tool") with
an input built from its input_schema (tools.example_arguments), stop_reason "tool_use": a short text block
first, except when tool_choice forces a tool ("any", "tool": Anthropic then prefills the turn, so no text
comes), then the tool_use block, whose input a stream sends as input_json_delta fragments.

Errors have Anthropic's shape, {"type": "error", "error": {"type", "message"}}, the type following the status
(529 overloaded_error, 429 rate_limit_error with a retry-after header, 500 api_error, ...).
"""
from __future__ import annotations

import time

import orjson

from fastgw.devtools.mock import tools
from fastgw.devtools.mock.wire import (
    PROMPT_TOKENS as _P, Canned, JsonReply, MockRequest, Refusal, StreamReply, TemplateCache, fill, frame, pieces,
    sse, template, to_template)

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                500: "api_error", 504: "timeout_error", 529: "overloaded_error"}
RETRY_AFTER = b"retry-after: 1\r\n"


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str, code: str | None = None):
    """Anthropic's error JSON for `status` (the route table's error function; `code` has no place in it)."""
    body = orjson.dumps({"type": "error", "error": {"type": error_type(status), "message": message}})
    if status == 429:
        return JsonReply(status, body, RETRY_AFTER)
    return body


# -- rendering: a message is a list of content blocks ---------------------------------------------------------

class _Text:
    __slots__ = ("pieces",)

    def __init__(self, pieces_: list[str]):
        self.pieces = pieces_


class _ToolUse:
    __slots__ = ("id", "name", "arguments")

    def __init__(self, name: str, arguments: dict):
        self.id = tools.call_id("toolu_")
        self.name = name
        self.arguments = arguments


def _usage(output_tokens: int) -> dict:
    return {"input_tokens": _P, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
            "output_tokens": output_tokens, "service_tier": "standard"}


def _render(model: str, stream: bool, blocks: list, stop_reason: str, output_tokens: int) -> Canned:
    created = int(time.time())
    message = {"id": f"msg_mock{created:x}", "type": "message", "role": "assistant", "model": model,
               "content": [], "stop_reason": None, "stop_sequence": None}
    if not stream:
        content = [{"type": "text", "text": "".join(b.pieces)} if b.__class__ is _Text else
                   {"type": "tool_use", "id": b.id, "name": b.name, "input": b.arguments, "caller": {"type": "direct"}}
                   for b in blocks]
        return Canned(body=template(dict(message, content=content, stop_reason=stop_reason,
                                         usage=_usage(output_tokens))))

    def event(kind, **fields):
        return frame(sse(dict(type=kind, **fields), kind))

    # message_start carries input_tokens: a template, framed once filled
    events = [to_template(sse({"type": "message_start", "message": dict(message, usage=_usage(1))},
                              "message_start"))]
    for index, block in enumerate(blocks):
        if block.__class__ is _Text:
            events.append(event("content_block_start", index=index, content_block={"type": "text", "text": ""}))
            deltas = [{"type": "text_delta", "text": p} for p in block.pieces]
        else:
            events.append(event("content_block_start", index=index, content_block={
                "type": "tool_use", "id": block.id, "name": block.name, "input": {}, "caller": {"type": "direct"}}))
            deltas = [{"type": "input_json_delta", "partial_json": f}
                      for f in ["", *tools.fragments(tools.arguments_json(block.arguments))]]
        if index == 0:
            events.append(event("ping"))
        events += [event("content_block_delta", index=index, delta=d) for d in deltas]
        events.append(event("content_block_stop", index=index))
    events.append(event("message_delta", delta={"stop_reason": stop_reason, "stop_sequence": None},
                        usage={"output_tokens": output_tokens}))
    events.append(event("message_stop"))
    return Canned(events=events, templated=(0,))


def render_text(model: str, stream: bool, n: int, stop_reason: str, content: str | None = None) -> Canned:
    """A text answer of n canned pieces (or `content` as one piece)."""
    return _render(model, stream, [_Text(pieces(n, content))], stop_reason, n)


def render_tool_use(model: str, stream: bool, name: str, arguments: dict, forced: bool) -> tuple[Canned, int]:
    """A call of tool `name`, after a short text unless the tool is `forced`; (answer, output_tokens)."""
    blocks = [] if forced else [_Text(["I'll", " call", f" {name}", "."])]
    blocks.append(_ToolUse(name, arguments))
    output_tokens = sum(len(b.pieces) for b in blocks if b.__class__ is _Text) + len(
        tools.fragments(tools.arguments_json(arguments)))
    return _render(model, stream, blocks, "tool_use", output_tokens), output_tokens


_TEXT = TemplateCache(render_text)


# -- the request ----------------------------------------------------------------------------------------------

def _checked(req: MockRequest, needs_max_tokens: bool = True) -> dict:
    """The request body, after Anthropic's header and body checks (a Refusal naming what is wrong)."""
    if not req.header(b"x-api-key") and req.bearer() is None:
        raise Refusal(401, "x-api-key header is required")
    if not req.header(b"anthropic-version"):
        raise Refusal(400, "anthropic-version: header is required")
    try:
        obj = orjson.loads(req.body)
    except orjson.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        raise Refusal(400, "The request body is not valid JSON.")
    model = obj.get("model")
    if model is None:
        raise Refusal(400, "model: Field required")
    if not isinstance(model, str) or not model:
        raise Refusal(400, "model: Input should be a non-empty string")
    if needs_max_tokens:
        max_tokens = obj.get("max_tokens")
        if max_tokens is None:
            raise Refusal(400, "max_tokens: Field required")
        if max_tokens.__class__ is not int or max_tokens < 1:
            raise Refusal(400, "max_tokens: Input should be an integer greater than or equal to 1")
    _check_messages(obj.get("messages"))
    return obj


def _check_messages(messages) -> None:
    if messages is None:
        raise Refusal(400, "messages: Field required")
    if not isinstance(messages, list):
        raise Refusal(400, "messages: Input should be a valid list")
    if not messages:
        raise Refusal(400, "messages: at least one message is required")
    previous = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise Refusal(400, f"messages.{i}: Input should be a valid dictionary")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise Refusal(400, f"messages.{i}.role: Input should be 'user' or 'assistant'")
        if "content" not in message:
            raise Refusal(400, f"messages.{i}.content: Field required")
        if i == 0 and role != "user":
            raise Refusal(400, 'messages: first message must use the "user" role')
        if role == previous:
            raise Refusal(400, 'messages: roles must alternate between "user" and "assistant", '
                               f'but found multiple "{role}" roles in a row')
        previous = role


def _tool_call(obj: dict) -> tuple[str, dict, bool] | None:
    """(name, input, forced) of the tool the answer calls, or None for a text answer (see the docstring)."""
    declared = obj.get("tools")
    choice = obj.get("tool_choice")
    kind = choice.get("type", "auto") if isinstance(choice, dict) else "auto"
    if not isinstance(declared, list) or kind == "none" or _answers_tool_results(obj["messages"]):
        return None
    custom = [t for t in declared if isinstance(t, dict) and isinstance(t.get("name"), str) and "input_schema" in t]
    if kind == "tool":
        name = choice.get("name")
        tool = next((t for t in custom if t["name"] == name), None)
        if tool is None:
            raise Refusal(400, f"tool_choice: no tool named {name!r} in tools")
    elif custom:
        tool = custom[0]
    else:
        return None
    return tool["name"], tools.example_arguments(tool["input_schema"]), kind in ("any", "tool")


def _answers_tool_results(messages: list) -> bool:
    """True when the last user turn carries a tool_result block: the model answers it with text."""
    last_user = next((m for m in reversed(messages) if m["role"] == "user"), None)
    content = last_user.get("content") if last_user is not None else None
    return isinstance(content, list) and any(isinstance(b, dict) and b.get("type") == "tool_result" for b in content)


# -- handlers -----------------------------------------------------------------------------------------------

def messages(req: MockRequest):
    obj = _checked(req)
    model = obj["model"]
    stream = obj.get("stream") is True
    prompt = len(req.body) // 4
    call = _tool_call(obj) if "tools" in obj else None
    if call is not None:  # rendered for this request only: the tools are the client's
        canned, output_tokens = render_tool_use(model, stream, *call)
        if stream:
            return StreamReply(canned.events_for(prompt, output_tokens))
        return JsonReply(200, canned.body_for(prompt, output_tokens))
    max_tokens = obj["max_tokens"]
    n = min(req.chunks, max_tokens)
    stop_reason = "max_tokens" if req.chunks > max_tokens else "end_turn"
    if stream:
        return StreamReply(_TEXT.get(model, True, n, stop_reason).events_for(prompt, n))
    if req.echo_headers:  # one piece: the headers; rendered for this request only (never cached)
        return JsonReply(200, fill(render_text(model, False, 1, stop_reason, req.echoed_headers()).body, prompt, 1))
    return JsonReply(200, _TEXT.get(model, False, n, stop_reason).body_for(prompt, n))


# (id, display_name, created_at) of GET /v1/models, newest first as Anthropic lists them.
MODELS = (("claude-haiku-4-5", "Claude Haiku 4.5", "2025-10-15T00:00:00Z"),
          ("claude-sonnet-4-5", "Claude Sonnet 4.5", "2025-09-29T00:00:00Z"),
          ("claude-opus-4-1", "Claude Opus 4.1", "2025-08-05T00:00:00Z"))


def list_models(req: MockRequest) -> JsonReply:
    """GET /v1/models in Anthropic's shape (openai.py hands over the requests with an anthropic-version header:
    the two formats share the path): the page after `after_id`, of `limit` models (default 20, 1 to 1000)."""
    if not req.header(b"x-api-key") and req.bearer() is None:
        return JsonReply(401, error_body(401, "x-api-key header is required"))
    try:
        limit = int(req.query_param("limit") or 20)
    except ValueError:
        limit = 0
    if not 1 <= limit <= 1000:
        return JsonReply(400, error_body(400, "limit: Input should be between 1 and 1000"))
    ids = [m[0] for m in MODELS]
    after = req.query_param("after_id")
    if after is not None and after not in ids:
        return JsonReply(400, error_body(400, f"after_id: unknown model {after!r}"))
    start = ids.index(after) + 1 if after is not None else 0
    page = [{"type": "model", "id": i, "display_name": name, "created_at": created}
            for i, name, created in MODELS[start:start + limit]]
    return JsonReply(200, orjson.dumps({"data": page, "has_more": start + limit < len(MODELS),
                                        "first_id": page[0]["id"] if page else None,
                                        "last_id": page[-1]["id"] if page else None}))


def count_tokens(req: MockRequest) -> JsonReply:
    _checked(req, needs_max_tokens=False)
    return JsonReply(200, b'{"input_tokens":%d}' % (len(req.body) // 4))


ROUTES = (
    (b"POST", b"/v1/messages", messages),
    (b"POST", b"/v1/messages/count_tokens", count_tokens),
)
