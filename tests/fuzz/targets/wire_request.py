"""wire_request: the request translations of fastgw/providers/wire on any client body.

The first byte picks the translation (see TRANSLATIONS), the rest is the request body. Each runs as its provider
runs it (json_body.request_object, the translation, encode.client_json of the result): a translated body, or a
GatewayError 400 (the client's request cannot be expressed or is invalid); never another exception.
"""
import orjson

from fastgw.providers.json_body import request_object
from fastgw.providers.wire.anthropic_chat import chat_request_to_messages
from fastgw.providers.wire.gemini_chat import chat_request_to_gemini
from fastgw.providers.wire.messages_front import count_tokens_local, messages_request_to_chat
from tests.fuzz.common import select
from fastgw.providers.wire.encode import client_json
from tests.fuzz.targets.wire import refused


def to_anthropic(body):
    return chat_request_to_messages(request_object(body), "claude-sonnet-4-5", 4096)


def to_gemini(body):
    return chat_request_to_gemini(request_object(body))


def messages_to_chat(body):
    return messages_request_to_chat(request_object(body), "gpt-4o-mini")


def count_tokens(body):
    return count_tokens_local(request_object(body), "gpt-4o-mini")


TRANSLATIONS = [to_anthropic, to_gemini, messages_to_chat, count_tokens]


def one_input(data: bytes) -> None:
    translate, body = select(data, TRANSLATIONS)
    out = refused(lambda: client_json(translate(body)), statuses=(400,))
    if out is not None and translate is count_tokens:
        assert isinstance(orjson.loads(out)["input_tokens"], int)
