"""What a cache entry holds, and the conversions between a stored answer and what a client asks for.

An entry is one bytes value (the same in every backend): a 25-byte header, kind b"J" or b"S", the answer's
prompt and completion tokens (-1 unknown), and two lengths, then the payload:

    J  the 2xx JSON answer, as the client of the miss got it (a translated provider's: the OpenAI-shaped body)
    S  a completed stream's events: `main` (every event but the usage chunk and the end), `usage` (the chunk
       with the usage and no choices, possibly empty), then the tail (`data: [DONE]` and anything after it)

Serving keeps the original `id` and `created` (so a hit and the miss that stored it are the same objects):
- a non-stream client gets J's body as it is (the hit's fast path, in fastgw.cache.cache), or a chat.completion
  (text_completion, response) assembled from S's chunks;
- a stream client gets S's events, the usage chunk only when it asked `stream_options.include_usage` (one made from
  the entry's counts when the stream had none), or, from a J entry of chat or completions, chunks made from it
  (role, content and tool calls, finish, usage when asked, `[DONE]`). A J entry of /v1/responses or embeddings
  cannot be told as a stream: a stream client misses it, and its own stream replaces it.
"""
from __future__ import annotations

import re
import struct

import orjson

HEADER = struct.Struct("<cqqII")
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_DONE = b"[DONE]"


def encode_json(body: bytes, prompt: int, completion: int) -> bytes:
    return HEADER.pack(b"J", prompt, completion, len(body), 0) + body


def encode_stream(sse: bytes, prompt: int, completion: int) -> bytes | None:
    """The entry of a completed stream's bytes; None when an event carries an error (never stored)."""
    main, usage, tail = [], b"", b""
    start = 0
    events = []
    for m in _EVENT_END.finditer(sse):
        events.append(sse[start:m.end()])
        start = m.end()
    rest = sse[start:]
    for i, ev in enumerate(events):
        data = _data(ev)
        if data is None:
            main.append(ev)
            continue
        if data == _DONE:
            tail = b"".join(events[i:]) + rest
            break
        if data.startswith(b'{"error"') or b'"type":"error"' in data[:40] or b'"response.failed"' in data[:40]:
            return None
        if not usage and b'"usage"' in data and b'"choices":[]' in data:
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                return None
            if obj.get("usage") and obj.get("choices") == []:
                usage = ev
                continue
        main.append(ev)
    else:
        tail = rest
    body = b"".join(main)
    return HEADER.pack(b"S", prompt, completion, len(body), len(usage)) + body + usage + tail


def parts(entry: bytes):
    """(kind, prompt, completion, main, usage, tail)."""
    kind, prompt, completion, n, u = HEADER.unpack_from(entry)
    o = HEADER.size
    return kind, prompt, completion, entry[o:o + n], entry[o + n:o + n + u], entry[o + n + u:]


def as_json(entry: bytes, endpoint: str) -> bytes | None:
    """The JSON answer for a non-stream client; None when the entry cannot give one."""
    kind, prompt, completion, main, usage, tail = parts(entry)
    if kind == b"J":
        return main
    chunks = [c for c in (_json(_data(ev)) for ev in _events(main)) if c is not None]
    u = _json(_data(usage)) if usage else None
    if endpoint == "/v1/responses":
        for c in reversed(chunks):
            if c.get("type") == "response.completed" and isinstance(c.get("response"), dict):
                return orjson.dumps(c["response"])
        return None
    if not chunks:
        return None
    first = chunks[0]
    if endpoint == "/v1/chat/completions":
        out = _assemble_chat(chunks)
    elif endpoint == "/v1/completions":
        out = _assemble_completions(chunks)
    else:
        return None
    if u is not None and u.get("usage") is not None:
        out["usage"] = u["usage"]
    elif prompt >= 0:
        out["usage"] = {"prompt_tokens": prompt, "completion_tokens": max(completion, 0),
                        "total_tokens": prompt + max(completion, 0)}
    for k in ("service_tier", "system_fingerprint"):
        if k in first:
            out[k] = first[k]
    return orjson.dumps(out)


def as_sse(entry: bytes, endpoint: str, include_usage: bool) -> bytes | None:
    """The stream for a stream client; None when the entry cannot give one."""
    kind, prompt, completion, main, usage, tail = parts(entry)
    if kind == b"S":
        if include_usage and not usage and prompt >= 0:
            first = next((c for c in (_json(_data(ev)) for ev in _events(main)) if c is not None), None)
            if first is not None and "id" in first:
                usage = _sse(_usage_chunk(first, prompt, completion))
        return main + (usage if include_usage else b"") + tail
    obj = _json(main)
    if obj is None:
        return None
    if endpoint == "/v1/chat/completions":
        chunks = _chat_chunks(obj)
    elif endpoint == "/v1/completions":
        chunks = _completion_chunks(obj)
    else:
        return None
    if include_usage and obj.get("usage") is not None:
        chunks.append(_usage_chunk(chunks[0] if chunks else obj, None, None, obj["usage"]))
    return b"".join(_sse(c) for c in chunks) + b"data: [DONE]\n\n"


# -- helpers -------------------------------------------------------------------------------------------------

def _events(sse: bytes):
    start = 0
    for m in _EVENT_END.finditer(sse):
        yield sse[start:m.end()]
        start = m.end()
    if start < len(sse):
        yield sse[start:]


def _data(event: bytes) -> bytes | None:
    """The event's data (its data: lines joined), None when it has none (a comment)."""
    lines = [ln[5:].lstrip(b" ") if ln.startswith(b"data:") else None for ln in event.splitlines()]
    data = [d for d in lines if d is not None]
    return b"\n".join(data) if data else None


def _json(data):
    if data is None or data == _DONE:
        return None
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def _sse(obj: dict) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _assemble_chat(chunks: list) -> dict:
    first = chunks[0]
    choices: dict[int, dict] = {}
    for c in chunks:
        for ch in c.get("choices") or ():
            i = ch.get("index", 0)
            st = choices.setdefault(i, {"role": None, "content": None, "refusal": None, "tools": {},
                                        "finish": None, "logprobs": None})
            delta = ch.get("delta") or {}
            if delta.get("role"):
                st["role"] = delta["role"]
            for k in ("content", "refusal"):
                if delta.get(k) is not None:
                    st[k] = (st[k] or "") + delta[k]
            for tc in delta.get("tool_calls") or ():
                t = st["tools"].setdefault(tc.get("index", 0), {"id": None, "type": "function",
                                                                "function": {"name": "", "arguments": ""}})
                if tc.get("id"):
                    t["id"] = tc["id"]
                if tc.get("type"):
                    t["type"] = tc["type"]
                fn = tc.get("function") or {}
                if fn.get("name"):
                    t["function"]["name"] += fn["name"]
                if fn.get("arguments"):
                    t["function"]["arguments"] += fn["arguments"]
            if ch.get("logprobs"):
                lp = st["logprobs"] = st["logprobs"] or {"content": [], "refusal": None}
                lp["content"].extend(ch["logprobs"].get("content") or ())
            if ch.get("finish_reason"):
                st["finish"] = ch["finish_reason"]
    out_choices = []
    for i in sorted(choices):
        st = choices[i]
        msg = {"role": st["role"] or "assistant", "content": st["content"], "refusal": st["refusal"]}
        if st["tools"]:
            msg["tool_calls"] = [st["tools"][k] for k in sorted(st["tools"])]
        out_choices.append({"index": i, "message": msg, "logprobs": st["logprobs"], "finish_reason": st["finish"]})
    return {"id": first.get("id"), "object": "chat.completion", "created": first.get("created"),
            "model": first.get("model"), "choices": out_choices}


def _assemble_completions(chunks: list) -> dict:
    first = chunks[0]
    choices: dict[int, dict] = {}
    for c in chunks:
        for ch in c.get("choices") or ():
            i = ch.get("index", 0)
            st = choices.setdefault(i, {"text": "", "index": i, "logprobs": None, "finish_reason": None})
            st["text"] += ch.get("text") or ""
            if ch.get("finish_reason"):
                st["finish_reason"] = ch["finish_reason"]
    return {"id": first.get("id"), "object": "text_completion", "created": first.get("created"),
            "model": first.get("model"), "choices": [choices[i] for i in sorted(choices)]}


def _chunk(obj: dict, choices: list) -> dict:
    c = {"id": obj.get("id"), "object": "chat.completion.chunk", "created": obj.get("created"),
         "model": obj.get("model")}
    for k in ("service_tier", "system_fingerprint"):
        if k in obj:
            c[k] = obj[k]
    c["choices"] = choices
    return c


def _chat_chunks(obj: dict) -> list:
    out = []
    for ch in obj.get("choices") or ():
        i = ch.get("index", 0)
        msg = ch.get("message") or {}
        out.append(_chunk(obj, [{"index": i, "delta": {"role": msg.get("role") or "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None}]))
        delta = {}
        if msg.get("content"):
            delta["content"] = msg["content"]
        if msg.get("refusal"):
            delta["refusal"] = msg["refusal"]
        if msg.get("tool_calls"):
            delta["tool_calls"] = [{"index": k, **tc} for k, tc in enumerate(msg["tool_calls"])]
        if delta:
            out.append(_chunk(obj, [{"index": i, "delta": delta, "logprobs": ch.get("logprobs"),
                                     "finish_reason": None}]))
        out.append(_chunk(obj, [{"index": i, "delta": {}, "logprobs": None,
                                 "finish_reason": ch.get("finish_reason")}]))
    return out


def _completion_chunks(obj: dict) -> list:
    return [{"id": obj.get("id"), "object": "text_completion", "created": obj.get("created"),
             "model": obj.get("model"), "choices": [{"text": ch.get("text", ""), "index": ch.get("index", 0),
                                                     "logprobs": ch.get("logprobs"),
                                                     "finish_reason": ch.get("finish_reason")}]}
            for ch in obj.get("choices") or ()]


def _usage_chunk(like: dict, prompt, completion, usage=None) -> dict:
    if usage is None:
        completion = max(completion, 0)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    c = {k: like[k] for k in ("id", "object", "created", "model", "system_fingerprint") if k in like}
    c["choices"] = []
    c["usage"] = usage
    return c
