"""The OpenAI wire format of the mock: chat completions, completions, responses (each streamed or not where
OpenAI allows), embeddings and models.

Text answers are rendered once per (model, stream, chunks, usage mode) into byte templates, so a request costs
an orjson.loads of its body and one bytes %-format. prompt_tokens is a cheap deterministic estimate,
len(request body) // 4; completion_tokens is the number of content pieces. Stream usage follows OpenAI: a final
`"choices": []` chunk with usage only when stream_options.include_usage is true, and then every chunk carries
"usage": null. Errors use openai_error_body, the default of the routes.

Tool calls (chat): when the body has `tools`, tool_choice is not "none" and the last message is not a "tool"
message, the answer calls the first function (the named one for tool_choice {"type": "function", ...}) with
arguments built from its parameters schema (tools.example_arguments), finish_reason "tool_calls"; a stream sends
the call as OpenAI does, the id and name in the first delta, then the arguments in fragments. Only a body with
`tools` takes that branch; completion_tokens is then the number of fragments.

Embeddings are meaning-ish and deterministic (for the semantic cache's tests): a hashed bag of the input's
lowercased words, without a few stop words and one-letter ones, each word +1 or -1 in one of EMBEDDING_DIM
dimensions (or the request's `dimensions`), normalized; so "What is the capital of France?" and "what's the
capital of france" are the same vector and unrelated texts nearly orthogonal. Token-id inputs hash their ids.

answer_chat, answer_completion and answer_embeddings take a parsed body and the model to name, for azure.py.
"""
from __future__ import annotations

import base64
import hashlib
import itertools
import math
import re
import struct
import time

import orjson

from fastgw.devtools.mock import anthropic, tools
from fastgw.devtools.mock.wire import (
    PROMPT_TOKENS as _P, TOTAL_TOKENS as _T, Canned, JsonReply, MockRequest, Refusal, StreamReply, TemplateCache,
    fill, frame, pieces as _pieces, sse, template, to_template)

MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "o4-mini", "text-embedding-3-small")
EMBEDDING_DIM = 64
_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset("a an the is are was were be of to in on at for and or but what whats which who how me my "
                  "you your i it its this that please tell about".split())

# usage modes of the renderers
NO_USAGE, USAGE, STREAM_USAGE = 0, 1, 2  # never / in the body (stream: not at all) / stream: a final usage chunk


# -- renderers: (model, stream, n pieces, usage mode, content override) -> Canned ---------------------------

def _usage_chat(n: int):
    return {"prompt_tokens": _P, "completion_tokens": n, "total_tokens": _T,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}


def render_chat(model: str, stream: bool, n: int, usage_mode: int, content: str | None = None) -> Canned:
    created = int(time.time())
    rid = f"chatcmpl-mock{created:x}"
    pieces = _pieces(n, content)
    if not stream:
        obj = {"id": rid, "object": "chat.completion", "created": created, "model": model,
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces),
                                                     "refusal": None, "annotations": []},
                            "logprobs": None, "finish_reason": "stop"}],
               "service_tier": "default", "system_fingerprint": "fp_mock"}
        if usage_mode:
            obj["usage"] = _usage_chat(n)
        return Canned(body=template(obj))
    deltas = [{"role": "assistant", "content": "", "refusal": None}] + [{"content": p} for p in pieces]
    return _chat_stream(rid, created, model, usage_mode, deltas, "stop", n)


def _chat_stream(rid: str, created: int, model: str, usage_mode: int, deltas: list, finish: str,
                 completion_tokens: int) -> Canned:
    """A chat stream: one chunk per delta, the finish chunk, the usage chunk if asked for, [DONE]."""
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "service_tier": "default", "system_fingerprint": "fp_mock"}

    def chunk(delta, finish_reason=None):
        c = dict(base, choices=[{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}])
        if usage_mode == STREAM_USAGE:
            c["usage"] = None
        return frame(sse(c))

    events = [chunk(d) for d in deltas]
    events.append(chunk({}, finish))
    templated = ()
    if usage_mode == STREAM_USAGE:  # framed once filled
        events.append(to_template(sse(dict(base, choices=[], usage=_usage_chat(completion_tokens)))))
        templated = (len(events) - 1,)
    events.append(frame(b"data: [DONE]\n\n"))
    return Canned(events=events, templated=templated)


def render_chat_tool_call(model: str, stream: bool, usage_mode: int, name: str, arguments: dict
                          ) -> tuple[Canned, int]:
    """A chat answer calling function `name` with `arguments`; (answer, completion_tokens)."""
    created = int(time.time())
    rid = f"chatcmpl-mock{created:x}"
    call_id = tools.call_id("call_")
    text = tools.arguments_json(arguments)
    fragments = tools.fragments(text)
    if not stream:
        call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": text}}
        obj = {"id": rid, "object": "chat.completion", "created": created, "model": model,
               "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [call],
                                                     "refusal": None, "annotations": []},
                            "logprobs": None, "finish_reason": "tool_calls"}],
               "service_tier": "default", "system_fingerprint": "fp_mock"}
        if usage_mode:
            obj["usage"] = _usage_chat(len(fragments))
        return Canned(body=template(obj)), len(fragments)
    first = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
        {"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}]}
    deltas = [first] + [{"tool_calls": [{"index": 0, "function": {"arguments": f}}]} for f in fragments]
    return _chat_stream(rid, created, model, usage_mode, deltas, "tool_calls", len(fragments)), len(fragments)


def render_completion(model: str, stream: bool, n: int, usage_mode: int, content: str | None = None) -> Canned:
    created = int(time.time())
    rid = f"cmpl-mock{created:x}"
    pieces = _pieces(n, content)
    usage = {"prompt_tokens": _P, "completion_tokens": n, "total_tokens": _T}
    if not stream:
        obj = {"id": rid, "object": "text_completion", "created": created, "model": model,
               "choices": [{"text": "".join(pieces), "index": 0, "logprobs": None, "finish_reason": "stop"}],
               "system_fingerprint": "fp_mock"}
        if usage_mode:
            obj["usage"] = usage
        return Canned(body=template(obj))
    base = {"id": rid, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": "fp_mock"}

    def chunk(text, finish=None):
        c = dict(base, choices=[{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}])
        if usage_mode == STREAM_USAGE:
            c["usage"] = None
        return frame(sse(c))

    events = [chunk(p) for p in pieces] + [chunk("", "stop")]
    templated = ()
    if usage_mode == STREAM_USAGE:
        events.append(to_template(sse(dict(base, choices=[], usage=usage))))
        templated = (len(events) - 1,)
    events.append(frame(b"data: [DONE]\n\n"))
    return Canned(events=events, templated=templated)


def render_responses(model: str, stream: bool, n: int, usage_mode: int, content: str | None = None) -> Canned:
    created = int(time.time())
    rid, mid = f"resp_mock{created:x}", f"msg_mock{created:x}"
    pieces = _pieces(n, content)
    text = "".join(pieces)
    usage = ({"input_tokens": _P, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": n,
              "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": _T} if usage_mode else None)
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    item = {"id": mid, "type": "message", "status": "completed", "role": "assistant", "content": [part]}

    def response(status, output, usage_):
        return {"id": rid, "object": "response", "created_at": created, "status": status, "error": None,
                "incomplete_details": None, "instructions": None, "max_output_tokens": None, "model": model,
                "output": output, "parallel_tool_calls": True, "previous_response_id": None,
                "reasoning": {"effort": None, "summary": None}, "store": False, "temperature": 1.0,
                "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [], "top_p": 1.0,
                "truncation": "disabled", "usage": usage_, "user": None, "metadata": {}}

    if not stream:
        return Canned(body=template(response("completed", [item], usage)))
    seq = itertools.count()

    def ev(kind, **fields):
        return sse(dict(type=kind, sequence_number=next(seq), **fields), kind)

    events = [
        frame(ev("response.created", response=response("in_progress", [], None))),
        frame(ev("response.in_progress", response=response("in_progress", [], None))),
        frame(ev("response.output_item.added", output_index=0, item=dict(item, status="in_progress", content=[]))),
        frame(ev("response.content_part.added", item_id=mid, output_index=0, content_index=0,
                 part=dict(part, text=""))),
    ]
    events += [frame(ev("response.output_text.delta", item_id=mid, output_index=0, content_index=0, delta=p,
                        logprobs=[])) for p in pieces]
    events += [
        frame(ev("response.output_text.done", item_id=mid, output_index=0, content_index=0, text=text,
                 logprobs=[])),
        frame(ev("response.content_part.done", item_id=mid, output_index=0, content_index=0, part=part)),
        frame(ev("response.output_item.done", output_index=0, item=item)),
    ]
    events.append(to_template(ev("response.completed", response=response("completed", [item], usage))))
    return Canned(events=events, templated=(len(events) - 1,))


# -- handlers -------------------------------------------------------------------------------------------

def parse_json(req: MockRequest) -> dict:
    """The request body as a JSON object, or a Refusal."""
    try:
        obj = orjson.loads(req.body)
    except orjson.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        raise Refusal(400, "We could not parse the JSON body of your request.", "invalid_json")
    return obj


def _request_json(req: MockRequest) -> dict:
    """The request body as a JSON object naming a model, or a Refusal (parse_json inlined: the hot path)."""
    try:
        obj = orjson.loads(req.body)
    except orjson.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        raise Refusal(400, "We could not parse the JSON body of your request.", "invalid_json")
    model = obj.get("model")
    if not isinstance(model, str) or not model:
        raise Refusal(400, "you must provide a model parameter", "missing_model")
    return obj


def _usage_mode(req: MockRequest, obj: dict, stream: bool, stream_options: bool) -> int:
    if req.no_usage:
        return NO_USAGE
    if stream and stream_options:
        opts = obj.get("stream_options")
        return STREAM_USAGE if isinstance(opts, dict) and opts.get("include_usage") is True else USAGE
    return USAGE


def _text(req: MockRequest, obj: dict, model: str, render, cache: TemplateCache, stream_options: bool):
    """A text answer; `stream_options`: the endpoint takes stream_options.include_usage (chat, completions)."""
    stream = obj.get("stream") is True
    n = req.chunks
    prompt = len(req.body) // 4
    if req.no_usage:  # _usage_mode, inlined: this is every text request's path
        usage_mode = NO_USAGE
    elif stream and stream_options:
        opts = obj.get("stream_options")
        usage_mode = STREAM_USAGE if isinstance(opts, dict) and opts.get("include_usage") is True else USAGE
    else:
        usage_mode = USAGE
    if req.echo_headers:  # the headers as the content; rendered for this request only (never cached)
        if stream:        # cut into the stream's pieces: a client must put the events together to read it
            return StreamReply(render(model, True, n, usage_mode, req.echoed_headers()).events_for(prompt, n))
        return JsonReply(200, fill(render(model, False, 1, usage_mode, req.echoed_headers()).body, prompt, 1))
    if stream:
        return StreamReply(cache.get(model, True, n, usage_mode).events_for(prompt, n))
    return JsonReply(200, cache.get(model, False, n, usage_mode).body_for(prompt, n))


_CHAT = TemplateCache(render_chat)
_COMPLETION = TemplateCache(render_completion)
_RESPONSES = TemplateCache(render_responses)


def chat(req: MockRequest):
    obj = _request_json(req)
    if "tools" in obj:
        return answer_chat(req, obj, obj["model"])
    return _text(req, obj, obj["model"], render_chat, _CHAT, True)  # answer_chat's text path, one call less


def answer_chat(req: MockRequest, obj: dict, model: str):
    """The chat answer to the parsed body `obj`, naming `model`: a tool call (see the docstring) or text."""
    if "tools" in obj:  # the only branch a body without tools pays for
        call = _tool_call(obj)
        if call is not None:  # rendered for this request only: the tools are the client's
            stream = obj.get("stream") is True
            canned, completion_tokens = render_chat_tool_call(model, stream, _usage_mode(req, obj, stream, True),
                                                              *call)
            prompt = len(req.body) // 4
            if stream:
                return StreamReply(canned.events_for(prompt, completion_tokens))
            return JsonReply(200, canned.body_for(prompt, completion_tokens))
    return _text(req, obj, model, render_chat, _CHAT, True)


def _tool_call(obj: dict) -> tuple[str, dict] | None:
    """(name, arguments) of the function the chat answer calls, or None for a text answer."""
    declared = obj.get("tools")
    choice = obj.get("tool_choice")
    messages = obj.get("messages")
    if not isinstance(declared, list) or choice == "none":
        return None
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
            and messages[-1].get("role") == "tool":
        return None  # the model answers the tool's result with text
    functions = [t["function"] for t in declared if isinstance(t, dict) and t.get("type", "function") == "function"
                 and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)]
    if isinstance(choice, dict):
        named = choice.get("function")
        name = named.get("name") if isinstance(named, dict) else None
        function = next((f for f in functions if f["name"] == name), None)
        if function is None:
            raise Refusal(400, f"Invalid value for 'tool_choice': no function named {name!r} in 'tools'.",
                          "invalid_value")
    elif functions:
        function = functions[0]
    else:
        return None
    return function["name"], tools.example_arguments(function.get("parameters"))


def completions(req: MockRequest):
    obj = _request_json(req)
    return answer_completion(req, obj, obj["model"])


def answer_completion(req: MockRequest, obj: dict, model: str):
    return _text(req, obj, model, render_completion, _COMPLETION, True)


def responses(req: MockRequest):
    obj = _request_json(req)
    return _text(req, obj, obj["model"], render_responses, _RESPONSES, False)


def embeddings(req: MockRequest) -> JsonReply:
    obj = _request_json(req)
    return answer_embeddings(req, obj, obj["model"])


def answer_embeddings(req: MockRequest, obj: dict, model: str) -> JsonReply:
    inputs = _inputs(obj.get("input"))
    if not inputs:
        raise Refusal(400, "'input' must be a non-empty string or array", "invalid_input")
    dim = obj.get("dimensions", EMBEDDING_DIM)
    if type(dim) is not int or not 1 <= dim <= 4096:
        raise Refusal(400, "'dimensions' must be an integer from 1 to 4096", "invalid_value")
    fmt = "base64" if obj.get("encoding_format") == "base64" else "float"
    out = {"object": "list", "model": model,
           "data": [{"object": "embedding", "index": i, "embedding": _embedding(words, dim, fmt)}
                    for i, words in enumerate(inputs)]}
    if not req.no_usage:
        prompt = len(req.body) // 4
        out["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt}
    return JsonReply(200, orjson.dumps(out))


def _embedding(words: list, dim: int, fmt: str):
    vec = [0.0] * dim
    for w in words:
        h = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
        vec[h % dim] += 1.0 if h >> 63 else -1.0
    norm = math.sqrt(sum(x * x for x in vec)) or 1.0
    vec = [round(x / norm, 6) for x in vec]
    if fmt == "base64":
        return base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode()
    return vec


def _words(text: str) -> list:
    words = [w for w in _WORD.findall(text.lower()) if len(w) > 1 and w not in _STOP]
    return words or [text]                   # only stop words: the text itself, so the vector is not zero


def _inputs(inp) -> list:
    """Each input's words ([] when `input` is not an embeddings input)."""
    if isinstance(inp, str):
        return [_words(inp)]
    if isinstance(inp, list) and inp:
        if all(isinstance(x, int) for x in inp):
            return [[f"t{x}" for x in inp]]  # one tokenised input
        if all(isinstance(x, str) for x in inp):
            return [_words(x) for x in inp]
        if all(isinstance(x, list) and all(isinstance(t, int) for t in x) for x in inp):
            return [[f"t{t}" for t in x] for x in inp]
    return []


_MODELS_BODY = orjson.dumps({"object": "list", "data": [
    {"id": m, "object": "model", "created": 1700000000, "owned_by": "fastgw-mock"} for m in MODELS]})


def models(req: MockRequest) -> JsonReply:
    if req.header(b"anthropic-version"):   # Anthropic lists its models at the same path; its clients send this
        return anthropic.list_models(req)
    return JsonReply(200, _MODELS_BODY)


def model(req: MockRequest) -> JsonReply:
    mid = req.path[len(b"/v1/models/"):].decode("latin-1")
    return JsonReply(200, orjson.dumps({"id": mid, "object": "model", "created": 1700000000,
                                        "owned_by": "fastgw-mock"}))


# (method, path, handler); a path ending in "*" matches by prefix.
ROUTES = (
    (b"POST", b"/v1/chat/completions", chat),
    (b"POST", b"/v1/completions", completions),
    (b"POST", b"/v1/responses", responses),
    (b"POST", b"/v1/embeddings", embeddings),
    (b"GET", b"/v1/models", models),
    (b"GET", b"/v1/models/*", model),
)
