"""The one place that renders OpenAI-style error responses.

Everything that refuses a request raises `GatewayError` (or a subclass) carrying data, never text with a stack
trace; the connection code renders it with `render_error`. The JSON shape is OpenAI's:
{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}.
"""
from __future__ import annotations

import orjson

REASONS = {
    100: b"Continue", 200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden",
    404: b"Not Found", 405: b"Method Not Allowed", 408: b"Request Timeout", 409: b"Conflict",
    411: b"Length Required", 413: b"Content Too Large", 417: b"Expectation Failed",
    422: b"Unprocessable Content", 429: b"Too Many Requests", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 501: b"Not Implemented", 502: b"Bad Gateway", 503: b"Service Unavailable",
    504: b"Gateway Timeout", 505: b"HTTP Version Not Supported",
}

# The OpenAI error `type` that goes with each status when the raiser does not name one.
_DEFAULT_TYPE = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "invalid_request_error", 405: "invalid_request_error", 408: "timeout_error",
    413: "invalid_request_error", 429: "rate_limit_error", 431: "invalid_request_error",
}


class GatewayError(Exception):
    """A refusal with an HTTP status and an OpenAI-style body. `headers` are extra response header lines."""

    def __init__(self, status: int, message: str, type: str | None = None, code: str | None = None,
                 param: str | None = None, headers: tuple[tuple[str, str], ...] = (), reason: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or error_type(status)
        self.code = code
        self.param = param
        self.headers = headers
        # The `reason` label of fastgw_rejections_total when a policy refuses with this (bounded: from code).
        self.reason = reason or code or str(status)

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)


def model_not_found(model: str) -> GatewayError:
    """OpenAI's 404 for a model the caller cannot use (unknown, or hidden from it)."""
    return GatewayError(404, f"The model `{model}` does not exist or you do not have access to it.", param="model",
                        code="model_not_found")


def error_type(status: int) -> str:
    """The OpenAI error `type` for a status (shared with the mock upstream, so the two cannot drift apart)."""
    return _DEFAULT_TYPE.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


def reason(status: int) -> bytes:
    return REASONS.get(status, b"Unknown")


class PolicyError(GatewayError):
    """A policy hook raised something other than a refusal: a bug in that policy, answered as a 500 of its own
    (never reported as an upstream failure)."""

    def __init__(self, phase: str, policy: str):
        super().__init__(500, "The gateway failed to process the request.", type="api_error", code="policy_error")
        self.phase = phase
        self.policy = policy


class Reply(Exception):
    """Raised by a policy in the access or request phase to answer the request itself, with no upstream (a
    cache hit, a guardrail's canned answer). `headers` are (name, value) pairs added to the response head."""

    def __init__(self, body: bytes, status: int = 200, content_type: str = "application/json",
                 headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(status)
        self.body = body
        self.status = status
        self.content_type = content_type
        self.headers = headers
