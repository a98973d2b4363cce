"""Anthropic's Messages API as a provider: OpenAI chat completions translated to /v1/messages and back, and
Anthropic's own /v1/messages (and count_tokens) passed through for Anthropic clients.

The translations themselves are in fastgw.providers.wire.anthropic_chat; this module is the glue between them
and the relay: request lines, headers, the per-request body, the stream translator and the response body.
"""
from __future__ import annotations

from urllib.parse import quote

from fastgw.protocol.jsonpeek import splice
from fastgw.providers.base import Provider
from fastgw.providers.json_body import request_object, take_usage, token_count, upstream_object
from fastgw.providers.stream import translated_stream
from fastgw.providers.wire.models import anthropic_models
from fastgw.providers.wire.encode import client_json, upstream_json
from fastgw.providers.wire.anthropic_chat import (
    MessagesToChatStream, MessagesUsageReader, chat_request_to_messages, messages_error_to_chat,
    messages_response_to_chat)

API_VERSION = "2023-06-01"


def _line(path: str) -> bytes:
    return b"POST " + path.encode() + b" HTTP/1.1\r\n"


def _upstream_model(ex) -> str:
    return ex.deployment.model or ex.model


class Anthropic(Provider):
    """OpenAI chat clients on an Anthropic deployment (url: https://api.anthropic.com)."""

    def __init__(self):
        Provider.__init__(self, "anthropic", True)

    def check(self, d):
        if not d.key_env:
            return "key_env: the anthropic provider needs a key: name the environment variable that holds it"
        if d.default_max_tokens < 1:
            return "default_max_tokens: must be >= 1"
        return ""

    def request_lines(self, base_path, endpoints, d):
        base = base_path.removesuffix("/v1")     # the base URL may be given with or without /v1
        return {"/v1/chat/completions": _line(base + "/v1/messages"),
                "/v1/messages": _line(base + "/v1/messages"),
                "/v1/messages/count_tokens": _line(base + "/v1/messages/count_tokens")}

    def header_lines(self, host_value, key, d):
        return (f"host: {host_value}\r\nx-api-key: {key}\r\n"
                f"anthropic-version: {d.api_version or API_VERSION}\r\n").encode()

    def messages_front(self):
        return MESSAGES_PASS_THROUGH

    def models_target(self, base_path, cursor, page_size):
        target = f"{base_path.removesuffix('/v1')}/v1/models?limit={page_size}"
        return target + "&after_id=" + quote(cursor, safe="") if cursor else target

    def models_page(self, body):
        return anthropic_models(body)

    def request_body(self, ex, model_json, add_usage):
        body = chat_request_to_messages(request_object(ex.body), _upstream_model(ex),
                                        ex.deployment.config.default_max_tokens)
        return client_json(body)

    def open_stream(self, ex, strip_usage, keep_text):
        return translated_stream(MessagesToChatStream(ex.model, ex.client_wants_usage))

    def response_body(self, ex, status, body):
        if status == 200:
            out = messages_response_to_chat(upstream_object(body), ex.model)
            take_usage(ex, out)
        else:
            ex.status, out = messages_error_to_chat(status, body)
        return upstream_json(out)


class AnthropicMessages(Provider):
    """Anthropic clients (POST /v1/messages) on an Anthropic deployment: bodies pass through with the
    deployment's model spliced in; the usage is read on the way."""

    def __init__(self):
        Provider.__init__(self, "anthropic", True)

    def request_body(self, ex, model_json, add_usage):
        if not model_json:
            return ex.body
        f = ex.fields
        return splice(ex.body, [(f.model_start, f.model_end, model_json)])

    def open_stream(self, ex, strip_usage, keep_text):
        return translated_stream(MessagesUsageReader(), True)

    def response_body(self, ex, status, body):
        if status == 200 and ex.endpoint == "/v1/messages":
            u = upstream_object(body).get("usage")
            if isinstance(u, dict):
                ex.prompt_tokens = sum(token_count(u.get(k)) for k in (
                    "input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"))
                ex.completion_tokens = token_count(u.get("output_tokens"))
        return body


MESSAGES_PASS_THROUGH = AnthropicMessages()
