"""OpenAI's Realtime API on the mock: GET /v1/realtime?model=M (and Azure's /openai/realtime?deployment=D)
upgraded to a WebSocket, speaking the GA event names the openai SDK's realtime client uses.

On open: `session.created`. Client events:
  session.update              -> session.updated (the session with the update's fields)
  conversation.item.create    -> conversation.item.added, conversation.item.done (its text joins the conversation)
  input_audio_buffer.append   -> nothing (the audio's bytes are counted)
  input_audio_buffer.commit   -> input_audio_buffer.committed
  input_audio_buffer.clear    -> input_audio_buffer.cleared
  response.create             -> response.created, response.output_item.added, N response.output_text.delta (the
                                 canned pieces; N = x-mock-chunks of the upgrade request), response.output_text.done,
                                 response.output_item.done, response.done with usage
  response.cancel             -> nothing (a response is sent whole at once)
  anything else, or not JSON  -> an `error` event (type invalid_request_error, code unknown_event / invalid_json)
Usage is deterministic: input_tokens = 4 + the conversation's text bytes / 4 (rounded up) + appended audio bytes /
800 (rounded down); output_tokens = the number of deltas. The answer joins the conversation, so each response's
input grows. x-mock-echo-headers: 1 on the upgrade puts its headers, as JSON, in session.created's
`session.instructions`; x-mock-reset-after: N aborts the connection (no close frame) after N events.

The frames are read by a small plain-Python parser here (the mock must not need the websockets package): masked
client frames, fragments, ping (answered with pong) and close (answered with close, then the connection closes).
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import struct

import orjson

from fastgw.devtools.mock.wire import MockRequest, Refusal, pieces

__all__ = ["ROUTES", "Upgrade"]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Upgrade:
    """What the Realtime handlers return: the server hands the connection over (server.py, one line)."""

    __slots__ = ("req", "model")

    def __init__(self, req: MockRequest, model: str):
        self.req = req
        self.model = model

    def take_over(self, conn, parser) -> bool:
        """Answer 101 and make a RealtimeSession the connection's protocol; True (answered)."""
        key = self.req.header(b"sec-websocket-key") or b""
        accept = base64.b64encode(hashlib.sha1(key.strip() + _GUID).digest())
        head = (b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
                b"sec-websocket-accept: " + accept + b"\r\n")
        protocols = self.req.header(b"sec-websocket-protocol")
        if protocols and b"realtime" in [p.strip() for p in protocols.split(b",")]:
            head += b"sec-websocket-protocol: realtime\r\n"
        session = RealtimeSession(conn.transport, conn.stats, self.req, self.model)
        conn.closed = True                 # its HTTP loop stops; the session counts the connection's end
        conn.transport.write(head + b"\r\n")
        conn.transport.set_protocol(session)
        session.start(parser.take_buffered())
        return True


def _upgrade_checks(req: MockRequest) -> None:
    if (req.header(b"upgrade") or b"").lower() != b"websocket":
        raise Refusal(400, "this endpoint needs a WebSocket upgrade", "websocket_upgrade_required")
    key = req.header(b"sec-websocket-key")
    try:
        ok = key is not None and len(base64.b64decode(key.strip(), validate=True)) == 16
    except ValueError:
        ok = False
    if not ok or (req.header(b"sec-websocket-version") or b"").strip() != b"13":
        raise Refusal(400, "invalid Sec-WebSocket-Key or Sec-WebSocket-Version", "invalid_websocket_handshake")
    if req.header(b"sec-websocket-extensions"):
        raise Refusal(400, "the mock negotiates no WebSocket extension", "unsupported_extension")


def openai_realtime(req: MockRequest) -> Upgrade:
    _upgrade_checks(req)
    model = req.query_param("model")
    if not model:
        raise Refusal(400, "you must provide a model parameter", "missing_model")
    return Upgrade(req, model)


def azure_realtime(req: MockRequest) -> Upgrade:
    _upgrade_checks(req)
    if not req.header(b"api-key") and req.bearer() is None:
        raise Refusal(401, "Access denied due to invalid subscription key or wrong API endpoint.", "401")
    deployment = req.query_param("deployment")
    if not deployment or not req.query_param("api-version"):
        raise Refusal(400, "deployment and api-version are required", "missing_parameter")
    return Upgrade(req, deployment)


ROUTES = ((b"GET", b"/v1/realtime", openai_realtime), (b"GET", b"/openai/realtime", azure_realtime))


# -- frames ----------------------------------------------------------------------------------------------

def _frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 126)) + struct.pack("!H", n)
    else:
        head = bytes((0x80 | opcode, 127)) + struct.pack("!Q", n)
    return head + payload


def _unmask(payload: bytes, mask: bytes) -> bytes:
    if not mask:
        return payload
    n = len(payload)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


class RealtimeSession(asyncio.Protocol):
    """The mock's side of one Realtime WebSocket."""

    def __init__(self, transport, stats, req: MockRequest, model: str):
        self.transport = transport
        self.stats = stats
        self.model = model
        self.chunks = req.chunks
        self.echo = req.echoed_headers() if req.echo_headers else None
        self.buf = b""
        self.parts: list[bytes] = []     # fragments of the message being received
        self.closed = False
        self.session = {"id": "sess_mock", "object": "realtime.session", "type": "realtime", "model": model,
                        "output_modalities": ["text"], "instructions": self.echo or ""}
        self.conversation: list[str] = []
        self.audio_bytes = 0
        self.n = 0                       # ids
        reset = req.header(b"x-mock-reset-after")
        self.reset_after = int(reset) if reset is not None and reset.strip().isdigit() else -1

    def start(self, early: bytes) -> None:
        self._send({"type": "session.created", "session": self.session})
        if early:
            self.data_received(early)

    def _id(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}_mock{self.n}"

    def _send(self, event: dict) -> None:
        if not self.closed:
            event.setdefault("event_id", self._id("event"))
            self.transport.write(_frame(0x1, orjson.dumps(event)))
            self.reset_after -= 1
            if self.reset_after == 0:
                self.closed = True
                self.stats.resets += 1
                self.transport.abort()

    # -- transport ----------------------------------------------------------------------------------

    def connection_lost(self, exc):
        self.closed = True
        self.stats.open_connections -= 1

    def eof_received(self):
        return False

    def data_received(self, data: bytes) -> None:
        b = self.buf + data if self.buf else data
        pos, end = 0, len(b)
        while not self.closed and end - pos >= 2:
            n, i = b[pos + 1] & 0x7F, pos + 2
            if n == 126:
                if end - pos < 4:
                    break
                n, i = struct.unpack_from("!H", b, pos + 2)[0], pos + 4
            elif n == 127:
                if end - pos < 10:
                    break
                n, i = struct.unpack_from("!Q", b, pos + 2)[0], pos + 10
            masked = b[pos + 1] & 0x80
            if end - i < n + (4 if masked else 0):
                break
            mask = b[i:i + 4] if masked else b""
            i += len(mask)
            fin, opcode = b[pos] & 0x80, b[pos] & 0x0F
            pos = i + n
            self._frame_in(fin, opcode, _unmask(b[i:pos], mask))
        self.buf = b[pos:]

    def _frame_in(self, fin: int, opcode: int, payload: bytes) -> None:
        if opcode == 0x8:                                      # close: answer it, then close
            self.transport.write(_frame(0x8, payload[:2]))
            self.closed = True
            self.transport.close()
        elif opcode == 0x9:
            self.transport.write(_frame(0xA, payload))
        elif opcode in (0x0, 0x1, 0x2):
            self.parts.append(payload)
            if fin:
                message, self.parts = b"".join(self.parts), []
                self._event(message)

    # -- events -------------------------------------------------------------------------------------

    def _error(self, code: str, message: str, event_id=None) -> None:
        self._send({"type": "error", "error": {"type": "invalid_request_error", "code": code, "message": message,
                                               "param": None, "event_id": event_id}})

    def _event(self, message: bytes) -> None:
        try:
            ev = orjson.loads(message)
        except orjson.JSONDecodeError:
            self._error("invalid_json", "The event is not valid JSON.")
            return
        kind = ev.get("type") if isinstance(ev, dict) else None
        handler = _HANDLERS.get(kind)
        if handler is None:
            self._error("unknown_event", f"Unknown event type {kind!r}.", ev.get("event_id")
                        if isinstance(ev, dict) else None)
            return
        handler(self, ev)

    def session_update(self, ev: dict) -> None:
        update = ev.get("session")
        if isinstance(update, dict):
            self.session.update({k: v for k, v in update.items() if k not in ("id", "object")})
        self._send({"type": "session.updated", "session": self.session})

    def item_create(self, ev: dict) -> None:
        item = dict(ev.get("item") or {})
        item.setdefault("id", self._id("item"))
        item.setdefault("object", "realtime.item")
        item["status"] = "completed"
        for part in item.get("content") or []:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                self.conversation.append(part["text"])
        self._send({"type": "conversation.item.added", "previous_item_id": None, "item": item})
        self._send({"type": "conversation.item.done", "previous_item_id": None, "item": item})

    def audio_append(self, ev: dict) -> None:
        audio = ev.get("audio")
        if isinstance(audio, str):
            self.audio_bytes += len(audio) * 3 // 4

    def audio_commit(self, ev: dict) -> None:
        self._send({"type": "input_audio_buffer.committed", "previous_item_id": None, "item_id": self._id("item")})

    def audio_clear(self, ev: dict) -> None:
        self.audio_bytes = 0
        self._send({"type": "input_audio_buffer.cleared"})

    def response_create(self, ev: dict) -> None:
        rid, item_id = self._id("resp"), self._id("item")
        text_pieces = pieces(self.chunks) if self.chunks else []
        text = "".join(text_pieces)
        input_tokens = 4 + -(-sum(len(t.encode()) for t in self.conversation) // 4) + self.audio_bytes // 800
        output_tokens = len(text_pieces)
        base = {"id": rid, "object": "realtime.response", "conversation_id": "conv_mock",
                "output_modalities": ["text"], "status": "in_progress", "output": [], "usage": None}
        self._send({"type": "response.created", "response": base})
        item = {"id": item_id, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": "in_progress", "content": []}
        self._send({"type": "response.output_item.added", "response_id": rid, "output_index": 0, "item": item})
        where = {"response_id": rid, "item_id": item_id, "output_index": 0, "content_index": 0}
        for piece in text_pieces:
            self._send({"type": "response.output_text.delta", **where, "delta": piece})
        self._send({"type": "response.output_text.done", **where, "text": text})
        done_item = {**item, "status": "completed", "content": [{"type": "output_text", "text": text}]}
        self._send({"type": "response.output_item.done", "response_id": rid, "output_index": 0, "item": done_item})
        usage = {"total_tokens": input_tokens + output_tokens, "input_tokens": input_tokens,
                 "output_tokens": output_tokens,
                 "input_token_details": {"text_tokens": input_tokens, "audio_tokens": 0, "cached_tokens": 0},
                 "output_token_details": {"text_tokens": output_tokens, "audio_tokens": 0}}
        self._send({"type": "response.done",
                    "response": {**base, "status": "completed", "output": [done_item], "usage": usage}})
        self.conversation.append(text)

    def response_cancel(self, ev: dict) -> None:
        pass


_HANDLERS = {
    "session.update": RealtimeSession.session_update,
    "conversation.item.create": RealtimeSession.item_create,
    "input_audio_buffer.append": RealtimeSession.audio_append,
    "input_audio_buffer.commit": RealtimeSession.audio_commit,
    "input_audio_buffer.clear": RealtimeSession.audio_clear,
    "response.create": RealtimeSession.response_create,
    "response.cancel": RealtimeSession.response_cancel,
}
