# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Client and upstream connections: bytes <-> the compiled parsers, policies in phases, one exchange at a time.

Compiled because this glue runs several times per request and per stream chunk: as cdef classes, its state
is a C struct and its calls into the parsers are C calls (uvloop's own handles are cdef classes for the same
reason). It still never touches a socket: it talks to asyncio transports.

Invariants:
- At most one request of a client connection is in flight (`ex`); pipelined requests wait in the parser and
  are parsed in order after the response, so responses go out in request order.
- Every request that got an Exchange ends in `_finish` exactly once: complete/log hooks, metrics, access log.
- Nothing from the upstream reaches the client after a response was cut short; a stream that breaks is ended
  by closing the connection, never with a made-up `[DONE]` or a clean last chunk.
- Timeouts are deadlines checked by the worker's sweeper (`check_deadline`), not a timer per request.
- An UpstreamConnection carries one request at a time and reports to its client through upstream_head,
  upstream_body, upstream_end and upstream_failed.
"""
import asyncio
import re
import socket

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeLatin1
from cpython.exc cimport PyErr_Clear
from libc.stdio cimport snprintf
from libc.string cimport memchr, memcpy, strlen
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec


cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) noexcept

from fastgw.protocol.http cimport RequestParser, ResponseParser
from fastgw.protocol.sse cimport SSERelay
from fastgw.proxy.exchange cimport Exchange, new_exchange
from fastgw.proxy.gateway cimport Gateway
from fastgw.routing.router cimport Route, Router, Target
from fastgw.observability.linebuf cimport LineBuffer
from fastgw.observability.stats cimport RequestStats

from fastgw.protocol import http as H
from fastgw.protocol.jsonpeek import peek_request, peek_usage, splice
from fastgw.errors import GatewayError, reason
from fastgw.protocol.proxyproto import ProxyProtocolError, is_trusted
from fastgw.protocol.proxyproto import parse as parse_proxy_header
from fastgw.routing.router import PROXIED

cdef int _NEED_DATA = H.NEED_DATA, _HEAD = H.HEAD, _BODY = H.BODY, _END = H.END
_frame = H.frame_chunk
cdef bytes _LAST_CHUNK = H.LAST_CHUNK
cdef frozenset _PROXIED = frozenset(PROXIED)
cdef frozenset _LOCAL = frozenset(("/healthz", "/readyz", "/metrics", "/v1/models"))
# Client headers that never reach a provider: its key (the provider key replaces it), our request id (re-added),
# and accept-encoding (a compressed response could not be metered or relayed event by event).
# A tuple, not a set: forward_head walks it once per request, and a tuple walks by index (a set by iterator).
cdef tuple _DROP = (b"authorization", b"api-key", b"x-api-key", b"x-request-id", b"accept-encoding")
cdef bytes _CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
cdef bytes _JSON = b"content-type: application/json\r\n"
cdef bytes _SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                        b"transfer-encoding: chunked\r\n")
cdef bytes _KEEPALIVE_EVENT = _frame(b": keep-alive\n\n")
cdef bytes _INCLUDE_USAGE = b'{"include_usage":true}'
cdef bytes _ADD_INCLUDE_USAGE = b',"stream_options":{"include_usage":true}'
# A non-streamed response body is kept (to read its usage) up to this size; a bigger one is only relayed.
cdef Py_ssize_t _MAX_KEPT = 16 * 1024 * 1024
# A client's x-request-id is kept when it is short and plain; anything else is replaced by ours.
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,128}").fullmatch

# What a client connection waits for; gw.timeouts[wait] is the deadline of that wait.
IDLE, HEAD_WAIT, BODY_WAIT, UPSTREAM_WAIT, STREAMING, WRITING = range(6)
cdef enum:
    C_IDLE, C_HEAD_WAIT, C_BODY_WAIT, C_UPSTREAM_WAIT, C_STREAMING, C_WRITING


cdef inline double now() noexcept:
    """time.perf_counter()'s clock (CLOCK_MONOTONIC), without a Python call."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


def monotonic():
    """The clock of every deadline here (the worker's sweeper passes it to check_deadline)."""
    return now()


cdef bytes _id_and_overhead_lines(bytes request_id, long long overhead_us):
    """b"x-request-id: <id>\\r\\nx-fastgw-overhead-us: <µs>\\r\\n" for every response head, written by hand
    (bytes % formatting cost ~1k instructions per request)."""
    cdef const char* a = b"x-request-id: "
    cdef const char* b = b"\r\nx-fastgw-overhead-us: "
    cdef char digits[24]
    cdef int k = 0
    cdef Py_ssize_t n = len(request_id), i
    cdef unsigned long long v = overhead_us if overhead_us > 0 else 0
    while True:
        digits[k] = <char>(48 + v % 10)
        k += 1
        v //= 10
        if v == 0:
            break
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 14 + n + 24 + k + 2)
    cdef char* o = <char*>out
    memcpy(o, a, 14)
    memcpy(o + 14, <const char*>request_id, n)
    o += 14 + n
    memcpy(o, b, 24)
    o += 24
    for i in range(k):
        o[i] = digits[k - 1 - i]
    o[k] = 13
    o[k + 1] = 10
    return out


cdef class ClientConnection:
    cdef readonly Gateway gw
    cdef readonly object transport
    cdef object transport_write       # transport.write, looked up once: every response and stream event uses it
    cdef readonly RequestParser parser
    cdef readonly str client_addr, peer_addr
    cdef readonly Exchange ex
    cdef UpstreamConnection upstream
    cdef public bint closing
    cdef bint keep_alive, chunked, head_sent, own_head, strip_usage, read_paused, advancing
    cdef int wait, attempts
    cdef Py_ssize_t parts_bytes
    cdef double deadline, next_keepalive
    cdef object proxy_buf, pending_head
    cdef SSERelay relay
    cdef list parts, tried

    def __init__(self, Gateway gw):
        self.gw = gw
        self.parser = RequestParser(gw.max_head, gw.max_headers, gw.max_body)
        self.client_addr = self.peer_addr = ""
        self.keep_alive = True
        self._reset_response()

    cdef void _reset_response(self):
        self.pending_head = None    # response head not written yet (sent with the first body bytes)
        self.head_sent = False
        self.own_head = False       # we sent our own SSE head to keep a slow stream alive
        self.chunked = False
        self.relay = None
        self.parts = None
        self.parts_bytes = 0
        self.next_keepalive = 0.0
        self.strip_usage = False
        self.attempts = 0
        self.tried = None

    # -- connection events --------------------------------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        self.transport_write = transport.write
        cdef Gateway gw = self.gw
        peer = transport.get_extra_info("peername")
        self.peer_addr = self.client_addr = peer[0] if peer else ""
        sock = transport.get_extra_info("socket")
        if sock is not None and gw.tcp_keepalive_idle > 0:
            try:  # probes keep an idle keep-alive connection known to an NLB (350 s idle timeout)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, gw.tcp_keepalive_idle)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 15)
            except OSError:
                pass
        if gw.proxy_protocol:
            if not is_trusted(self.peer_addr, gw.trusted_proxies):
                gw.log.warning("proxy protocol refused", peer=self.peer_addr, reason="untrusted peer")
                self.closing = True
                transport.abort()
                return
            self.proxy_buf = b""
        gw.connections.add(self)
        self._wait(C_HEAD_WAIT if self.proxy_buf is not None else C_IDLE)

    def connection_lost(self, exc):
        self.closing = True
        self.gw.connections.discard(self)
        cdef Exchange ex = self.ex
        if ex is not None:
            up = self.upstream
            if up is not None:       # cancel the upstream request: its connection cannot be reused
                self.upstream = None
                up.abort()
            ex.status = 499          # nginx's convention: the client left before the response was complete
            ex.error = ex.error or "client_disconnected"
            self._finish(ex)

    def data_received(self, data):
        if self.closing:
            return
        if self.proxy_buf is not None:
            data = self._proxy_header(data)
            if not data:
                return
        cdef RequestParser p = self.parser
        p.feed(data)
        if self.ex is not None and self.wait != C_BODY_WAIT:
            # A pipelined request while one is in flight: keep it, but do not let a client pile up bytes.
            if p.buffered > self.gw.max_head + self.gw.max_body and not self.read_paused:
                self.read_paused = True
                self.transport.pause_reading()
            return
        if self.wait == C_IDLE:
            self._wait(C_HEAD_WAIT)
        try:
            self._advance()
        except Exception:
            self._internal_error("request handling failed")

    def pause_writing(self):     # the client reads slower than the upstream sends: slow the upstream down
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.pause_reading()
        self._wait(C_WRITING)

    def resume_writing(self):
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.resume_reading()
        self._wait(C_STREAMING if self.ex is not None else C_IDLE)

    def eof_received(self):
        # The client half-closed: answer what is in flight (keep the transport open), then close.
        self.keep_alive = False
        if self.ex is not None or self.parser.buffered:
            return True
        return None

    cdef object _proxy_header(self, data):
        buf = self.proxy_buf + data
        try:
            consumed, info = parse_proxy_header(buf)
        except ProxyProtocolError as exc:
            self.gw.log.warning("proxy protocol refused", peer=self.peer_addr, reason=str(exc))
            self.closing = True
            self.transport.abort()
            return b""
        if info is None:
            self.proxy_buf = buf
            return b""
        self.proxy_buf = None
        if info.command == "PROXY" and info.src_addr:
            self.client_addr = info.src_addr
        self._wait(C_IDLE)               # the header is in; the connection is now an idle HTTP one
        return buf[consumed:]

    cdef void _internal_error(self, str what):
        """A bug must cost one request, never hang it or leak a stack trace to the client."""
        self.gw.log.exception(what, request_id=self.ex.request_id if self.ex is not None else None)
        if self.ex is not None and not self.head_sent and self.pending_head is None and not self.closing:
            up = self.upstream
            if up is not None:
                self.upstream = None
                up.abort()
            try:
                self._refuse(GatewayError(500, "The gateway failed to process the request."), True)
                return
            except Exception:
                pass
        self.closing = True
        self.transport.abort()

    # -- requests -----------------------------------------------------------------------------------------

    cdef void _advance(self) except *:
        # Re-entered from _finish when a request is answered at once (pipelined /healthz, say): the loop below
        # goes on with the next request instead of recursing once per request.
        if self.advancing:
            return
        self.advancing = True
        cdef RequestParser p = self.parser
        cdef int ev
        try:
            while not self.closing:
                ev = p.next_event()
                if ev == _NEED_DATA:
                    return
                if ev == _HEAD:
                    self._on_head()
                elif ev == _END:
                    self._on_request()
                    if self.ex is not None:      # in flight upstream: _finish resumes parsing
                        return
                else:
                    self._refuse(GatewayError(p.error_status, p.error_message), True)
                    return
        finally:
            self.advancing = False

    cdef void _on_head(self) except *:
        cdef RequestParser p = self.parser
        cdef Gateway gw = self.gw
        cdef bytes target = p.target
        # The path is the target up to '?', as received (latin-1): found with memchr, not bytes.find (a
        # method call with argument parsing).
        cdef const char* t = PyBytes_AS_STRING(target)
        cdef const char* q = <const char*>memchr(t, 63, PyBytes_GET_SIZE(target))
        cdef str path = PyUnicode_DecodeLatin1(t, q - t if q != NULL else PyBytes_GET_SIZE(target), NULL)
        rid = p.header(b"x-request-id")
        rid = rid.decode("ascii") if rid is not None and _REQUEST_ID(rid) else gw.next_request_id()
        cdef Exchange ex = new_exchange(rid, self.client_addr, p.method, path, p, now())
        self.ex = ex
        self.keep_alive = p.keep_alive and not gw.draining
        self._wait(C_BODY_WAIT)
        hooks = gw.access_hooks
        if hooks and path.startswith("/v1/"):
            try:
                for hook in hooks:
                    hook(ex)
            except GatewayError as err:
                # Refused before the body: answer now and close, so the unread body is never parsed as a request.
                self._refuse(err, True)
                return
            except Exception:
                gw.log.exception("policy failed", phase="access", request_id=rid)
                self._refuse(GatewayError(500, "The gateway failed to process the request."), True)
                return
        if p.expect_continue:
            self.transport.write(_CONTINUE)

    cdef void _on_request(self) except *:
        cdef Exchange ex = self.ex
        cdef RequestParser p = self.parser
        ex.body = p.body
        ex.bytes_in = len(ex.body)
        path = ex.path
        method = p.method
        try:
            if path in _PROXIED:
                if method != b"POST":
                    raise GatewayError(405, f"Method {method.decode('latin-1')} is not allowed on {path}; use POST.",
                                       code="method_not_allowed")
                self._proxy(ex)
            elif method != b"GET":
                if path in _LOCAL:
                    raise GatewayError(405, f"Method {method.decode('latin-1')} is not allowed on {path}; use GET.",
                                       code="method_not_allowed")
                raise GatewayError(404, f"Unknown request URL: {method.decode('latin-1')} {path}.",
                                   code="unknown_url")
            else:
                self._local(ex, path)
        except GatewayError as err:
            self._refuse(err, False)
        except Exception:
            self.gw.log.exception("request failed", request_id=ex.request_id)
            self._refuse(GatewayError(500, "The gateway failed to process the request."), False)

    cdef void _local(self, Exchange ex, str path) except *:
        cdef Gateway gw = self.gw
        if path == "/healthz":
            self._respond(200, b'{"status":"ok"}', _JSON, b"")
        elif path == "/readyz":
            if gw.draining:
                self._respond(503, b'{"status":"draining"}', _JSON, b"")
            else:
                self._respond(200, b'{"status":"ready"}', _JSON, b"")
        elif path == "/metrics":
            self._respond(200, gw.stats.render(), b"content-type: text/plain; version=0.0.4; charset=utf-8\r\n", b"")
        elif path == "/v1/models":
            self._respond(200, gw.router.models_body, _JSON, b"")
        else:
            raise GatewayError(404, f"Unknown request URL: GET {path}.", code="unknown_url")

    cdef void _proxy(self, Exchange ex) except *:
        cdef Gateway gw = self.gw
        f = peek_request(ex.body)
        if f is None:
            raise GatewayError(400, "We could not parse the JSON body of your request. The body must be a JSON "
                                    "object.", code="invalid_json")
        model = f.model
        if not model:
            raise GatewayError(400, "You must provide a model parameter.", param="model", code="missing_model")
        cdef Route route = (<Router>gw.router).resolve(model)
        if route is None:
            raise GatewayError(404, f"The model `{model}` does not exist or you do not have access to it.",
                               param="model", code="model_not_found")
        ex.fields = f
        ex.model = model
        ex.stream = f.stream
        ex.client_wants_usage = f.include_usage
        ex.route = route
        hooks = gw.request_hooks
        if hooks:
            for i, hook in enumerate(hooks):
                pending = hook(ex)
                if pending is not None:      # a policy waits on I/O: continue when it is done
                    gw.loop.create_task(self._request_async(ex, pending, hooks[i + 1:]))
                    return
        self._send(ex, route.pick())

    async def _request_async(self, Exchange ex, pending, rest):
        try:
            await pending
            for hook in rest:
                more = hook(ex)
                if more is not None:
                    await more
            if self.ex is ex and not self.closing:
                self._send(ex, ex.route.pick())
        except GatewayError as err:
            if self.ex is ex:
                self._refuse(err, False)
        except Exception:
            self.gw.log.exception("policy failed", phase="request", request_id=ex.request_id)
            if self.ex is ex:
                self._refuse(GatewayError(500, "The gateway failed to process the request."), False)

    # -- upstream -----------------------------------------------------------------------------------------

    cdef void _send(self, Exchange ex, Target target) except *:
        cdef Gateway gw = self.gw
        body = ex.body
        f = ex.fields
        if body is not self.parser.body:     # a policy rewrote the body: offsets must be read again
            f = ex.fields = peek_request(body)
            if f is None:
                raise GatewayError(500, "A policy produced an invalid request body.")
        edits = None
        if target.model:
            edits = [(f.model_start, f.model_end, target.model_json)]
        if ex.stream and gw.needs_usage and not f.include_usage:
            # Accounting needs the stream's usage: ask for it, and hide that extra chunk from this client.
            self.strip_usage = True
            e = ((f.stream_options_start, f.stream_options_end, _INCLUDE_USAGE) if f.stream_options_start >= 0
                 else (f.object_end, f.object_end, _ADD_INCLUDE_USAGE))
            edits = [e] if edits is None else sorted(edits + [e])
        if edits is not None:
            body = splice(body, edits)
        ex.deployment = target
        ex.upstream_name = target.name
        head = self.parser.forward_head(
            target.request_lines[ex.endpoint],
            target.header_lines + b"x-request-id: " + ex.request_id.encode() + b"\r\n",
            len(body), _DROP)
        pool = target.pool                   # cached on the deployment: no Pools lookup per request
        if pool is None:
            pool = target.pool = gw.pools.get(target)
        cdef UpstreamConnection conn = pool.acquire()
        self._wait(C_UPSTREAM_WAIT)
        if ex.stream and gw.keepalive_interval > 0:
            self.next_keepalive = now() + gw.keepalive_interval
        ex.t_sent = now()
        if conn is not None:
            self.upstream = conn
            conn.send(self, head, body)
        else:
            gw.loop.create_task(self._connect_and_send(ex, pool, head, body))

    async def _connect_and_send(self, Exchange ex, Pool pool, bytes head, bytes body):
        try:
            conn = await pool.connect()
        except (OSError, asyncio.TimeoutError) as exc:
            if self.ex is ex:
                self.gw.stats.upstream_error(ex.upstream_name, "connect")
                self.upstream_failed("connect", f"cannot connect to the upstream: {type(exc).__name__}")
            return
        if self.ex is not ex or self.closing:   # the client left meanwhile
            pool.release(conn)
            return
        self.upstream = conn
        ex.t_sent = now()
        conn.send(self, head, body)

    cdef void upstream_head(self, ResponseParser r) except *:
        cdef Exchange ex = self.ex
        cdef double t = now()
        ex.t_first_byte = t
        ex.status = r.status
        cdef Gateway gw = self.gw
        for hook in gw.response_hooks:
            hook(ex)
        if ex.stream and r.status == 200:
            self.relay = SSERelay(self.strip_usage, gw.needs_usage)
            self._wait(C_STREAMING)
        else:
            self.parts = []
        if self.own_head:                   # our SSE head is out already (keep-alive comments were sent)
            self.chunked = True
            if self.relay is None:          # the upstream refused after all: its error becomes an SSE event
                self.parts = []
            return
        # Overhead so far: before the request was sent, plus this head's processing.
        cdef long overhead_us = <long>(((ex.t_sent - ex.t_start) + (now() - t)) * 1e6)
        extra = _id_and_overhead_lines(ex.request_id.encode(), overhead_us)
        if ex.response_headers:
            extra += b"".join(ex.response_headers)
        if not self.keep_alive:
            extra += b"connection: close\r\n"
        if r.content_length >= 0 and self.relay is None:
            self.pending_head = r.forward_head(extra, False, r.content_length)
        else:
            self.chunked = True
            self.pending_head = r.forward_head(extra, True, 0)
            if self.relay is not None:      # the client sees a stream's head at once
                self._write(self.pending_head)
                self.pending_head = None
                self.head_sent = True

    cdef void upstream_body(self, data) except *:
        cdef Exchange ex = self.ex
        cdef SSERelay relay = self.relay
        if relay is not None:
            if relay.events == 0 and self.next_keepalive != 0.0:
                ex.t_first_byte = now()     # time to first token
                self.next_keepalive = 0.0
            data = relay.feed(data)
            if not data:
                return
            out = _frame(data)
            self.deadline = self._upstream_deadline(now() + self.gw.stream_gap_timeout)
        else:
            parts = self.parts
            if parts is not None:
                parts.append(data)
                self.parts_bytes += len(data)
                if self.parts_bytes > _MAX_KEPT and not self.own_head:
                    self.parts = None       # a huge body: relayed, but not kept for its usage
            if self.own_head:
                return                      # rendered as one SSE error event at the end
            out = _frame(data) if self.chunked else data
        if self.pending_head is not None:
            out = self.pending_head + out
            self.pending_head = None
            self.head_sent = True
        self._write(out)

    cdef void upstream_end(self) except *:
        cdef Exchange ex = self.ex
        self.upstream = None
        ex.upstream_wait = now() - ex.t_sent
        cdef SSERelay relay = self.relay
        out = b""
        if relay is not None:
            tail = relay.finish()
            if tail:
                out = _frame(tail)
            out += _LAST_CHUNK
            ex.events = relay.events
            if relay.usage_seen:
                ex.prompt_tokens = relay.prompt_tokens
                ex.completion_tokens = relay.completion_tokens
            elif self.gw.needs_usage:
                _count_streamed(ex, relay)
        else:
            parts = self.parts
            body = b"" if parts is None else parts[0] if len(parts) == 1 else b"".join(parts)
            if self.own_head:
                out = _frame(b"data: " + body.replace(b"\n", b"") + b"\n\n") + _LAST_CHUNK
            else:
                if body and ex.status < 300:
                    ex.prompt_tokens, ex.completion_tokens = peek_usage(body)
                if self.chunked:
                    out = _LAST_CHUNK
        if self.pending_head is not None:
            out = self.pending_head + out
            self.pending_head = None
        if out:
            self._write(out)
        self._finish(ex)

    cdef void upstream_failed(self, str kind, str message) except *:
        cdef Exchange ex = self.ex
        self.upstream = None
        if ex is None:
            return
        cdef Gateway gw = self.gw
        if not self.head_sent and not self.own_head:
            # Nothing reached the client yet: retry a stale keep-alive connection, or try another deployment.
            self.pending_head = None
            self.parts = None
            self.relay = None
            self.chunked = False
            self.attempts += 1
            if kind == "stale" and self.attempts <= 2:
                self._send(ex, ex.deployment)
                return
            if kind == "connect" and ex.route is not None:
                self.tried = (self.tried or []) + [ex.deployment]
                others = [t for t in ex.route.fallbacks(ex.deployment) if t not in self.tried]
                if others:
                    self._send(ex, others[0])
                    return
            if kind != "connect":
                gw.stats.upstream_error(ex.upstream_name, kind)
            self._refuse(GatewayError(504 if kind == "timeout" else 502, f"The upstream failed: {message}.",
                                      type="upstream_error", code="upstream_" + kind), False)
            return
        # The response had started: end it by closing, so the client sees a broken stream, not a clean end.
        gw.stats.upstream_error(ex.upstream_name, kind)
        ex.error = "upstream_" + kind
        self.closing = True
        self.transport.close()
        self._finish(ex)

    # -- responses ----------------------------------------------------------------------------------------

    cdef inline void _write(self, data) except *:
        self.ex.bytes_out += len(data)
        self.transport_write(data)

    cdef void _respond(self, int status, bytes body, bytes content_type, bytes extra) except *:
        cdef Exchange ex = self.ex
        lines = [content_type, b"x-request-id: " + ex.request_id.encode() + b"\r\n"]
        if extra:
            lines.append(extra)
        if not self.keep_alive:
            lines.append(b"connection: close\r\n")
        ex.status = status
        self._write(H.response_head(status, reason(status), lines, len(body)) + body)
        self._finish(ex)

    cdef void _refuse(self, err, bint close) except *:
        cdef Exchange ex = self.ex
        if ex is None:                       # a protocol error before a request existed
            ex = self.ex = new_exchange(self.gw.next_request_id(), self.client_addr, b"", "", None, now())
        if close:
            self.keep_alive = False
        ex.error = err.code or err.type
        if err.status == 429 or err.status == 401 or err.status == 403:
            self.gw.stats.rejected(ex.consumer, ex.model, err.code or str(err.status))
        extra = b"".join([f"{k}: {v}\r\n".encode("latin-1") for k, v in err.headers]) + b"".join(ex.response_headers)
        self._respond(err.status, err.body(), _JSON, extra)

    cdef void _finish(self, Exchange ex) except *:
        """The request is over: account, log, and move on to the next request or close."""
        cdef Gateway gw = self.gw
        ex.t_end = now()
        if ex.t_sent and not ex.upstream_wait:
            ex.upstream_wait = ex.t_end - ex.t_sent
        for hook in gw.complete_hooks:
            try:
                pending = hook(ex)
                if pending is not None:
                    gw.loop.create_task(pending)
            except Exception:
                gw.log.exception("policy failed", phase="complete", request_id=ex.request_id)
        _record(gw, ex)
        ex._parser = None
        self.ex = None
        self.upstream = None
        self._reset_response()
        if self.closing:
            return
        if not self.keep_alive or gw.draining:
            self.closing = True
            self.transport.close()
            return
        cdef RequestParser p = self.parser
        p.start_next()
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        self._wait(C_IDLE)
        if p.buffered:
            self._wait(C_HEAD_WAIT)
            self._advance()

    # -- deadlines ----------------------------------------------------------------------------------------

    cdef inline void _wait(self, int what) except *:
        self.wait = what
        self.deadline = now() + self.gw.timeouts[what]
        if what == C_UPSTREAM_WAIT or what == C_STREAMING:
            self.deadline = self._upstream_deadline(self.deadline)

    cdef inline double _upstream_deadline(self, double d) noexcept:
        """No upstream wait outlives the request's total timeout."""
        cdef double total = self.ex.t_start + self.gw.total_timeout if self.ex is not None else d
        return d if d < total else total

    def check_deadline(self, double t):
        """Called by the worker's sweeper (clock: monotonic()) about every second, or more often when
        keep-alive comments are due."""
        if self.next_keepalive != 0.0 and t >= self.next_keepalive and self.ex is not None:
            self._send_keepalive(t)
        if t < self.deadline or self.closing:
            return
        cdef int wait = self.wait
        if wait == C_IDLE:
            self.closing = True
            self.transport.close()
        elif wait == C_HEAD_WAIT or wait == C_BODY_WAIT:
            # No HTTP yet (or only part of a PROXY header): nothing to answer, just close.
            if self.proxy_buf is not None or (self.ex is None and not self.parser.buffered):
                self.closing = True
                self.transport.close()
            else:
                self._refuse(GatewayError(408, "The request was not received in time.", code="request_timeout"),
                             True)
        elif wait == C_UPSTREAM_WAIT or wait == C_STREAMING:
            up = self.upstream
            self.upstream = None
            if up is not None:
                up.abort()
            self.upstream_failed("timeout", "no response from the upstream in time")
        else:                                # C_WRITING: the client stopped reading
            self.closing = True
            if self.upstream is not None:
                self.upstream.abort()
                self.upstream = None
            self.transport.abort()

    def close_if_idle(self):
        """Draining: close a keep-alive connection that has nothing in flight. True if it was closed."""
        if self.ex is None and not self.parser.buffered and not self.closing:
            self.closing = True
            self.transport.close()
            return True
        return False

    cdef void _send_keepalive(self, double t) except *:
        cdef Gateway gw = self.gw
        self.next_keepalive = t + gw.keepalive_interval
        if self.relay is not None and self.relay.events:
            self.next_keepalive = 0.0        # tokens are flowing: no more comments
            return
        if not self.head_sent and self.pending_head is None and self.relay is None:
            # No upstream head yet: commit to a 200 SSE stream so the connection is not idle.
            head = _SSE_HEAD + b"x-request-id: " + self.ex.request_id.encode() + b"\r\n"
            if not self.keep_alive:
                head += b"connection: close\r\n"
            self._write(head + b"\r\n")
            self.head_sent = self.own_head = True
        elif self.pending_head is not None:
            self._write(self.pending_head)
            self.pending_head = None
            self.head_sent = True
        self._write(_KEEPALIVE_EVENT)


cdef void _record(Gateway gw, Exchange ex) except *:
    """Metrics and the access-log line of a finished request (its response bytes are already written)."""
    cdef double latency = ex.t_end - ex.t_start
    cdef double ttft = ex.t_first_byte - ex.t_sent if ex.t_first_byte != 0.0 and ex.t_sent != 0.0 else -1.0
    cdef double overhead = latency - ex.upstream_wait
    if overhead < 0.0:
        overhead = 0.0
    cdef Route route = ex.route
    cdef RequestStats stats = gw.stats
    cdef LineBuffer al = gw.access_log
    if route is not None or ex.model:
        # Labels come from the config (route name, deployment address), never from the client.
        stats.add(route.name if route is not None else "", ex.upstream_name, ex.consumer, ex.status,
                  latency, ttft, overhead, ex.prompt_tokens if ex.prompt_tokens > 0 else 0,
                  ex.completion_tokens if ex.completion_tokens > 0 else 0, ex.cost)
    if not al.enabled:
        return
    cdef object ttfb = _ms(ttft) if ttft >= 0.0 else None
    if not gw.log_hooks:
        # The common case, formatted in C: the same JSON a dict would give, without building one.
        al.write_line(_access_line(ex, latency, ttft, overhead))
        return
    rec = {
        "ts": _wallclock(), "request_id": ex.request_id, "client": ex.client_addr,
        "method": ex.method.decode("latin-1"), "path": ex.path, "model": ex.model,
        "consumer": ex.consumer, "upstream": ex.upstream_name, "status": ex.status,
        "stream": ex.stream, "latency_ms": _ms(latency), "ttfb_ms": ttfb,
        "overhead_us": <long>(overhead * 1e6), "prompt_tokens": ex.prompt_tokens,
        "completion_tokens": ex.completion_tokens, "cost_usd": ex.cost,
        "bytes_in": ex.bytes_in, "bytes_out": ex.bytes_out, "error": ex.error or None,
    }
    for hook in gw.log_hooks:
        try:
            hook(ex, rec)
        except Exception:
            gw.log.exception("policy failed", phase="log", request_id=ex.request_id)
    al.write(rec)


# -- the access-log line, formatted into one C buffer (the event loop is single-threaded) ----------------------

DEF LINE_CAP = 65536          # > 7 string fields * FIELD_CAP * 6 (worst escaping) + the numbers
DEF FIELD_CAP = 1024          # longer strings (an absurd path, say) are cut: the line stays bounded
cdef char _line[LINE_CAP]
cdef Py_ssize_t _n


cdef inline void _put(const char* s, Py_ssize_t n) noexcept:
    global _n
    if _n + n < LINE_CAP:
        memcpy(_line + _n, s, n)
        _n += n


cdef inline void _puts(const char* s) noexcept:
    _put(s, strlen(s))


cdef void _put_str(str value) noexcept:
    """A JSON string: quotes, backslashes and control characters escaped, UTF-8 kept."""
    global _n
    cdef Py_ssize_t size = 0, i
    cdef const char* s = PyUnicode_AsUTF8AndSize(value, &size) if value is not None else NULL
    cdef unsigned char c
    if s == NULL:
        PyErr_Clear()
        _puts("null")
        return
    if size > FIELD_CAP:
        size = FIELD_CAP
        while size > 0 and (<unsigned char>s[size] & 0xC0) == 0x80:   # cut on a character boundary
            size -= 1
    _puts('"')
    for i in range(size):
        c = <unsigned char>s[i]
        if _n + 7 >= LINE_CAP:
            break
        if c == 34 or c == 92:
            _line[_n] = 92
            _line[_n + 1] = c
            _n += 2
        elif c < 32:
            _n += snprintf(_line + _n, 7, "\\u%04x", c)
        else:
            _line[_n] = c
            _n += 1
    _puts('"')


cdef void _put_int(long long v) noexcept:
    """Decimal digits of v (printf's number formatting costs far more than this loop)."""
    cdef char tmp[24]
    cdef int i = 24
    cdef unsigned long long u = <unsigned long long>(-v) if v < 0 else <unsigned long long>v
    while True:
        i -= 1
        tmp[i] = 48 + <char>(u % 10)
        u //= 10
        if u == 0:
            break
    if v < 0:
        i -= 1
        tmp[i] = 45
    _put(tmp + i, 24 - i)


cdef void _put_fixed(long long scaled, int decimals) noexcept:
    """scaled / 10**decimals as a JSON number with exactly `decimals` digits after the point."""
    cdef long long unit = 1
    cdef int i
    cdef char frac[18]
    for i in range(decimals):
        unit *= 10
    if scaled < 0:
        _puts("-")
        scaled = -scaled
    _put_int(scaled // unit)
    cdef long long f = scaled % unit
    for i in range(decimals - 1, -1, -1):
        frac[i] = 48 + <char>(f % 10)
        f //= 10
    _puts(".")
    _put(frac, decimals)


cdef inline long long _scaled(double v, double by) noexcept:
    return <long long>(v * by + (0.5 if v >= 0 else -0.5))


def id_and_overhead_lines(bytes request_id, long long overhead_us):
    """_id_and_overhead_lines for tests."""
    return _id_and_overhead_lines(request_id, overhead_us)


def format_access_line(Exchange ex, double latency, double ttft, double overhead):
    """The access-log line of `ex` (ttft < 0: none); for tests against the dict + orjson reference."""
    return _access_line(ex, latency, ttft, overhead)


cdef bytes _access_line(Exchange ex, double latency, double ttft, double overhead):
    global _n
    _n = 0
    _puts('{"ts":')
    _put_fixed(_wallclock_us(), 6)
    _puts(',"request_id":')
    _put_str(ex.request_id)
    _puts(',"client":')
    _put_str(ex.client_addr)
    _puts(',"method":')
    _put_str(ex.method.decode("latin-1"))
    _puts(',"path":')
    _put_str(ex.path)
    _puts(',"model":')
    _put_str(ex.model)
    _puts(',"consumer":')
    _put_str(ex.consumer)
    _puts(',"upstream":')
    _put_str(ex.upstream_name)
    _puts(',"status":')
    _put_int(ex.status)
    _puts(',"stream":true' if ex.stream else ',"stream":false')
    _puts(',"latency_ms":')
    _put_fixed(_scaled(latency, 1e6), 3)
    if ttft >= 0.0:
        _puts(',"ttfb_ms":')
        _put_fixed(_scaled(ttft, 1e6), 3)
    else:
        _puts(',"ttfb_ms":null')
    _puts(',"overhead_us":')
    _put_int(<long long>(overhead * 1e6))
    _puts(',"prompt_tokens":')
    _put_int(ex.prompt_tokens)
    _puts(',"completion_tokens":')
    _put_int(ex.completion_tokens)
    _puts(',"cost_usd":')
    _put_fixed(_scaled(ex.cost, 1e9), 9)
    _puts(',"bytes_in":')
    _put_int(ex.bytes_in)
    _puts(',"bytes_out":')
    _put_int(ex.bytes_out)
    if ex.error:
        _puts(',"error":')
        _put_str(ex.error)
        _puts("}\n")
    else:
        _puts(',"error":null}\n')
    return PyBytes_FromStringAndSize(_line, _n)


cdef inline double _ms(double seconds) noexcept:
    """Milliseconds rounded to the microsecond, in C (Python's round() costs a microsecond)."""
    return (<long long>(seconds * 1e6 + 0.5)) / 1e3


cdef inline double _wallclock() noexcept:
    return _wallclock_us() * 1e-6


cdef inline long long _wallclock_us() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <long long>ts.tv_sec * 1000000 + ts.tv_nsec // 1000


cdef void _count_streamed(Exchange ex, SSERelay relay) except *:
    """No usage in the stream: count what streamed exactly, so limits and budgets still hold."""
    from fastgw.tokens.exact import count_text, encoding_for_model

    ex.completion_tokens = count_text(relay.text(), encoding_for_model(ex.model))
    ex.prompt_tokens = ex.prompt_tokens_estimate


# -- upstream side --------------------------------------------------------------------------------------------

cdef class UpstreamConnection:
    cdef readonly Pool pool
    cdef readonly object transport
    cdef ResponseParser parser
    cdef ClientConnection client       # waiting on this response, or None when idle
    cdef bint reused                   # a kept-alive connection (may have been closed by the peer meanwhile)
    cdef bint got_bytes
    cdef readonly bint closed

    def __init__(self, Pool pool):
        self.pool = pool
        self.parser = ResponseParser()

    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    cpdef send(self, ClientConnection client, bytes head, bytes body):
        self.client = client
        self.got_bytes = False
        self.parser.start(False)
        self.transport.writelines((head, body))    # one writev, no 5 KB concatenation

    def data_received(self, data):
        cdef ClientConnection client = self.client
        if client is None:          # bytes nobody asked for: the connection is not trustworthy any more
            self.abort()
            return
        self.got_bytes = True
        try:
            self._advance(client, data)
        except Exception:
            # A bug must cost one request, not hang it: log, drop the connection, tell the client.
            client.gw.log.exception("upstream response handling failed")
            if self.client is client:
                self.abort()
                client.upstream_failed("internal", "the gateway failed to relay the response")

    cdef void _advance(self, ClientConnection client, data) except *:
        cdef ResponseParser p = self.parser
        cdef int ev
        p.feed(data)
        while True:
            ev = p.next_event()
            if ev == _BODY:
                client.upstream_body(p.take_body())
            elif ev == _NEED_DATA:
                return
            elif ev == _HEAD:
                client.upstream_head(p)
            elif ev == _END:
                self.client = None
                # Back to the pool before the client continues, which may want a connection at once.
                if p.keep_alive and not self.closed:
                    self.reused = True
                    self.pool.release(self)
                else:
                    self.close()
                client.upstream_end()
                return
            else:
                self.client = None
                self.abort()
                client.upstream_failed("protocol", "the upstream sent an invalid response: " + p.error_message)
                return
            if self.client is None:  # the client went away during a callback
                return

    def eof_received(self):
        return None

    def connection_lost(self, exc):
        self.closed = True
        self.pool.forget(self)
        cdef ClientConnection client = self.client
        if client is None:
            return
        self.client = None
        cdef ResponseParser p = self.parser
        p.feed_eof()
        ev = p.next_event()
        while ev == _BODY:
            client.upstream_body(p.take_body())
            ev = p.next_event()
        if ev == _END:
            client.upstream_end()
        elif self.reused and not self.got_bytes:
            client.upstream_failed("stale", "the kept-alive upstream connection was closed")
        else:
            client.upstream_failed("reset", "the upstream closed the connection before the response was complete")

    def pause_writing(self):     # requests are small: nothing to slow down
        pass

    def resume_writing(self):
        pass

    cpdef abort(self):
        """Drop the connection at once (cancel what is in flight); never reused."""
        self.client = None
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            self.transport.abort()

    cpdef close(self):
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            self.transport.close()


cdef class Pool:
    """Idle keep-alive connections to one upstream address, in one worker."""
    cdef readonly object loop, host, server_hostname, ssl
    cdef readonly int port, max_idle
    cdef readonly bint tls
    cdef readonly double connect_timeout
    cdef readonly list idle

    def __init__(self, loop, target, int max_idle, double connect_timeout):
        self.loop = loop
        self.host, self.port, self.tls, self.ssl = target.host, target.port, target.tls, target.ssl
        self.server_hostname = target.server_hostname
        self.idle = []
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout

    cpdef UpstreamConnection acquire(self):
        cdef UpstreamConnection conn
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def connect(self):
        _, conn = await asyncio.wait_for(
            self.loop.create_connection(
                lambda: UpstreamConnection(self), self.host, self.port,
                ssl=self.ssl, server_hostname=self.server_hostname),
            self.connect_timeout)
        return conn

    cpdef release(self, UpstreamConnection conn):
        if len(self.idle) < self.max_idle:
            self.idle.append(conn)
        else:
            conn.close()

    cpdef forget(self, UpstreamConnection conn):
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def close(self):
        for conn in list(self.idle):
            conn.close()
        self.idle.clear()


class Pools:
    """All pools of a worker, kept across config reloads (keyed by address, not by config object)."""

    def __init__(self, loop, upstream_cfg):
        self.loop = loop
        self.cfg = upstream_cfg
        self.pools = {}

    def get(self, target):
        pool = self.pools.get(target.pool_key)
        if pool is None:
            pool = self.pools[target.pool_key] = Pool(
                self.loop, target, self.cfg.max_idle_per_upstream, self.cfg.connect_timeout)
        return pool

    def close(self):
        for pool in self.pools.values():
            pool.close()
