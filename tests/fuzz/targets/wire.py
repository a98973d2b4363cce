"""What the three wire targets share: the translations as the providers call them (bytes in, through
fastgw.providers.json_body), the rule that anything they raise is a GatewayError, and checks of what they make
against the official SDKs' types (a client must be able to read every translation)."""
from __future__ import annotations

import orjson
from anthropic.types import Message, RawMessageStreamEvent
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import TypeAdapter

from fastgw.errors import GatewayError
from fastgw.providers.wire.encode import upstream_json

_ANTHROPIC_EVENT = TypeAdapter(RawMessageStreamEvent)


def refused(call, *args, statuses=(400, 502)):
    """Run a translation: its result, or None when it raised a GatewayError with one of `statuses` (a clear
    refusal). Any other exception is a finding and propagates."""
    try:
        return call(*args)
    except GatewayError as exc:
        assert exc.status in statuses, (exc.status, exc.message)
        assert isinstance(exc.message, str) and exc.message and orjson.loads(exc.body())
        return None


def check_chat_completion(obj: dict) -> None:
    """A translated answer, as the provider writes it (upstream_json), read as the openai SDK's type."""
    ChatCompletion.model_validate(orjson.loads(upstream_json(obj)))


def check_message(obj: dict) -> None:
    Message.model_validate(orjson.loads(upstream_json(obj)))


def check_openai_error(obj: dict) -> None:
    error = obj["error"]
    assert isinstance(error["message"], str) and isinstance(error["type"], str)
    assert set(error) == {"message", "type", "param", "code"}
    upstream_json(obj)


def check_anthropic_error(obj: dict) -> None:
    assert obj["type"] == "error" and isinstance(obj["error"]["message"], str)
    assert isinstance(obj["error"]["type"], str)
    upstream_json(obj)


def sse_blocks(out: bytes) -> list[tuple[str | None, bytes]]:
    """(event name, data) of each block a translator wrote: LF line ends, a blank line after each block."""
    blocks = []
    assert out == b"" or out.endswith(b"\n\n"), out[-50:]
    for block in out.split(b"\n\n")[:-1]:
        name, data = None, None
        for line in block.split(b"\n"):
            field, _, value = line.partition(b": ")
            assert field in (b"event", b"data") and (name if field == b"event" else data) is None, block
            if field == b"event":
                name = value.decode()
            else:
                data = value
        assert data is not None, block
        blocks.append((name, data))
    return blocks


def check_chat_chunks(out: bytes) -> None:
    """Blocks an OpenAI client reads: chat.completion.chunk objects, an error object, [DONE] last."""
    blocks = sse_blocks(out)
    for i, (name, data) in enumerate(blocks):
        assert name is None
        if data == b"[DONE]":
            assert i == len(blocks) - 1
            continue
        obj = orjson.loads(data)
        if "error" in obj:
            check_openai_error(obj)
        else:
            ChatCompletionChunk.model_validate(obj)


def check_anthropic_events(out: bytes) -> None:
    """Blocks an Anthropic client reads: named events whose data has the same type."""
    for name, data in sse_blocks(out):
        obj = orjson.loads(data)
        assert obj["type"] == name
        if name == "ping":
            assert obj == {"type": "ping"}
        elif name == "error":
            check_anthropic_error(obj)
        else:
            _ANTHROPIC_EVENT.validate_python(obj)
