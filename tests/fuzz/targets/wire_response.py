"""wire_response: the response and error translations of fastgw/providers on any upstream body.

Byte 0 picks the translation (see TRANSLATIONS), byte 1 the upstream's HTTP status for the error ones (see
STATUSES), the rest is the body. Success bodies go through json_body.upstream_object as the providers do: a
translation the official SDK types accept (openai ChatCompletion, anthropic Message), or a GatewayError 502
(400 for a prompt Gemini blocked); error bodies always give an error object of the client's API. The providers'
own response_body is run too, for the usage it reads into the exchange.
"""
import time

from fastgw.protocol.http import HEAD, RequestParser
from fastgw.providers.anthropic import MESSAGES_PASS_THROUGH, Anthropic
from fastgw.providers.gemini import Gemini
from fastgw.providers.json_body import upstream_object
from fastgw.providers.messages import MessagesFront
from fastgw.providers.openai import OpenAI
from fastgw.providers.wire.anthropic_chat import messages_error_to_chat, messages_response_to_chat
from fastgw.providers.wire.gemini_chat import gemini_error_to_chat, gemini_response_to_chat
from fastgw.providers.wire.messages_front import chat_error_to_messages, chat_response_to_message
from fastgw.proxy.exchange import Exchange
from tests.fuzz.common import select
from tests.fuzz.targets.wire import (
    check_anthropic_error, check_chat_completion, check_message, check_openai_error, refused)

STATUSES = [200, 400, 401, 402, 403, 404, 408, 409, 413, 422, 429, 500, 502, 503, 504, 529, 0, 999]
MODEL = "gpt-4o-mini"


def exchange(endpoint: str) -> Exchange:
    p = RequestParser()
    p.feed(b"POST " + endpoint.encode() + b" HTTP/1.1\r\nhost: gw\r\ncontent-length: 0\r\n\r\n")
    assert p.next_event() == HEAD
    ex = Exchange("req-1", "127.0.0.1", b"POST", endpoint, p, time.perf_counter())
    ex.endpoint = endpoint
    ex.model = MODEL
    ex.status = 200
    return ex


def anthropic_ok(status, body):
    check_chat_completion(messages_response_to_chat(upstream_object(body), MODEL))


def gemini_ok(status, body):
    check_chat_completion(gemini_response_to_chat(upstream_object(body), MODEL))


def front_ok(status, body):
    check_message(chat_response_to_message(upstream_object(body), MODEL))


def anthropic_error(status, body):
    code, obj = messages_error_to_chat(status, body)
    assert 400 <= code <= 599
    check_openai_error(obj)


def gemini_error(status, body):
    code, obj = gemini_error_to_chat(status, body)
    assert 400 <= code <= 599
    check_openai_error(obj)


def front_error(status, body):
    code, obj = chat_error_to_messages(status, body)
    check_anthropic_error(obj)


def provider_body(provider, endpoint):
    """provider.response_body(ex, status, body) as the relay calls it: bytes out, and token counts in ex that
    are counts (or -1, unknown)."""
    def run(status, body):
        ex = exchange(endpoint)
        out = provider.response_body(ex, status, body)
        assert isinstance(out, bytes)
        assert ex.prompt_tokens >= -1 and ex.completion_tokens >= -1, (ex.prompt_tokens, ex.completion_tokens)
    run.__name__ = f"{type(provider).__name__}.response_body"
    return run


TRANSLATIONS = [anthropic_ok, gemini_ok, front_ok, anthropic_error, gemini_error, front_error,
                provider_body(Anthropic(), "/v1/chat/completions"),
                provider_body(MESSAGES_PASS_THROUGH, "/v1/messages"),
                provider_body(Gemini(), "/v1/chat/completions"),
                provider_body(MessagesFront(OpenAI()), "/v1/messages")]


def one_input(data: bytes) -> None:
    translate, rest = select(data, TRANSLATIONS)
    status, body = select(rest, STATUSES)
    refused(translate, status, body)
