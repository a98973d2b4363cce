"""A raw-socket HTTP/1.1 client for hostile tests: send any bytes, read the answers with h11 (an independent
parser), and tell a complete response from one that was cut off."""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

import h11
import orjson


@dataclass
class Answer:
    status: int
    headers: dict                  # lower-case names; a repeated name keeps the last value
    body: bytes
    complete: bool                 # the framing said the response ended (Content-Length met, last chunk seen)

    def error(self) -> dict:
        """The OpenAI error object of the body; fails the test when the body is not one."""
        err = orjson.loads(self.body)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
        return err


@dataclass
class Conversation:
    answers: list = field(default_factory=list)
    closed: bool = False           # the server closed (or reset) the connection
    reset: bool = False            # ... by a reset
    raw: bytes = b""


def converse(port: int, data: bytes | list, expect: int = 1, timeout: float = 5.0, methods=(),
             pause: float = 0.0) -> Conversation:
    """Send `data` (bytes, or a list of pieces sent `pause` seconds apart), then read until `expect` complete
    answers came, the server closed, or `timeout`. `methods`: the request methods in order (a HEAD answer has
    no body), GET by default."""
    c = Conversation()
    reader = Reader(methods)
    raw = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            for piece in ([data] if isinstance(data, bytes) else data):
                s.sendall(piece)
                if pause:
                    time.sleep(pause)
        except (BrokenPipeError, ConnectionResetError):
            c.closed = c.reset = True
        deadline = time.monotonic() + timeout
        while not c.closed and time.monotonic() < deadline and reader.complete < expect:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = s.recv(1 << 20)
            except socket.timeout:
                break
            except ConnectionResetError:
                c.closed = c.reset = True
                break
            if not chunk:
                c.closed = True
                break
            raw += chunk
            reader.feed(chunk)
    c.raw = bytes(raw)
    c.answers = reader.answers()
    return c


def parse(raw: bytes, methods=()) -> list[Answer]:
    """The responses in `raw`, in order; the last one is incomplete when the bytes end inside it."""
    reader = Reader(methods)
    reader.feed(raw)
    return reader.answers()


class Reader:
    """Responses read incrementally with h11 (client role): feed() bytes as they come, answers() so far."""

    def __init__(self, methods=()):
        self.methods = methods
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=1 << 20)
        self.done: list[Answer] = []
        self.current: Answer | None = None
        self.broken = False           # h11 refused the bytes (or the framing said no more): nothing more is read
        self._ask()

    @property
    def complete(self) -> int:
        return len(self.done)

    def _ask(self) -> None:
        method = self.methods[len(self.done)] if len(self.done) < len(self.methods) else "GET"
        self.conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        self.conn.send(h11.EndOfMessage())

    def feed(self, data: bytes) -> None:
        if self.broken:
            return
        self.conn.receive_data(data)
        while True:
            try:
                ev = self.conn.next_event()
            except h11.RemoteProtocolError:
                self.broken = True
                return
            if ev is h11.NEED_DATA or ev is h11.PAUSED or isinstance(ev, h11.ConnectionClosed):
                return
            if isinstance(ev, h11.Response):
                self.current = Answer(ev.status_code, {k.decode().lower(): v.decode("latin-1")
                                                       for k, v in ev.headers}, b"", False)
            elif isinstance(ev, h11.Data):
                self.current.body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                self.current.complete = True
                self.done.append(self.current)
                self.current = None
                if self.conn.our_state is h11.MUST_CLOSE or self.conn.their_state is h11.MUST_CLOSE:
                    self.broken = True
                    return
                self.conn.start_next_cycle()
                self._ask()

    def answers(self) -> list[Answer]:
        return self.done + ([self.current] if self.current is not None else [])


def post(body: bytes, headers: str = "", path: str = "/v1/chat/completions", key: str = "") -> bytes:
    """A POST with a JSON body (and the consumer's key when given)."""
    auth = f"authorization: Bearer {key}\r\n" if key else ""
    return (f"POST {path} HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{auth}{headers}\r\n").encode("latin-1") + body
