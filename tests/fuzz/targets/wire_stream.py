"""wire_stream: the stream translators of fastgw/providers/wire on any upstream stream body.

Byte 0 picks the translator (see TRANSLATORS), the rest is the upstream's event-stream body, fed in pieces
through translated_stream as the relay feeds it. Every block sent to the client is an event its SDK reads
(chat.completion.chunk or an error, [DONE] last; Anthropic's named events); a malformed or truncated upstream
is a GatewayError 502, never another exception.
"""
from fastgw.errors import GatewayError
from fastgw.providers.stream import translated_stream
from fastgw.providers.wire.anthropic_chat import MessagesToChatStream, MessagesUsageReader
from fastgw.providers.wire.gemini_chat import GeminiToChatStream
from fastgw.providers.wire.messages_front import ChatToMessagesStream
from tests.fuzz.common import pieces, select
from tests.fuzz.targets.wire import check_anthropic_events, check_chat_chunks

MODEL = "gpt-4o-mini"

# (make the translator, passthrough, check what the client gets)
TRANSLATORS = [
    (lambda: MessagesToChatStream(MODEL, True), False, check_chat_chunks),
    (lambda: MessagesToChatStream(MODEL, False), False, check_chat_chunks),
    (MessagesUsageReader, True, None),
    (lambda: GeminiToChatStream(MODEL, True), False, check_chat_chunks),
    (lambda: GeminiToChatStream(MODEL, False), False, check_chat_chunks),
    (lambda: ChatToMessagesStream(MODEL), False, check_anthropic_events),
]


def one_input(data: bytes) -> None:
    (make, passthrough, check), body = select(data, TRANSLATORS)
    s = translated_stream(make(), passthrough)
    out = []
    try:
        for chunk in pieces(body):
            out.append(s.feed(chunk))
        out.append(s.finish())
    except GatewayError as exc:
        assert exc.status == 502 and exc.type == "upstream_error", (exc.status, exc.message)
    assert s.prompt_tokens >= -1 and s.completion_tokens >= -1
    sent = b"".join(out)
    if passthrough:
        assert body.startswith(sent)
    else:
        check(sent)
