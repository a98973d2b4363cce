# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""A client connection: bytes in -> requests -> answers out, one exchange at a time, with deadlines.

Compiled because this glue runs several times per request: as a cdef class its state is a C struct and its
calls into the parser and the relay are C calls (uvloop's own handles are cdef classes for the same reason).
It never touches a socket: it talks to an asyncio transport.

Invariants:
- At most one request of a connection is in flight (`ex`); pipelined requests wait in the parser and are parsed
  in order after the response, so responses go out in request order.
- Every request that got an Exchange ends in `exchange_over` exactly once: the complete phase, then
  accounting (fastgw.observability.accounting.record).
- A client that leaves (closes, resets, or half-closes) cancels its request in flight at once.
- A proxied request is handed to a Relay (relay.pyx); a local endpoint (/healthz, /readyz, /metrics,
  /v1/models, /v1/models/{id}) and every refusal are answered here.
- Timeouts are deadlines checked by the worker's sweeper (`check_deadline`), not a timer per request.
"""
import re
import socket

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeLatin1
from libc.string cimport memchr

from fastgw.observability.accounting cimport record
from fastgw.observability.linebuf cimport LineBuffer
from fastgw.observability.stats cimport RequestStats
from fastgw.proxy.deadlines cimport (BODY_WAIT, HEAD_WAIT, IDLE, STREAMING, UPSTREAM_WAIT, WRITING, now)
from fastgw.proxy.exchange cimport new_exchange
from fastgw.proxy.gateway cimport Gateway
from fastgw.proxy.phases cimport refused, run_access, run_complete
from fastgw.proxy.relay cimport RELAYING, client_write, new_relay, wait_for

from fastgw.errors import GatewayError, Reply, reason
from fastgw.protocol import http as H
from fastgw.protocol.proxyproto import ProxyProtocolError, is_trusted
from fastgw.protocol.proxyproto import parse as parse_proxy_header
from fastgw.protocol.multipart import boundary_of
from fastgw.proxy.passthrough import METHODS
from fastgw.proxy.realtime import start_realtime
from fastgw.routing.router import MESSAGES, PROXIED

cdef int _NEED_DATA = H.NEED_DATA, _HEAD = H.HEAD, _BODY = H.BODY, _END = H.END
# Proxied path -> whether it is Anthropic's Messages API (one dict lookup answers both questions).
cdef dict _PROXIED = {**{p: False for p in PROXIED}, **{p: True for p in MESSAGES}}
cdef frozenset _MESSAGES = frozenset(MESSAGES)
cdef frozenset _PASSTHROUGH_METHODS = METHODS
cdef frozenset _LOCAL = frozenset(("/healthz", "/readyz", "/metrics", "/v1/models"))
cdef bytes _CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
cdef bytes _JSON = b"content-type: application/json\r\n"
cdef bytes _METRICS_TYPE = b"content-type: text/plain; version=0.0.4; charset=utf-8\r\n"
# A client's x-request-id is kept when it is short and plain; anything else is replaced by ours.
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,128}").fullmatch
_INTERNAL = "The gateway failed to process the request."


cdef bint _is_upload(RequestParser p, str path) except -1:
    """A body to stream: one that is not JSON, on a pass-through endpoint (below /v1/, not a proxied or local one)."""
    if path in _PROXIED or not (p.chunked or p.content_length > 0) or not path.startswith("/v1/") or path in _LOCAL:
        return False
    ct = p.header(b"content-type")
    return ct is None or not ct.lower().lstrip().startswith(b"application/json")


def monotonic():
    """The clock of every deadline here (the worker's sweeper passes it to check_deadline)."""
    return now()


cdef class ClientConnection(ClientSide):
    def __init__(self, Gateway gw):
        self.gw = gw
        self.parser = RequestParser(gw.max_head, gw.max_headers, gw.max_body, gw.max_upload)
        self.client_addr = self.peer_addr = ""
        self.keep_alive = True

    # -- transport events ---------------------------------------------------------------------------------

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
                # Throttled: any client can open connections to trigger this.
                gw.proxy_warnings.warning("proxy protocol refused", peer=self.peer_addr, reason="untrusted peer")
                self.closing = True
                transport.abort()
                return
            self.proxy_buf = b""
        gw.connections.add(self)
        wait_for(self, HEAD_WAIT if self.proxy_buf is not None else IDLE)

    def connection_lost(self, exc):
        self.closing = True
        self.gw.connections.discard(self)
        cdef Exchange ex = self.ex
        if ex is not None:
            self._drop_relay()       # cancel the upstream request: its connection cannot be reused
            ex.status = 499          # nginx's convention: the client left before the response was complete
            ex.error = ex.error or "client_disconnected"
            self.exchange_over(ex)

    def data_received(self, data):
        if self.closing:
            return
        if self.proxy_buf is not None:
            data = self._proxy_header(data)
            if not data:
                return
        cdef RequestParser p = self.parser
        p.feed(data)
        if self.ex is not None and self.wait != BODY_WAIT and not self.uploading:
            # A pipelined request while one is in flight: keep it, but do not let a client pile up bytes.
            if p.buffered > self.gw.max_head + self.gw.max_body and not self.read_paused:
                self.read_paused = True
                self.transport.pause_reading()
            return
        if self.wait == IDLE:
            wait_for(self, HEAD_WAIT)
        try:
            self._advance()
        except Exception:
            self._internal_error("request handling failed")

    def pause_writing(self):     # the client reads slower than the upstream sends: slow the upstream down
        if self.relay is not None:
            self.relay.pause_upstream()
        wait_for(self, WRITING)

    def resume_writing(self):
        if self.relay is not None:
            self.relay.resume_upstream()
        wait_for(self, STREAMING if self.ex is not None else IDLE)

    def eof_received(self):
        # The client closed its side: it has left (one that only half-closed cannot be told apart; nginx decides
        # the same). A request in flight is cancelled now, not answered to nobody at the upstream's cost:
        # connection_lost drops its upstream request and accounts it (499).
        if self.ex is not None:
            self.transport.abort()
        return None

    cdef object _proxy_header(self, data):
        buf = self.proxy_buf + data
        try:
            consumed, info = parse_proxy_header(buf)
        except ProxyProtocolError as exc:
            self.gw.proxy_warnings.warning("proxy protocol refused", peer=self.peer_addr, reason=str(exc))
            self.closing = True
            self.transport.abort()
            return b""
        if info is None:
            self.proxy_buf = buf
            return b""
        self.proxy_buf = None
        if info.command == "PROXY" and info.src_addr:
            self.client_addr = info.src_addr
        wait_for(self, IDLE)               # the header is in; the connection is now an idle HTTP one
        return buf[consumed:]

    cdef void _internal_error(self, str what):
        """A bug must cost one request, never hang it or leak a stack trace to the client."""
        self.gw.log.exception(what, request_id=self.ex.request_id if self.ex is not None else None)
        cdef bint answerable = self.ex is not None and not self.closing and (
            self.relay is None or self.relay.state < RELAYING)
        if answerable:
            try:
                self.refuse(GatewayError(500, _INTERNAL), True)
                return
            except Exception:
                pass
        self.closing = True
        self.transport.abort()

    # -- the request loop -------------------------------------------------------------------------------------

    cdef void _advance(self) except *:
        # Re-entered from exchange_over when a request is answered at once (pipelined /healthz, say): the loop
        # below goes on with the next request instead of recursing once per request.
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
                elif ev == _BODY:                # a piece of a streamed upload
                    data = p.take_body()
                    if self.relay is not None:
                        self.relay.upload_data(data)
                elif ev == _END:
                    if self.uploading:           # the upload is complete; its exchange goes on upstream
                        self.uploading = False
                        if self.relay is not None:
                            self.relay.upload_end()
                        return
                    self._on_request()
                    if self.ex is not None:      # in flight upstream: exchange_over resumes parsing
                        return
                else:
                    self.refuse(GatewayError(p.error_status, p.error_message,
                                             code="request_too_large" if p.error_status == 413 else None), True)
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
        wait_for(self, BODY_WAIT)
        if gw.access_hooks and path.startswith("/v1/"):
            # Answered before the body is read: close after, so the unread body is never parsed as a request.
            try:
                run_access(gw, ex)
            except GatewayError as err:
                refused(gw, ex, err)
                self.refuse(err, True)
                return
            except Reply as answer:
                self._answer(answer, True)
                return
        if _is_upload(p, path) and gw.passthrough.enabled:
            self._begin_upload(ex, path)
            if self.ex is not ex:            # refused at once
                return
        elif p.content_length > gw.max_body:
            self.refuse(GatewayError(413, f"The request body is larger than {gw.max_body} bytes.",
                                     code="request_too_large"), True)
            return
        if p.expect_continue:
            self.transport.write(_CONTINUE)

    cdef void _begin_upload(self, Exchange ex, str path) except *:
        """A body that is not JSON on a pass-through endpoint (a multipart file upload...): streamed upstream as it
        comes (Relay.upload_*), never held whole."""
        cdef RequestParser p = self.parser
        cdef Gateway gw = self.gw
        ct = p.header(b"content-type")
        boundary = boundary_of(ct)
        if boundary is None and ct is not None and ct.lower().lstrip().startswith(b"multipart/"):
            self.refuse(GatewayError(400, "A multipart/form-data body needs a boundary in its Content-Type.",
                                     code="invalid_multipart"), True)
            return
        limit = gw.passthrough.max_body(path)
        if p.content_length > limit:
            self.refuse(GatewayError(413, f"The request body is larger than {limit} bytes, the limit of {path}.",
                                     code="request_too_large"), True)
            return
        p.stream_body()
        ex.passthrough = True
        self.uploading = True
        self.relay = new_relay(self, ex)
        self.relay.upload_begin(boundary, limit)

    cdef void pause_body(self, bint pause) except *:
        if self.closing:
            return
        if pause and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()
        elif not pause and self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
            if self.wait == BODY_WAIT:       # paused by us: the client's time starts again
                wait_for(self, BODY_WAIT)

    cdef void _on_request(self) except *:
        cdef Exchange ex = self.ex
        cdef RequestParser p = self.parser
        ex.body = p.body
        ex.bytes_in = len(ex.body)
        path = ex.path
        method = p.method
        try:
            messages_api = _PROXIED.get(path)   # first: the proxied endpoints are most of the traffic
            if messages_api is None and path == "/v1/realtime":
                start_realtime(self, ex, p)     # a WebSocket session (realtime.pyx) takes the connection over
                return
            if messages_api is not None:
                ex.messages_api = messages_api is True
                if method != b"POST":
                    raise GatewayError(405, f"Method {method.decode('latin-1')} is not allowed on {path}; use POST.",
                                       code="method_not_allowed")
                self.relay = new_relay(self, ex)
                self.relay.start()
            elif path in _LOCAL or not path.startswith("/v1/") or (
                    path.startswith("/v1/models/") and (method == b"GET" or method == b"HEAD")):
                if method == b"GET" or (method == b"HEAD" and (path in _LOCAL or path.startswith("/v1/models/"))):
                    self._local(ex, path)
                elif path in _LOCAL:
                    raise GatewayError(405, f"Method {method.decode('latin-1')} is not allowed on {path}; use "
                                            "GET.", code="method_not_allowed")
                else:
                    raise GatewayError(404, f"Unknown request URL: {method.decode('latin-1')} {path}.",
                                       code="unknown_url")
            elif (<Gateway>self.gw).passthrough.enabled:
                if method not in _PASSTHROUGH_METHODS:
                    raise GatewayError(405, f"Method {method.decode('latin-1')} is not allowed on {path}.",
                                       code="method_not_allowed")
                ex.passthrough = True        # another /v1 endpoint: files, images, audio... (proxy/passthrough.py)
                self.relay = new_relay(self, ex)
                self.relay.start()
            else:
                raise GatewayError(404, f"Unknown request URL: {method.decode('latin-1')} {path}.",
                                   code="unknown_url")
        except GatewayError as err:
            if self.ex is ex:
                self.refuse(err, False)
        except Reply as answer:
            if self.ex is ex:
                self._answer(answer, False)
        except Exception:
            self.gw.log.exception("request failed", request_id=ex.request_id)
            if self.ex is ex:
                self.refuse(GatewayError(500, _INTERNAL), False)

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
            self._respond(200, gw.stats.render(), _METRICS_TYPE, b"")
        elif path == "/v1/models" or path.startswith("/v1/models/"):
            self._models(ex, path)
        else:
            raise GatewayError(404, f"Unknown request URL: GET {path}.", code="unknown_url")

    cdef void _models(self, Exchange ex, str path) except *:
        """GET /v1/models[/{id}], from the model catalog (fastgw.routing.catalog). Only the first listings after a
        start or reload may wait, for the upstreams' lists, never longer than the catalog's first wait; nothing
        else waits on them."""
        catalog = self.gw.catalog
        if catalog.ready():
            self._respond(200, catalog.answer(ex, path), _JSON, b"")
            return
        wait_for(self, UPSTREAM_WAIT)
        catalog.when_ready(self._models_ready, ex, path, catalog)

    def _models_ready(self, Exchange ex, str path, catalog):
        """The catalog can answer now: answer, if the client still waits for this exchange."""
        if self.ex is not ex or self.closing:
            return
        try:
            self._respond(200, catalog.answer(ex, path), _JSON, b"")
        except GatewayError as err:
            if self.ex is ex:
                self.refuse(err, False)
        except Exception:
            self._internal_error("listing models failed")

    # -- answers ----------------------------------------------------------------------------------------------

    cdef void _respond(self, int status, bytes body, bytes content_type, bytes extra) except *:
        cdef Exchange ex = self.ex
        lines = [content_type, b"x-request-id: " + ex.request_id.encode() + b"\r\n"]
        if extra:
            lines.append(extra)
        if not self.keep_alive:
            lines.append(b"connection: close\r\n")
        ex.status = status
        head = H.response_head(status, reason(status), lines, len(body))
        client_write(self, head if ex.method == b"HEAD" else head + body)
        self.exchange_over(ex)

    cdef void refuse(self, object err, bint close) except *:
        """Answer `err` (a GatewayError) as OpenAI's error JSON; `close`: then close the connection."""
        self._drop_relay()
        cdef Exchange ex = self.ex
        if ex is None:                       # a protocol error before a request existed
            ex = self.ex = new_exchange(self.gw.next_request_id(), self.client_addr, b"", "", None, now())
        if close:
            self.keep_alive = False
        ex.error = err.code or err.type
        extra = b"".join([f"{k}: {v}\r\n".encode("latin-1") for k, v in err.headers]) + b"".join(ex.response_headers)
        if ex.endpoint in _MESSAGES:         # an Anthropic client: Anthropic's error shape
            from fastgw.providers.messages import messages_error_body
            status, body = messages_error_body(err.status, err.body())
            self._respond(status, body, _JSON, extra)
            return
        self._respond(err.status, err.body(), _JSON, extra)

    cdef void reply(self, object answer) except *:
        self._answer(answer, False)

    cdef void _answer(self, object answer, bint close) except *:
        """A policy answered the request itself (Reply): no upstream."""
        self._drop_relay()
        if close:
            self.keep_alive = False
        extra = b"".join([f"{k}: {v}\r\n".encode("latin-1") for k, v in answer.headers])
        extra += b"".join(self.ex.response_headers)
        self._respond(answer.status, answer.body, b"content-type: " + answer.content_type.encode("latin-1") + b"\r\n",
                      extra)

    cdef void _drop_relay(self) except *:
        if self.relay is not None:
            self.relay.cancel()
            self.relay = None

    cdef void exchange_over(self, Exchange ex) except *:
        """The exchange is over: the complete phase, accounting, then the next request or the close."""
        cdef Gateway gw = self.gw
        ex.t_end = now()
        if ex.t_sent and not ex.upstream_wait:
            ex.upstream_wait = ex.t_end - ex.t_sent
        if gw.complete_hooks and not ex.settled:
            run_complete(gw, ex)
        record(<RequestStats>gw.stats, <LineBuffer>gw.access_log, gw.log_hooks, gw.log, ex)
        ex._parser = None
        self.ex = None
        self.relay = None
        if self.uploading:                   # answered before its upload was complete: the rest is not read
            self.uploading = False
            self.keep_alive = False
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
        wait_for(self, IDLE)
        if p.buffered:
            wait_for(self, HEAD_WAIT)
            self._advance()

    # -- deadlines --------------------------------------------------------------------------------------------

    def check_deadline(self, double t):
        """Called by the worker's sweeper (clock: monotonic()) about every second, or more often when
        keep-alive comments are due."""
        cdef Relay relay = self.relay
        if relay is not None and relay.next_keepalive != 0.0 and t >= relay.next_keepalive:
            relay.keepalive_due(t)
        if t < self.deadline or self.closing:
            return
        cdef int wait = self.wait
        if wait == IDLE:
            self.closing = True
            self.transport.close()
        elif wait == HEAD_WAIT or wait == BODY_WAIT:
            # No HTTP yet (or only part of a PROXY header): nothing to answer, just close.
            if self.proxy_buf is not None or (self.ex is None and not self.parser.buffered):
                self.closing = True
                self.transport.close()
            else:
                self.refuse(GatewayError(408, "The request was not received in time.", code="request_timeout"),
                            True)
        elif wait == UPSTREAM_WAIT or wait == STREAMING:
            if relay is not None:
                relay.timed_out()
        else:                                # WRITING: the client stopped reading
            self.closing = True
            self._drop_relay()
            self.transport.abort()

    def close_if_idle(self):
        """Draining: close a keep-alive connection that has nothing in flight. True if it was closed."""
        if self.ex is None and not self.parser.buffered and not self.closing:
            self.closing = True
            self.transport.close()
            return True
        return False
