"""The mock's HTTP server: an asyncio Protocol on uvloop, HTTP parsed by fastgw.protocol.http.RequestParser,
keep-alive and pipelining, fault injection by x-mock-* headers, per-server stats, and the dispatch table
(`Routes`) that hands each request to a wire-format handler (see the package docstring).

Fault injection by request header (the gateway forwards client headers, so tests drive it end to end):
  x-mock-status: N                 answer N with the route's error body (OpenAI's shape by default)
  x-mock-error-code: CODE          the `code` of that error body (default "mock_error"), e.g.
                                   context_length_exceeded
  x-mock-retry-after: V            that answer carries `retry-after: V` (seconds); x-mock-retry-after-ms:
                                   `retry-after-ms: V`
  x-mock-delay-ms: N               wait before the response head
  x-mock-first-token-delay-ms: N   stream: head at once, the first event after N ms
  x-mock-chunk-delay-ms: N         stream: N ms between events
  x-mock-paced: 1                  stream: one write per event (head, each event, end) even with no delay, the
                                   loop running between writes, as real providers send; without it a stream
                                   with no delays is written in one go
  x-mock-chunks: N                 N content pieces (default 14)
  x-mock-reset-after: N            stream: abort the TCP connection after N events (no final chunk)
  x-mock-no-usage: 1               never send usage (OpenAI and Azure; Anthropic and Gemini always report it)
  x-mock-close: 1                  answer with Connection: close and close
  x-mock-echo-headers: 1           text answers: the request headers as a JSON object in the content (OpenAI
                                   streams too, cut into the x-mock-chunks pieces; other formats non-stream)
Endpoint headers (read by their handlers): x-mock-speech-bytes: N, the length of a speech answer
(openai_media.py); x-mock-hold: 1, a batch or fine-tuning job created but left running, to be cancelled
(openai_jobs.py). The delays, x-mock-status and x-mock-close apply to every route.
Defaults for the delays and chunk count can be given to start_mock(**defaults): delay_ms,
first_token_delay_ms, chunk_delay_ms, chunks; and for the error answers: status, error_code, retry_after,
retry_after_ms (a mock that fails every request, one of several upstreams in a test).

Unknown paths get 404 in OpenAI's error shape, known paths asked with another method 405 in their wire format's;
all status lines and the default error bodies come from fastgw.errors, as the gateway's own.

Request bodies are held whole by the parser, up to start_mock's max_body_bytes (1 GiB by default, so tests can
upload hundreds of MB through the gateway: the mock's memory is not what they measure). A BodyStream reply is
written one piece at a time, waiting while the transport's buffer is over its high-water mark (pause_writing /
resume_writing), so a download of any size holds one piece in the mock.
"""
from __future__ import annotations

import asyncio
import signal

from fastgw.devtools.mock.realtime import Upgrade
from fastgw.devtools.mock.wire import BodyStream, BytesReply, JsonReply, MockRequest, Refusal, frame, openai_error_body
from fastgw.errors import reason
from fastgw.observability.logs import Logger
from fastgw.protocol.http import END, ERROR, HEAD, NEED_DATA, RequestParser
from fastgw.runtime.listener import Listener, listen_socket

__all__ = ["start_mock", "run_mock", "MockServer", "MockStats", "Routes", "ROUTES"]


class Routes:
    """The dispatch table: (method, path) -> (handler, error function). A path ending in b"*" matches every
    path with that prefix (the longest prefix wins); exact paths are tried first. `error(status, message,
    code) -> bytes` renders the route's refusals and x-mock-status answers in its wire format's shape (or
    returns a JsonReply when the answer needs headers of its own, such as a 429's retry-after)."""

    def __init__(self):
        self._exact: dict[bytes, dict] = {}
        self._prefixes: list[tuple[bytes, dict]] = []

    def add(self, method: bytes, path: bytes, handler, error=openai_error_body) -> None:
        if path.endswith(b"*"):
            prefix = path[:-1]
            methods = next((m for p, m in self._prefixes if p == prefix), None)
            if methods is None:
                methods = {}
                self._prefixes.append((prefix, methods))
                self._prefixes.sort(key=lambda pm: -len(pm[0]))
        else:
            methods = self._exact.setdefault(path, {})
        if method in methods:
            raise ValueError(f"mock route {method.decode()} {path.decode()} is already registered")
        methods[method] = (handler, error)

    def add_all(self, routes, error=openai_error_body) -> None:
        """Register a wire format's ROUTES, ((method, path, handler), ...), with its error function."""
        for method, path, handler in routes:
            self.add(method, path, handler, error)

    def match(self, path: bytes) -> dict | None:
        """{method: (handler, error)} for the path, or None when no route has it."""
        methods = self._exact.get(path)
        if methods is None:
            for prefix, m in self._prefixes:
                if path.startswith(prefix):
                    return m
        return methods


def health(req: MockRequest) -> JsonReply:
    return JsonReply(200, b'{"status":"ok"}')


# The table start_mock serves unless given another; the package __init__ registers the wire formats in it.
ROUTES = Routes()
ROUTES.add(b"GET", b"/health", health)


class MockStats:
    """Per-server counters, so tests can check that the gateway does not leak upstream connections."""

    __slots__ = ("open_connections", "connections_total", "requests", "active_requests", "resets",
                 "stream_writes", "write_pauses", "body_stream_bytes")

    def __init__(self):
        self.open_connections = 0
        self.connections_total = 0
        self.requests = 0
        self.active_requests = 0  # requests whose response is still being written (delays, streams)
        self.resets = 0           # connections aborted by x-mock-reset-after
        self.stream_writes = 0    # socket writes of streamed replies (head, events, end): shows the pacing
        self.write_pauses = 0     # pause_writing calls: a client reading slower than the mock writes
        self.body_stream_bytes = 0  # bytes of BodyStream pieces made and written (shows the backpressure)


class MockServer(asyncio.AbstractServer):
    """The listening server (uvloop's, which takes no attributes) plus `mock_stats` and `port`."""

    def __init__(self, server, stats: MockStats, state: dict):
        self._server = server
        self.mock_stats = stats
        self.mock_state = state  # what the stateful endpoints created (files, batches...), by module

    @property
    def sockets(self):
        return self._server.sockets

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    def close(self):
        self._server.close()

    async def wait_closed(self):
        await self._server.wait_closed()

    def get_loop(self):
        return self._server.get_loop()

    def is_serving(self):
        return self._server.is_serving()

    async def start_serving(self):
        await self._server.start_serving()

    async def serve_forever(self):
        await self._server.serve_forever()


class _Faults:
    """The x-mock-* settings of one request (see the module docstring), over the server's defaults."""

    __slots__ = ("status", "delay", "first", "gap", "chunks", "reset_after", "no_usage", "echo_headers", "close",
                 "paced", "error_code", "error_headers")

    def __init__(self, faults: dict, defaults: dict):
        self.status = _int_header(faults, b"x-mock-status", defaults.get("status", 0))
        code = faults.get(b"x-mock-error-code")
        self.error_code = code.decode("latin-1") if code is not None else defaults.get("error_code", "mock_error")
        self.error_headers = b""
        for name, key in ((b"retry-after", "retry_after"), (b"retry-after-ms", "retry_after_ms")):
            v = faults.get(b"x-mock-" + name, None)
            if v is None and key in defaults:
                v = str(defaults[key]).encode()
            if v is not None and v.strip() and b"\r" not in v and b"\n" not in v:
                self.error_headers += name + b": " + v.strip() + b"\r\n"
        self.delay = _int_header(faults, b"x-mock-delay-ms", defaults.get("delay_ms", 0))
        self.first = _int_header(faults, b"x-mock-first-token-delay-ms", defaults.get("first_token_delay_ms", 0))
        self.gap = _int_header(faults, b"x-mock-chunk-delay-ms", defaults.get("chunk_delay_ms", 0))
        self.chunks = max(0, _int_header(faults, b"x-mock-chunks", defaults.get("chunks", 14)))
        self.reset_after = _int_header(faults, b"x-mock-reset-after", -1)
        self.no_usage = faults.get(b"x-mock-no-usage") == b"1"
        self.echo_headers = faults.get(b"x-mock-echo-headers") == b"1"
        self.close = faults.get(b"x-mock-close") == b"1"
        self.paced = faults.get(b"x-mock-paced") == b"1"


def _int_header(faults: dict, name: bytes, default: int) -> int:
    v = faults.get(name)
    if v is None:
        return default
    try:
        return int(v)
    except ValueError:
        return default


# -- the protocol --------------------------------------------------------------------------------------

_HEAD_JSON = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s%s\r\n"
_HEAD_BYTES = b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s%s\r\n"
_HEAD_STREAM = (b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncache-control: no-cache\r\n"
                b"transfer-encoding: chunked\r\n%s\r\n")
_HEAD_BODY_STREAM = b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ntransfer-encoding: chunked\r\n%s%s\r\n"
_CONTINUE = b"HTTP/1.1 100 %s\r\n\r\n" % reason(100)
_CLOSE = b"connection: close\r\n"
_LAST = b"0\r\n\r\n"
MAX_BODY_BYTES = 1 << 30


class _MockConnection(asyncio.Protocol):
    def __init__(self, stats: MockStats, defaults: dict, routes: Routes = ROUTES, state: dict | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES):
        self.stats = stats
        self.defaults = defaults
        self.no_faults = _Faults({}, defaults)  # shared by the requests without x-mock-* headers
        self.routes = routes
        self.state = {} if state is None else state
        self.parser = RequestParser(max_body_bytes=max_body_bytes)
        self.writable = None  # a future while the transport's write buffer is full (pause_writing)
        self.transport = None
        self.busy = False   # a response is being written by a task; later pipelined requests wait
        self.task = None
        self.closed = False
        self.eof = False    # the client half-closed: answer what it sent, then close

    def connection_made(self, transport):
        self.transport = transport
        self.stats.open_connections += 1
        self.stats.connections_total += 1

    def connection_lost(self, exc):
        self.closed = True
        self.stats.open_connections -= 1
        if self.task is not None:
            self.task.cancel()

    def pause_writing(self):
        self.stats.write_pauses += 1
        if self.writable is None:
            self.writable = asyncio.get_running_loop().create_future()

    def resume_writing(self):
        if self.writable is not None:
            if not self.writable.done():
                self.writable.set_result(None)
            self.writable = None

    def data_received(self, data):
        self.parser.feed(data)
        if not self.busy:
            self._process()

    def eof_received(self):
        self.eof = True
        if not self.busy:
            self.transport.close()
        return True  # keep the transport open until the response in flight is written

    def _process(self):
        p = self.parser
        while not self.closed:
            ev = p.next_event()
            if ev == NEED_DATA:
                return
            if ev == HEAD:
                if p.expect_continue:
                    self.transport.write(_CONTINUE)
                continue
            if ev == ERROR:
                status = p.error_status or 400
                self._send_json(status, openai_error_body(status, p.error_message or "bad request"), close=True)
                return
            if ev == END:
                self.stats.requests += 1
                if self._handle(p):  # answered synchronously
                    if self.closed or self.transport.is_closing():
                        return
                    p.start_next()
                    continue
                return  # a task answers, then resumes _process

    def _finish_async(self):
        self.busy = False
        self.task = None
        self.stats.active_requests -= 1
        if self.closed or self.transport.is_closing():
            return
        self.parser.start_next()
        self._process()
        if self.eof and not self.busy:
            self.transport.close()

    def _send_json(self, status: int, body: bytes, close: bool = False, headers: bytes = b"",
                   content_type: bytes | None = None):
        if content_type is None:
            head = _HEAD_JSON % (status, reason(status), len(body), headers, _CLOSE if close else b"")
        else:
            head = _HEAD_BYTES % (status, reason(status), content_type, len(body), headers, _CLOSE if close else b"")
        if len(body) > 65536:   # not copied into the head
            self.transport.write(head)
            self.transport.write(body)
        else:
            self.transport.write(head + body)
        if close:
            self.transport.close()

    # Returns True when the response was written synchronously, False when a task is writing it.
    def _handle(self, p) -> bool:
        target = p.target
        q = target.find(b"?")
        path, query = (target, b"") if q < 0 else (target[:q], target[q + 1:])
        method = p.method
        headers = p.headers()
        x_mock = [(n, v) for n, v in headers if n.startswith(b"x-mock-")] if headers else None
        f = _Faults(dict(x_mock), self.defaults) if x_mock else self.no_faults
        close = f.close or not p.keep_alive
        delay = f.delay

        methods = self.routes.match(path)
        route = methods.get(method) if methods is not None else None
        if route is not None:
            error = route[1]
        else:  # the path's wire format answers a wrong method; OpenAI's shape an unknown path
            error = next(iter(methods.values()))[1] if methods else openai_error_body
        if f.status >= 400:
            return self._respond_error(error, f.status, f"mock error {f.status} (x-mock-status)", f.error_code,
                                       close, delay, f.error_headers)
        if route is None:
            if methods is None:
                return self._respond_error(error, 404, f"Invalid URL ({method.decode()} {path.decode('latin-1')})",
                                           "unknown_url", close, delay)
            return self._respond_error(error, 405, f"Method {method.decode()} not allowed", None, close, delay)

        try:
            reply = route[0](MockRequest(method, path, query, headers, p.body, f.chunks, f.no_usage,
                                         f.echo_headers, self.state))
        except Refusal as r:
            return self._respond_error(error, r.status, r.message, r.code, close, delay)
        if reply.__class__ is JsonReply:
            return self._respond_json(reply.status, reply.body, close, delay, reply.headers)
        if reply.__class__ is Upgrade:          # a WebSocket (realtime.py) takes the connection over
            return reply.take_over(self, p)
        if reply.__class__ is BytesReply:
            return self._respond_json(reply.status, reply.body, close, delay, reply.headers, reply.content_type)
        if reply.__class__ is BodyStream:
            head = _HEAD_BODY_STREAM % (reply.content_type, reply.headers, _CLOSE if close else b"")
            self._start(self._body_stream(head, reply.pieces, delay, close))
            return False

        events = reply.events
        reset_after = f.reset_after
        head = _HEAD_STREAM % (reply.content_type, _CLOSE if close else b"")
        if delay <= 0 and f.first <= 0 and f.gap <= 0 and not f.paced:
            self.stats.stream_writes += 1
            if 0 <= reset_after < len(events):
                self.transport.write(head + b"".join(events[:reset_after]))
                self._reset()
                return True
            self.transport.write(head + b"".join(events) + _LAST)
            if close:
                self.transport.close()
            return True
        self._start(self._stream(head, events, delay, f.first, f.gap, reset_after, close, f.paced))
        return False

    def _respond_json(self, status: int, body: bytes, close: bool, delay_ms: int, headers: bytes = b"",
                      content_type: bytes | None = None) -> bool:
        if delay_ms <= 0:
            self._send_json(status, body, close, headers, content_type)
            return True
        self._start(self._delayed_json(status, body, close, delay_ms, headers, content_type))
        return False

    def _respond_error(self, error, status: int, message: str, code, close: bool, delay_ms: int,
                       headers: bytes = b"") -> bool:
        """Answer with the route's error function: a body, or a JsonReply with headers of its own."""
        out = error(status, message, code)
        if out.__class__ is JsonReply:
            return self._respond_json(out.status, out.body, close, delay_ms, out.headers + headers)
        return self._respond_json(status, out, close, delay_ms, headers)

    def _start(self, coro):
        self.busy = True
        self.stats.active_requests += 1
        self.task = asyncio.get_running_loop().create_task(coro)

    def _reset(self):
        self.stats.resets += 1
        self.transport.abort()

    async def _delayed_json(self, status, body, close, delay_ms, headers, content_type):
        try:
            await asyncio.sleep(delay_ms / 1000)
            if not self.closed:
                self._send_json(status, body, close, headers, content_type)
        finally:
            self._finish_async()

    async def _body_stream(self, head, pieces, delay_ms, close):
        """Write a BodyStream: a chunk per piece, made only once the transport takes more (backpressure)."""
        stats = self.stats
        try:
            if delay_ms > 0:
                await asyncio.sleep(delay_ms / 1000)
            if self.closed:
                return
            stats.stream_writes += 1
            self.transport.write(head)
            for piece in pieces:
                if piece:
                    stats.stream_writes += 1
                    stats.body_stream_bytes += len(piece)
                    self.transport.write(frame(piece))
                # Let the loop run between pieces (other connections, the socket drains); wait while it is full.
                await asyncio.sleep(0)
                while self.writable is not None and not self.closed:
                    await self.writable
                if self.closed:
                    return
            stats.stream_writes += 1
            self.transport.write(_LAST)
            if close:
                self.transport.close()
        finally:
            close_pieces = getattr(pieces, "close", None)
            if close_pieces is not None:
                close_pieces()
            self._finish_async()

    async def _stream(self, head, events, delay_ms, first_ms, gap_ms, reset_after, close, paced):
        stats = self.stats
        transport_write = self.transport.write

        def write(data):
            stats.stream_writes += 1
            transport_write(data)

        try:
            if delay_ms > 0:
                await asyncio.sleep(delay_ms / 1000)
            if self.closed:
                return
            write(head)
            if first_ms > 0:
                await asyncio.sleep(first_ms / 1000)
            for i, event in enumerate(events):
                if self.closed:
                    return
                if i == reset_after:
                    self._reset()
                    return
                if i and gap_ms > 0:
                    await asyncio.sleep(gap_ms / 1000)
                    if self.closed:
                        return
                elif paced:   # let the loop run (and the socket take this write alone) before the next event
                    await asyncio.sleep(0)
                    if self.closed:
                        return
                write(event)
            write(_LAST)
            if close:
                self.transport.close()
        finally:
            self._finish_async()


# -- entry points --------------------------------------------------------------------------------------

async def start_mock(host: str, port: int, *, ssl=None, routes: Routes = ROUTES,
                     max_body_bytes: int = MAX_BODY_BYTES, **defaults) -> MockServer:
    """Listen on host:port (0 = an ephemeral port: read it from `server.port`) on the running loop.

    `defaults`: delay_ms, first_token_delay_ms, chunk_delay_ms, chunks (request headers override them).
    `ssl`: an ssl.SSLContext to serve HTTPS (tests of https upstreams).
    `routes`: the dispatch table (default: every registered wire format).
    `max_body_bytes`: larger request bodies are refused with 413.
    The returned server has `mock_stats` (a MockStats), `mock_state` (the stateful endpoints' objects, this
    server's alone) and the usual AbstractServer methods.
    """
    stats = MockStats()
    state: dict = {}
    loop = asyncio.get_running_loop()
    factory = lambda: _MockConnection(stats, defaults, routes, state, max_body_bytes)  # noqa: E731
    if ssl is not None:
        server = await loop.create_server(factory, host, port, reuse_address=True, backlog=2048, ssl=ssl)
    else:
        # Every pending connection accepted per readiness event, as the gateway does (runtime/listener.py):
        # uvloop's server accepts one per loop iteration, and a burst of thousands of clients then waits.
        server = _ListenerServer(loop, Listener(loop, listen_socket(host, port, reuse_port=False), factory))
    return MockServer(server, stats, state)


class _ListenerServer:
    """A Listener behind the few AbstractServer methods MockServer forwards."""

    def __init__(self, loop, listener: Listener):
        self._loop = loop
        self._listener = listener
        self._closed = loop.create_future()
        self.sockets = [listener.sock]
        listener.start()

    def close(self):
        self._listener.close()
        if not self._closed.done():
            self._closed.set_result(None)

    async def wait_closed(self):
        pass

    def get_loop(self):
        return self._loop

    def is_serving(self):
        return not self._closed.done()

    async def start_serving(self):
        pass

    async def serve_forever(self):
        await self._closed


def run_mock(host: str, port: int, **defaults) -> int:
    """Serve the mock until SIGTERM/SIGINT (uvloop), logging one JSON line with the address; returns 0."""
    import uvloop

    log = Logger()

    async def main() -> int:
        server = await start_mock(host, port, **defaults)
        addr = server.sockets[0].getsockname()
        log.info("mock listening", host=addr[0], port=addr[1], url=f"http://{addr[0]}:{addr[1]}/v1")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()
        log.info("mock stopped", requests=server.mock_stats.requests)
        return 0

    return uvloop.run(main())
