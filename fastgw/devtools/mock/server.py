"""Built-in mock OpenAI upstream: the demo default of `fastgw serve`, `fastgw mock`, and the perf upstream.

An asyncio Protocol on uvloop, HTTP parsed by fastgw.protocol.http.RequestParser, keep-alive and pipelining.
Responses are rendered once per (endpoint, model, stream, chunks, usage mode) into byte templates, so a
request costs a parse, an orjson.loads of the body and one bytes %-format.

Endpoints (OpenAI shapes): POST /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses (each
streamed or not where OpenAI allows), GET /v1/models, GET /health. Unknown path 404, bad JSON 400, both in
OpenAI's error shape. prompt_tokens is a cheap deterministic estimate: len(request body) // 4;
completion_tokens is the number of content pieces. Stream usage follows OpenAI: a final `"choices": []` chunk
with usage only when stream_options.include_usage is true, and then every chunk carries "usage": null.

Fault injection by request header (the gateway forwards client headers, so tests drive it end to end):
  x-mock-status: N                 answer N with an OpenAI error body
  x-mock-delay-ms: N               wait before the response head
  x-mock-first-token-delay-ms: N   stream: head at once, the first event after N ms
  x-mock-chunk-delay-ms: N         stream: N ms between events
  x-mock-chunks: N                 N content pieces (default 14)
  x-mock-reset-after: N            stream: abort the TCP connection after N events (no [DONE])
  x-mock-no-usage: 1               never send usage
  x-mock-close: 1                  answer with Connection: close and close
  x-mock-echo-headers: 1           non-stream: the request headers as a JSON object in the content
Defaults for the delays and chunk count can be given to start_mock(**defaults): delay_ms,
first_token_delay_ms, chunk_delay_ms, chunks.
"""
from __future__ import annotations

import asyncio
import base64
import itertools
import signal
import struct
import time

import orjson

from fastgw.protocol.http import END, ERROR, HEAD, NEED_DATA, RequestParser
from fastgw.observability.logs import Logger

__all__ = ["start_mock", "run_mock", "MockServer", "MockStats"]

MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "o4-mini", "text-embedding-3-small")
PIECES = ("Hello", "!", " This", " is", " the", " fastgw", " mock", " upstream", " answering", " your",
          " request", " with", " canned", " tokens", ".")
EMBEDDING_DIM = 8
_CACHE_MAX = 1024
# Sentinels rendered into templates then replaced by %d placeholders (no JSON value can collide: we choose
# every number in the templates).
_P, _T = -7777771, -7777772

REASONS = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
           405: b"Method Not Allowed", 408: b"Request Timeout", 409: b"Conflict", 413: b"Payload Too Large",
           417: b"Expectation Failed", 422: b"Unprocessable Entity", 429: b"Too Many Requests",
           431: b"Request Header Fields Too Large", 500: b"Internal Server Error", 501: b"Not Implemented",
           502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout",
           505: b"HTTP Version Not Supported"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 429: "rate_limit_error"}


class MockStats:
    """Per-server counters, so tests can check that the gateway does not leak upstream connections."""

    __slots__ = ("open_connections", "connections_total", "requests", "active_requests", "resets")

    def __init__(self):
        self.open_connections = 0
        self.connections_total = 0
        self.requests = 0
        self.active_requests = 0  # requests whose response is still being written (delays, streams)
        self.resets = 0           # connections aborted by x-mock-reset-after


class MockServer(asyncio.AbstractServer):
    """The listening server (uvloop's, which takes no attributes) plus `mock_stats` and `port`."""

    def __init__(self, server, stats: MockStats):
        self._server = server
        self.mock_stats = stats

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


# -- rendering -----------------------------------------------------------------------------------------

def _tmpl(data: bytes) -> bytes:
    """`data` with the usage sentinels turned into %-placeholders (and every other % escaped)."""
    return (data.replace(b"%", b"%%")
            .replace(str(_P).encode(), b"%(p)d").replace(str(_T).encode(), b"%(t)d"))


def _template(obj) -> bytes:
    return _tmpl(orjson.dumps(obj))


def _frame(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _sse(obj, event: str | None = None) -> bytes:
    data = b"data: " + orjson.dumps(obj) + b"\n\n"
    return (b"event: " + event.encode() + b"\n" + data) if event else data


class _Canned:
    """A rendered response: `body` (non-stream, a %-template) or `events` (stream: framed SSE events,
    the last ones possibly %-templates), rendered by render(prompt_tokens)."""

    __slots__ = ("body", "events", "templated")

    def __init__(self, body: bytes | None = None, events: list | None = None, templated=()):
        self.body = body
        self.events = events
        self.templated = frozenset(templated)  # indexes of events holding placeholders


def _usage_chat(n: int):
    return {"prompt_tokens": _P, "completion_tokens": n, "total_tokens": _T,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}


def _pieces(n: int, content: str | None = None) -> list[str]:
    if content is not None:
        return [content]
    return [PIECES[i % len(PIECES)] for i in range(n)]


def _render_chat(model: str, stream: bool, n: int, usage_mode: int, content: str | None = None) -> _Canned:
    """usage_mode: 0 = never, 1 = non-stream usage / stream without include_usage, 2 = stream with usage."""
    created = int(time.time())
    rid = f"chatcmpl-mock{created:x}"
    pieces = _pieces(n, content)
    if not stream:
        obj = {"id": rid, "object": "chat.completion", "created": created, "model": model,
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces),
                                                     "refusal": None, "annotations": []},
                            "logprobs": None, "finish_reason": "stop"}],
               "service_tier": "default", "system_fingerprint": "fp_mock"}
        if usage_mode:
            obj["usage"] = _usage_chat(n)
        return _Canned(body=_template(obj))
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "service_tier": "default", "system_fingerprint": "fp_mock"}

    def chunk(delta, finish=None):
        c = dict(base, choices=[{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])
        if usage_mode == 2:
            c["usage"] = None
        return _frame(_sse(c))

    events = [chunk({"role": "assistant", "content": "", "refusal": None})]
    events += [chunk({"content": p}) for p in pieces]
    events.append(chunk({}, "stop"))
    templated = ()
    if usage_mode == 2:
        events.append(_tmpl(_sse(dict(base, choices=[], usage=_usage_chat(n)))))  # framed at render time
        templated = (len(events) - 1,)
    events.append(_frame(b"data: [DONE]\n\n"))
    return _Canned(events=events, templated=templated)


def _render_completion(model: str, stream: bool, n: int, usage_mode: int,
                       content: str | None = None) -> _Canned:
    created = int(time.time())
    rid = f"cmpl-mock{created:x}"
    pieces = _pieces(n, content)
    usage = {"prompt_tokens": _P, "completion_tokens": n, "total_tokens": _T}
    if not stream:
        obj = {"id": rid, "object": "text_completion", "created": created, "model": model,
               "choices": [{"text": "".join(pieces), "index": 0, "logprobs": None, "finish_reason": "stop"}],
               "system_fingerprint": "fp_mock"}
        if usage_mode:
            obj["usage"] = usage
        return _Canned(body=_template(obj))
    base = {"id": rid, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": "fp_mock"}

    def chunk(text, finish=None):
        c = dict(base, choices=[{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}])
        if usage_mode == 2:
            c["usage"] = None
        return _frame(_sse(c))

    events = [chunk(p) for p in pieces] + [chunk("", "stop")]
    templated = ()
    if usage_mode == 2:
        events.append(_tmpl(_sse(dict(base, choices=[], usage=usage))))
        templated = (len(events) - 1,)
    events.append(_frame(b"data: [DONE]\n\n"))
    return _Canned(events=events, templated=templated)


def _render_responses(model: str, stream: bool, n: int, usage_mode: int,
                      content: str | None = None) -> _Canned:
    created = int(time.time())
    rid, mid = f"resp_mock{created:x}", f"msg_mock{created:x}"
    pieces = _pieces(n, content)
    text = "".join(pieces)
    usage = ({"input_tokens": _P, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": n,
              "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": _T} if usage_mode else None)
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    item = {"id": mid, "type": "message", "status": "completed", "role": "assistant", "content": [part]}

    def response(status, output, usage_):
        return {"id": rid, "object": "response", "created_at": created, "status": status, "error": None,
                "incomplete_details": None, "instructions": None, "max_output_tokens": None, "model": model,
                "output": output, "parallel_tool_calls": True, "previous_response_id": None,
                "reasoning": {"effort": None, "summary": None}, "store": False, "temperature": 1.0,
                "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [], "top_p": 1.0,
                "truncation": "disabled", "usage": usage_, "user": None, "metadata": {}}

    if not stream:
        return _Canned(body=_template(response("completed", [item], usage)))
    seq = itertools.count()

    def ev(kind, **fields):
        return _sse(dict(type=kind, sequence_number=next(seq), **fields), kind)

    events = [
        _frame(ev("response.created", response=response("in_progress", [], None))),
        _frame(ev("response.in_progress", response=response("in_progress", [], None))),
        _frame(ev("response.output_item.added", output_index=0,
                  item=dict(item, status="in_progress", content=[]))),
        _frame(ev("response.content_part.added", item_id=mid, output_index=0, content_index=0,
                  part=dict(part, text=""))),
    ]
    events += [_frame(ev("response.output_text.delta", item_id=mid, output_index=0, content_index=0, delta=p,
                         logprobs=[])) for p in pieces]
    events += [
        _frame(ev("response.output_text.done", item_id=mid, output_index=0, content_index=0, text=text,
                  logprobs=[])),
        _frame(ev("response.content_part.done", item_id=mid, output_index=0, content_index=0, part=part)),
        _frame(ev("response.output_item.done", output_index=0, item=item)),
    ]
    events.append(_tmpl(ev("response.completed", response=response("completed", [item], usage))))
    return _Canned(events=events, templated=(len(events) - 1,))  # framed at render time


_RENDERERS = {b"/v1/chat/completions": _render_chat, b"/v1/completions": _render_completion,
              b"/v1/responses": _render_responses}
_cache: dict[tuple, _Canned] = {}


def _canned(path: bytes, model: str, stream: bool, n: int, usage_mode: int) -> _Canned:
    key = (path, model, stream, n, usage_mode)
    c = _cache.get(key)
    if c is None:
        if len(_cache) >= _CACHE_MAX:
            _cache.clear()
        c = _cache[key] = _RENDERERS[path](model, stream, n, usage_mode)
    return c


def _fill(template: bytes, prompt: int, n: int) -> bytes:
    return template % {b"p": prompt, b"t": prompt + n}


def _error_body(status: int, message: str, code: str | None = None) -> bytes:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})


def _embedding(i: int, fmt: str):
    vec = [round(((i * 7 + k * 3) % 17 - 8) / 8.0, 6) for k in range(EMBEDDING_DIM)]
    if fmt == "base64":
        return base64.b64encode(struct.pack(f"<{EMBEDDING_DIM}f", *vec)).decode()
    return vec


def _count_inputs(inp) -> int:
    if isinstance(inp, str):
        return 1
    if isinstance(inp, list) and inp:
        if all(isinstance(x, int) for x in inp):
            return 1  # one tokenised input
        if all(isinstance(x, (str, list)) for x in inp):
            return len(inp)
    return 0


def _int_header(faults: dict, name: bytes, default: int) -> int:
    v = faults.get(name)
    if v is None:
        return default
    try:
        return int(v)
    except ValueError:
        return default


# -- the protocol --------------------------------------------------------------------------------------

_HEAD_JSON = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n"
_HEAD_SSE = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\n"
             b"transfer-encoding: chunked\r\n%s\r\n")
_CLOSE = b"connection: close\r\n"
_LAST = b"0\r\n\r\n"


class _MockConnection(asyncio.Protocol):
    def __init__(self, stats: MockStats, defaults: dict):
        self.stats = stats
        self.defaults = defaults
        self.parser = RequestParser()
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
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                continue
            if ev == ERROR:
                body = _error_body(p.error_status or 400, p.error_message or "bad request")
                self._send_json(p.error_status or 400, body, close=True)
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

    def _send_json(self, status: int, body: bytes, close: bool = False):
        self.transport.write(_HEAD_JSON % (status, REASONS.get(status, b"Unknown"), len(body),
                                           _CLOSE if close else b"") + body)
        if close:
            self.transport.close()

    # Returns True when the response was written synchronously, False when a task is writing it.
    def _handle(self, p) -> bool:
        target = p.target
        q = target.find(b"?")
        path = target if q < 0 else target[:q]
        method = p.method
        headers = p.headers()
        faults = {n: v for n, v in headers if n.startswith(b"x-mock-")} if headers else {}
        close = not p.keep_alive or faults.get(b"x-mock-close") == b"1"
        defaults = self.defaults

        status = _int_header(faults, b"x-mock-status", 0)
        delay = _int_header(faults, b"x-mock-delay-ms", defaults.get("delay_ms", 0))
        if status >= 400:
            body = _error_body(status, f"mock error {status} (x-mock-status)", "mock_error")
            return self._respond_json(status, body, close, delay)

        if path in _RENDERERS or path == b"/v1/embeddings":
            if method != b"POST":
                return self._respond_json(405, _error_body(405, f"Method {method.decode()} not allowed"),
                                          close, delay)
            try:
                req = orjson.loads(p.body)
            except orjson.JSONDecodeError:
                req = None
            if not isinstance(req, dict):
                return self._respond_json(
                    400, _error_body(400, "We could not parse the JSON body of your request.", "invalid_json"),
                    close, delay)
            model = req.get("model")
            if not isinstance(model, str) or not model:
                return self._respond_json(
                    400, _error_body(400, "you must provide a model parameter", "missing_model"), close, delay)
            prompt = len(p.body) // 4
            no_usage = faults.get(b"x-mock-no-usage") == b"1"
            if path == b"/v1/embeddings":
                return self._embeddings(req, model, prompt, no_usage, close, delay)
            stream = req.get("stream") is True
            n = max(0, _int_header(faults, b"x-mock-chunks", defaults.get("chunks", 14)))
            if no_usage:
                usage_mode = 0
            elif stream and path != b"/v1/responses":
                opts = req.get("stream_options")
                usage_mode = 2 if isinstance(opts, dict) and opts.get("include_usage") is True else 1
            else:
                usage_mode = 1
            if not stream:
                if faults.get(b"x-mock-echo-headers") == b"1":
                    echoed = {}
                    for name, value in headers:
                        name_s = name.decode("latin-1")
                        v = value.decode("latin-1")
                        echoed[name_s] = f"{echoed[name_s]}, {v}" if name_s in echoed else v
                    canned = _RENDERERS[path](model, False, 1, usage_mode, orjson.dumps(echoed).decode())
                    return self._respond_json(200, _fill(canned.body, prompt, 1), close, delay)
                canned = _canned(path, model, False, n, usage_mode)
                return self._respond_json(200, _fill(canned.body, prompt, n), close, delay)
            canned = _canned(path, model, True, n, usage_mode)
            events = canned.events
            if canned.templated:
                events = list(events)
                for i in canned.templated:
                    events[i] = _frame(_fill(events[i], prompt, n))
            reset_after = _int_header(faults, b"x-mock-reset-after", -1)
            first = _int_header(faults, b"x-mock-first-token-delay-ms", defaults.get("first_token_delay_ms", 0))
            gap = _int_header(faults, b"x-mock-chunk-delay-ms", defaults.get("chunk_delay_ms", 0))
            head = _HEAD_SSE % (_CLOSE if close else b"")
            if delay <= 0 and first <= 0 and gap <= 0:
                if 0 <= reset_after < len(events):
                    self.transport.write(head + b"".join(events[:reset_after]))
                    self._reset()
                    return True
                self.transport.write(head + b"".join(events) + _LAST)
                if close:
                    self.transport.close()
                return True
            self._start(self._stream(head, events, delay, first, gap, reset_after, close))
            return False

        if path == b"/v1/models" and method == b"GET":
            return self._respond_json(200, _models_body(), close, delay)
        if path.startswith(b"/v1/models/") and method == b"GET":
            mid = path[len(b"/v1/models/"):].decode("latin-1")
            body = orjson.dumps({"id": mid, "object": "model", "created": 1700000000, "owned_by": "fastgw-mock"})
            return self._respond_json(200, body, close, delay)
        if path == b"/health" and method == b"GET":
            return self._respond_json(200, b'{"status":"ok"}', close, delay)
        return self._respond_json(
            404, _error_body(404, f"Invalid URL ({method.decode()} {path.decode('latin-1')})", "unknown_url"),
            close, delay)

    def _embeddings(self, req, model, prompt, no_usage, close, delay) -> bool:
        count = _count_inputs(req.get("input"))
        if count == 0:
            return self._respond_json(400, _error_body(400, "'input' must be a non-empty string or array",
                                                       "invalid_input"), close, delay)
        fmt = "base64" if req.get("encoding_format") == "base64" else "float"
        obj = {"object": "list", "model": model,
               "data": [{"object": "embedding", "index": i, "embedding": _embedding(i, fmt)} for i in range(count)]}
        if not no_usage:
            obj["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt}
        return self._respond_json(200, orjson.dumps(obj), close, delay)

    def _respond_json(self, status: int, body: bytes, close: bool, delay_ms: int) -> bool:
        if delay_ms <= 0:
            self._send_json(status, body, close)
            return True
        self._start(self._delayed_json(status, body, close, delay_ms))
        return False

    def _start(self, coro):
        self.busy = True
        self.stats.active_requests += 1
        self.task = asyncio.get_running_loop().create_task(coro)

    def _reset(self):
        self.stats.resets += 1
        self.transport.abort()

    async def _delayed_json(self, status, body, close, delay_ms):
        try:
            await asyncio.sleep(delay_ms / 1000)
            if not self.closed:
                self._send_json(status, body, close)
        finally:
            self._finish_async()

    async def _stream(self, head, events, delay_ms, first_ms, gap_ms, reset_after, close):
        write = self.transport.write
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
                write(event)
            write(_LAST)
            if close:
                self.transport.close()
        finally:
            self._finish_async()


_models_cache: list[bytes] = []


def _models_body() -> bytes:
    if not _models_cache:
        _models_cache.append(orjson.dumps({"object": "list", "data": [
            {"id": m, "object": "model", "created": 1700000000, "owned_by": "fastgw-mock"} for m in MODELS]}))
    return _models_cache[0]


# -- entry points --------------------------------------------------------------------------------------

async def start_mock(host: str, port: int, *, ssl=None, **defaults) -> MockServer:
    """Listen on host:port (0 = an ephemeral port: read it from `server.port`) on the running loop.

    `defaults`: delay_ms, first_token_delay_ms, chunk_delay_ms, chunks (request headers override them).
    `ssl`: an ssl.SSLContext to serve HTTPS (tests of https upstreams).
    The returned server has `mock_stats` (a MockStats) and the usual AbstractServer methods.
    """
    stats = MockStats()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _MockConnection(stats, defaults), host, port,
                                      reuse_address=True, backlog=2048, ssl=ssl)
    return MockServer(server, stats)


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
