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


def take_usage(ex, chat_response: dict) -> None:
    """An OpenAI chat response's usage into the exchange (what limits, budgets and the access log count)."""
    u = chat_response.get("usage")
    if isinstance(u, dict):
        ex.prompt_tokens = int(u.get("prompt_tokens") or 0)
        ex.completion_tokens = int(u.get("completion_tokens") or 0)


dumps = orjson.dumps
