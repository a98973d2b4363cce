"""Google's Gemini API (v1beta generateContent / streamGenerateContent?alt=sse) as a provider for OpenAI chat
clients. The model goes in the URL, so the request line is made per request. The translations are in
fastgw.providers.wire.gemini_chat.
"""
from __future__ import annotations

from urllib.parse import quote

from fastgw.errors import GatewayError
from fastgw.providers.base import Provider
from fastgw.providers.json_body import request_object, take_usage, upstream_object
from fastgw.providers.stream import translated_stream
from fastgw.providers.wire.models import gemini_models
from fastgw.providers.wire.encode import client_json, upstream_json
from fastgw.providers.wire.gemini_chat import (
    GeminiToChatStream, chat_request_to_gemini, gemini_error_to_chat, gemini_response_to_chat)

_CHAT = "/v1/chat/completions"


class Gemini(Provider):
    """url: https://generativelanguage.googleapis.com (with or without /v1beta)."""

    def __init__(self):
        Provider.__init__(self, "gemini", True)

    def check(self, d):
        if not d.key_env:
            return "key_env: the gemini provider needs a key: name the environment variable that holds it"
        return ""

    def request_lines(self, base_path, endpoints, d):
        # Only chat: the line's start; request_line adds the model and the method.
        return {_CHAT: b"POST " + base_path.removesuffix("/v1beta").encode() + b"/v1beta/models/"}

    def header_lines(self, host_value, key, d):
        return f"host: {host_value}\r\nx-goog-api-key: {key}\r\n".encode()

    def models_target(self, base_path, cursor, page_size):
        target = f"{base_path.removesuffix('/v1beta')}/v1beta/models?pageSize={page_size}"
        return target + "&pageToken=" + quote(cursor, safe="") if cursor else target

    def models_page(self, body):
        return gemini_models(body)

    def request_line(self, ex, request_lines):
        start = request_lines.get(ex.endpoint)
        if start is None:
            raise GatewayError(400, f"{ex.endpoint} is not available for model `{ex.model}` (provider gemini).",
                               code="unsupported_endpoint")
        model = quote(ex.deployment.model or ex.model, safe="-._~").encode()   # client text in a request line
        method = b":streamGenerateContent?alt=sse" if ex.stream else b":generateContent"
        return start + model + method + b" HTTP/1.1\r\n"

    def request_body(self, ex, model_json, add_usage):
        return client_json(chat_request_to_gemini(request_object(ex.body)))

    def open_stream(self, ex, strip_usage, keep_text):
        return translated_stream(GeminiToChatStream(ex.model, ex.client_wants_usage))

    def response_body(self, ex, status, body):
        if status == 200:
            out = gemini_response_to_chat(upstream_object(body), ex.model)
            take_usage(ex, out)
        else:
            ex.status, out = gemini_error_to_chat(status, body)
        return upstream_json(out)
