"""JSON written by the translations. orjson writes at most 254 nested levels, fewer than it reads (1024) or a
request may hold (jsonpeek: 512), so a value from a client or an upstream can be too deep to write: that is a
GatewayError of whoever sent it (400 or 502), never a TypeError escaping a translation."""
from __future__ import annotations

import orjson

from fastgw.errors import GatewayError


def client_json(obj) -> bytes:
    """obj, which holds values of the client's request, as JSON."""
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError as exc:
        raise GatewayError(400, f"The request cannot be translated for this model's provider: its JSON nests "
                                f"deeper than the gateway writes ({exc}; at most 254 levels).",
                           code="invalid_value") from None


def upstream_json(obj) -> bytes:
    """obj, which holds values of the upstream's answer, as JSON."""
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError as exc:
        raise GatewayError(502, f"The upstream's answer cannot be translated: its JSON nests deeper than the "
                                f"gateway writes ({exc}; at most 254 levels).", type="upstream_error",
                           code="upstream_malformed") from None
