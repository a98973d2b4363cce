"""Usage the gateway counts itself when an answer carries none: the input tokens of moderations (OpenAI's
moderation answers never have `usage`) and of embeddings whose upstream reported none.

They are counted exactly with tiktoken (fastgw/tokens/exact.py) from the request's `input` and put in
ex.prompt_tokens (completion_tokens 0), so token rate limits settle on them and budgets price them, even where
the price is 0 (the omni-moderation models are free, but their tokens count against token limits). The
complete hooks of rate-limit and budget call `fill_counted_usage`, whichever runs first; once the tokens are
known it does nothing, and it costs a chat request nothing (its answer has usage, or it is not one of these).
"""
from __future__ import annotations

import orjson

__all__ = ["COUNTED_ENDPOINTS", "count_input", "fill_counted_usage"]

COUNTED_ENDPOINTS = frozenset(("/v1/moderations", "/v1/embeddings"))
DEFAULT_MODERATION_MODEL = "omni-moderation-latest"    # the API's default when a request names no model


def _is_tokens(v) -> bool:
    return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def count_input(body: bytes, model: str) -> int:
    """Tokens of a moderations or embeddings request's `input`: a string, a list of strings, a list of
    moderation content parts (their text parts: image parts have no published token count and are not
    counted), a token array or a list of token arrays (their lengths). -1 when the body holds none of these."""
    try:
        req = orjson.loads(body)
    except orjson.JSONDecodeError:
        return -1
    if not isinstance(req, dict) or "input" not in req:
        return -1
    value = req["input"]
    from fastgw.tokens.exact import count_text, encoding_for_model   # tiktoken: loaded on first use only

    enc = encoding_for_model(model)
    if isinstance(value, str):
        return count_text(value, enc)
    if not isinstance(value, list):
        return -1
    if _is_tokens(value):                      # one input, already tokenized
        return len(value)
    total = 0
    for item in value:
        if isinstance(item, str):
            total += count_text(item, enc)
        elif _is_tokens(item):
            total += len(item)
        elif isinstance(item, dict):           # a moderation content part
            if item.get("type") == "text" and isinstance(item.get("text"), str):
                total += count_text(item["text"], enc)
        else:
            return -1
    return total


def fill_counted_usage(ex) -> bool:
    """For a 2xx moderations or embeddings answer without usage: count the request's input tokens into
    ex.prompt_tokens (completion_tokens 0). True when it did."""
    if ex.prompt_tokens >= 0 or not 200 <= ex.status < 300 or ex.endpoint not in COUNTED_ENDPOINTS:
        return False
    # The tokenizer follows the model the upstream runs (a deployment may rename it), else the client's name.
    d = ex.deployment
    model = ((getattr(d, "model", "") if d is not None else "") or (ex.model if ex.model != "*" else "")
             or DEFAULT_MODERATION_MODEL)
    n = count_input(ex.body, model)
    if n < 0:
        return False
    ex.prompt_tokens = n
    ex.completion_tokens = 0
    return True
