"""The providers' model lists (one page of GET /v1/models, /v1beta/models) as OpenAI model objects.

OpenAI's list is {"object": "list", "data": [{"id", "object": "model", "created", "owned_by"}]}, not paginated.
Anthropic's is {"data": [{"id", "created_at" (RFC 3339), "display_name", "type": "model"}], "has_more",
"first_id", "last_id"}: the next page is ?after_id=<last_id>. Gemini's is {"models": [{"name": "models/<id>",
"supportedGenerationMethods", ...}], "nextPageToken"}: the next page is ?pageToken=<token>.

Each function returns (models, cursor): the OpenAI model objects and the next page's cursor, "" after the last.
A body that is not the provider's list raises a 502 upstream_malformed.
"""
from __future__ import annotations

from datetime import datetime

import orjson

from fastgw.errors import GatewayError


def model_object(model_id: str, created: int, owned_by: str) -> dict:
    """One entry of OpenAI's list (the `Model` of the openai SDK)."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}


def openai_models(body: bytes) -> tuple[list[dict], str]:
    out = []
    for m in _entries(body, "data"):
        created = m.get("created")
        owned_by = m.get("owned_by")
        out.append(model_object(_id(m, "id"), created if created.__class__ is int else 0,
                                owned_by if isinstance(owned_by, str) else ""))
    return out, ""


def anthropic_models(body: bytes) -> tuple[list[dict], str]:
    obj = _object(body)
    out = [model_object(_id(m, "id"), _epoch(m.get("created_at")), "anthropic") for m in _entries(obj, "data")]
    last = obj.get("last_id")
    return out, last if obj.get("has_more") is True and isinstance(last, str) else ""


def gemini_models(body: bytes) -> tuple[list[dict], str]:
    obj = _object(body)
    out = []
    for m in _entries(obj, "models"):
        methods = m.get("supportedGenerationMethods")
        # The gateway serves Gemini models as chat (generateContent): embedding-only models would fail there.
        if isinstance(methods, list) and "generateContent" not in methods:
            continue
        out.append(model_object(_id(m, "name").removeprefix("models/"), 0, "google"))
    token = obj.get("nextPageToken")
    return out, token if isinstance(token, str) else ""


def _object(body) -> dict:
    if isinstance(body, dict):
        return body
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        raise _malformed("is not a JSON object")
    return obj


def _entries(body, field: str) -> list[dict]:
    entries = _object(body).get(field)
    if not isinstance(entries, list) or not all(isinstance(m, dict) for m in entries):
        raise _malformed(f"has no `{field}` list of objects")
    return entries


def _id(m: dict, field: str) -> str:
    v = m.get(field)
    if not isinstance(v, str) or not v:
        raise _malformed(f"has an entry without a `{field}` string")
    return v


def _epoch(rfc3339) -> int:
    """Anthropic's created_at as Unix seconds (0 when it is missing or unreadable: only a hint)."""
    try:   # "Z" spelled as Python 3.10's fromisoformat reads it
        return int(datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp())
    except (AttributeError, ValueError):
        return 0


def _malformed(what: str) -> GatewayError:
    return GatewayError(502, f"The upstream's model list {what}.", type="upstream_error", code="upstream_malformed")
