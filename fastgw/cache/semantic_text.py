"""What the semantic cache embeds of a request, and what else must match for a similar prompt's answer to serve it.

`prompt_text(req, endpoint)`: the request's text, one line per message or input item ("role: text"), in order:
- chat: every message's text (a string content, or its text parts), a refusal, an assistant's tool calls (name and
  arguments);
- completions: `prompt` (a string, or a list of strings);
- responses: `instructions`, then `input` (a string, or its message items' text parts, function calls and their
  outputs).
None when the request holds anything else that carries meaning an embedding of its text would miss (an image, an
audio or file part, token ids): such a request is looked up exactly only. Embeddings requests are never looked up
by similarity (a paraphrase has another vector).

`params_digest(req, endpoint)`: an xxh3-64 of every other field (sorted JSON, without the fields the exact key
ignores): a similar prompt with another `max_tokens`, `temperature`, `tools` or `response_format` is another
question. It is part of the index's partition (fastgw.cache.semantic), with the endpoint, the model and the scope.
"""
from __future__ import annotations

import orjson
import xxhash

TEXT_FIELDS = {"/v1/chat/completions": ("messages",), "/v1/completions": ("prompt",),
               "/v1/responses": ("input", "instructions")}
# As fastgw.cache.key: fields that never change the answer.
_IGNORED = ("model", "user", "stream", "stream_options", "store", "metadata", "safety_identifier",
            "prompt_cache_key")
_TEXT_PARTS = ("text", "input_text", "output_text")


class NotText(Exception):
    """The request carries something other than text."""


def prompt_text(req: dict, endpoint: str) -> str | None:
    try:
        if endpoint == "/v1/chat/completions":
            lines = _messages(req.get("messages"))
        elif endpoint == "/v1/completions":
            lines = _prompt(req.get("prompt"))
        elif endpoint == "/v1/responses":
            lines = _responses(req.get("instructions"), req.get("input"))
        else:
            return None
    except NotText:
        return None
    text = "\n".join(lines)
    return text if text.strip() else None


def params_digest(req: dict, endpoint: str) -> bytes:
    rest = {k: v for k, v in req.items() if k not in _IGNORED and k not in TEXT_FIELDS.get(endpoint, ())}
    return xxhash.xxh3_64_digest(orjson.dumps(rest, option=orjson.OPT_SORT_KEYS))


def _messages(messages) -> list[str]:
    if not isinstance(messages, list) or not messages:
        raise NotText
    lines = []
    for m in messages:
        if not isinstance(m, dict):
            raise NotText
        role = m.get("role")
        text = _content(m.get("content"))
        if m.get("refusal"):
            text += _str(m["refusal"])
        for call in m.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict):
                raise NotText
            text += f" [{_str(fn.get('name'))}({_str(fn.get('arguments'))})]"
        lines.append(f"{_str(role)}: {text}")
    return lines


def _content(content) -> str:
    """A message's text: a string, or a list of text parts (any other part: NotText)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise NotText
    out = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS:
            raise NotText
        out.append(_str(part.get("text")))
    return "\n".join(out)


def _prompt(prompt) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise NotText                            # token ids, or nothing


def _responses(instructions, inp) -> list[str]:
    lines = [f"instructions: {_str(instructions)}"] if instructions else []
    if isinstance(inp, str):
        return lines + [f"user: {inp}"]
    if not isinstance(inp, list) or not inp:
        raise NotText
    for item in inp:
        if not isinstance(item, dict):
            raise NotText
        kind = item.get("type", "message")
        if kind == "message":
            lines.append(f"{_str(item.get('role'))}: {_content(item.get('content'))}")
        elif kind == "function_call":
            lines.append(f"call: {_str(item.get('name'))}({_str(item.get('arguments'))})")
        elif kind == "function_call_output":
            lines.append(f"result: {_str(item.get('output'))}")
        else:
            raise NotText
    return lines


def _str(v) -> str:
    if isinstance(v, str):
        return v
    if v is None:
        return ""
    raise NotText
