"""The JSON bodies translating providers read and write: the client's request as an object, our JSON out."""
from __future__ import annotations

import orjson

from fastgw.errors import GatewayError


def request_object(body: bytes) -> dict:
    """The client's request body as a dict (the gateway has checked it is a JSON object; this parses it whole)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        raise GatewayError(400, "We could not parse the JSON body of your request. The body must be a JSON object.",
                           code="invalid_json")
    return obj


def upstream_object(body: bytes) -> dict:
    """A provider's success body as a dict; anything else is the upstream's fault (502)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        raise GatewayError(502, "The upstream answered with a body that is not a JSON object.",
                           type="upstream_error", code="upstream_malformed")
    return obj


def token_count(value) -> int:
    """A token count of a usage object the gateway did not write: a non-negative integer below 2**53 (the exchange
    holds int64 sums of them), else 0."""
    return value if type(value) is int and 0 <= value < 2**53 else 0


def take_usage(ex, chat_response: dict) -> None:
    """An OpenAI chat response's usage into the exchange (what limits, budgets and the access log count)."""
    u = chat_response.get("usage")
    if isinstance(u, dict):
        ex.prompt_tokens = token_count(u.get("prompt_tokens"))
        ex.completion_tokens = token_count(u.get("completion_tokens"))


dumps = orjson.dumps    # the gateway's own objects; a translation's output goes through wire/encode.py
