"""Anthropic's Messages API in front of an OpenAI-format deployment (openai, azure): an Anthropic client's
POST /v1/messages is sent as a chat completion and the answer (body, stream or error) comes back as Anthropic's.

/v1/messages/count_tokens has no OpenAI counterpart: it is answered here, counted with the gateway's tokenizer.
The translations are in fastgw.providers.wire.messages_front.
"""
from __future__ import annotations

from fastgw.errors import Reply
from fastgw.providers.base import Provider
from fastgw.providers.json_body import dumps, request_object, token_count, upstream_object
from fastgw.providers.stream import translated_stream
from fastgw.providers.wire.encode import client_json, upstream_json
from fastgw.providers.wire.messages_front import (
    ChatToMessagesStream, chat_error_to_messages, chat_response_to_message, count_tokens_local,
    messages_request_to_chat)

_CHAT = "/v1/chat/completions"


class MessagesFront(Provider):
    def __init__(self, chat: Provider):
        Provider.__init__(self, chat.name, True)

    def request_line(self, ex, request_lines):
        return request_lines[_CHAT]

    def request_body(self, ex, model_json, add_usage):
        obj = request_object(ex.body)
        model = ex.deployment.model or ex.model
        if ex.endpoint == "/v1/messages/count_tokens":
            raise Reply(dumps(count_tokens_local(obj, model)))
        return client_json(messages_request_to_chat(obj, model))

    def open_stream(self, ex, strip_usage, keep_text):
        return translated_stream(ChatToMessagesStream(ex.model))

    def response_body(self, ex, status, body):
        if status == 200:
            resp = upstream_object(body)
            out = chat_response_to_message(resp, ex.model)
            u = out.get("usage") or {}
            ex.prompt_tokens = sum(token_count(u.get(k)) for k in (
                "input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"))
            ex.completion_tokens = token_count(u.get("output_tokens"))
        else:
            ex.status, out = chat_error_to_messages(status, body)
        return upstream_json(out)


def messages_error_body(status: int, openai_error_body: bytes) -> tuple[int, bytes]:
    """One of the gateway's own refusals (OpenAI-shaped) as Anthropic's error, for an Anthropic client."""
    status, obj = chat_error_to_messages(status, openai_error_body)
    return status, dumps(obj)
