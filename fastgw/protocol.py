"""A client connection: bytes <-> the compiled parsers, policies in phases, one upstream exchange at a time.

Invariants:
- At most one request of a connection is in flight (`self.ex`); pipelined requests wait, parsed later in order,
  so responses go out in request order.
- Every request that got an Exchange ends in `_finish` exactly once: complete/log hooks, metrics, access log.
- Nothing from the upstream reaches the client after a response was cut short; a stream that breaks is ended by
  closing the connection, never with a made-up `[DONE]` or a clean last chunk.
- Timeouts are deadlines checked by the worker's sweeper (`check_deadline`), not a timer per request.
"""
from __future__ import annotations

import asyncio
import re
import socket
from time import perf_counter, time

from fastgw._core import http as H
from fastgw._core.jsonpeek import peek_request, peek_usage, splice
from fastgw._core.sse import SSERelay
from fastgw.errors import GatewayError, error_body, reason
from fastgw.exchange import Exchange
from fastgw.proxyproto import ProxyProtocolError, is_trusted
from fastgw.proxyproto import parse as parse_proxy_header
from fastgw.router import PROXIED

_NEED_DATA, _HEAD, _END, _ERROR = H.NEED_DATA, H.HEAD, H.END, H.ERROR
_frame = H.frame_chunk
_LAST_CHUNK = H.LAST_CHUNK
_PROXIED = frozenset(PROXIED)
# Client headers that never reach a provider: its key (the provider key replaces it), our request id (re-added),
# and accept-encoding (a compressed response could not be metered or relayed event by event).
_DROP = frozenset((b"authorization", b"api-key", b"x-api-key", b"x-request-id", b"accept-encoding"))
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_JSON = b"content-type: application/json\r\n"
_SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
             b"transfer-encoding: chunked\r\n")
_KEEPALIVE_EVENT = _frame(b": keep-alive\n\n")
_INCLUDE_USAGE = b'{"include_usage":true}'
# A client's x-request-id is kept when it is short printable ASCII; anything else is replaced by ours.
_REQUEST_ID = re.compile(rb"[!-~]{1,128}").fullmatch
_ADD_INCLUDE_USAGE = b',"stream_options":{"include_usage":true}'

# What the connection is waiting for; the deadline applies to that wait.
IDLE, HEAD_WAIT, BODY_WAIT, UPSTREAM_WAIT, STREAMING, WRITING = range(6)


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "gw", "transport", "parser", "client_addr", "peer_addr", "ex", "upstream", "keep_alive", "closing",
        "wait", "deadline", "proxy_buf", "pending_head", "chunked", "relay", "parts", "head_sent",
        "own_head", "next_keepalive", "strip_usage", "attempts", "write_paused", "read_paused", "tried", "advancing",
    )

    def __init__(self, gw):
        self.gw = gw
        self.transport = None
        self.parser = H.RequestParser(gw.limits[0], gw.limits[1], gw.limits[2])
        self.client_addr = ""
        self.peer_addr = ""
        self.ex = None              # the Exchange in flight
        self.upstream = None        # the UpstreamConnection serving it
        self.keep_alive = True
        self.closing = False
        self.wait = IDLE
        self.deadline = 0.0
        self.proxy_buf = None       # bytes of a PROXY header still being received, when one is required
        self.write_paused = False
        self.read_paused = False
        self.advancing = False
        self._reset_response()

    def _reset_response(self) -> None:
        self.pending_head = None    # response head not written yet (sent with the first body bytes)
        self.head_sent = False
        self.own_head = False       # we sent our own SSE head to keep a slow stream alive
        self.chunked = False
        self.relay = None
        self.parts = None
        self.next_keepalive = 0.0
        self.strip_usage = False
        self.attempts = 0
        self.tried = None

    # -- connection events --------------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        gw = self.gw
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
                transport.abort()
                return
            self.proxy_buf = b""
        gw.connections.add(self)
        self._wait(HEAD_WAIT if self.proxy_buf is not None else IDLE)

    def connection_lost(self, exc) -> None:
        self.closing = True
        self.gw.connections.discard(self)
        ex = self.ex
        if ex is not None:
            up = self.upstream
            if up is not None:       # cancel the upstream request: its connection cannot be reused
                self.upstream = None
                up.abort()
            ex.status = 499             # nginx's convention: the client left before the response was complete
            ex.error = ex.error or "client_disconnected"
            self._finish(ex)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.proxy_buf is not None:
            data = self._proxy_header(data)
            if not data:
                return
        p = self.parser
        p.feed(data)
        if self.ex is not None and self.wait != BODY_WAIT:
            # A pipelined request while one is in flight: keep it, but do not let a client pile up bytes.
            if p.buffered > self.gw.limits[0] + self.gw.limits[2] and not self.read_paused:
                self.read_paused = True
                self.transport.pause_reading()
            return
        if self.wait == IDLE:
            self._wait(HEAD_WAIT)
        try:
            self._advance()
        except Exception:
            self._internal_error("request handling failed")

    def _internal_error(self, what: str) -> None:
        """A bug must cost one request, never hang it or leak a stack trace to the client."""
        self.gw.log.exception(what, request_id=self.ex.request_id if self.ex is not None else None)
        if self.ex is not None and not self.head_sent and self.pending_head is None and not self.closing:
            up = self.upstream
            if up is not None:
                self.upstream = None
                up.abort()
            try:
                self._refuse(GatewayError(500, "The gateway failed to process the request."), close=True)
                return
            except Exception:
                pass
        self.closing = True
        self.transport.abort()

    def pause_writing(self) -> None:     # the client reads slower than the upstream sends: slow the upstream
        self.write_paused = True
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.pause_reading()
        self._wait(WRITING)

    def resume_writing(self) -> None:
        self.write_paused = False
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.resume_reading()
        self._wait(STREAMING if self.ex is not None else IDLE)

    def _proxy_header(self, data: bytes) -> bytes:
        buf = self.proxy_buf + data
        try:
            consumed, info = parse_proxy_header(buf)
        except ProxyProtocolError as exc:
            self.gw.log.warning("proxy protocol refused", peer=self.peer_addr, reason=str(exc))
            self.transport.abort()
            return b""
        if info is None:
            self.proxy_buf = buf
            return b""
        self.proxy_buf = None
        if info.command == "PROXY" and info.src_addr:
            self.client_addr = info.src_addr
        return buf[consumed:]

    # -- requests -----------------------------------------------------------------------------------------

    def _advance(self) -> None:
        # Re-entered from _finish when a request is answered at once (pipelined /healthz, say): the loop below
        # goes on with the next request instead of recursing once per request.
        if self.advancing:
            return
        self.advancing = True
        p = self.parser
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
                    self._refuse(GatewayError(p.error_status, p.error_message), close=True)
                    return
        finally:
            self.advancing = False

    def _on_head(self) -> None:
        p = self.parser
        gw = self.gw
        target = p.target
        q = target.find(b"?")
        path = (target if q < 0 else target[:q]).decode("latin-1")
        rid = p.header(b"x-request-id")
        rid = rid.decode("ascii") if rid is not None and _REQUEST_ID(rid) else gw.next_request_id()
        ex = self.ex = Exchange(rid, self.client_addr, p.method, path, p, perf_counter())
        self.keep_alive = p.keep_alive and not gw.draining
        self._wait(BODY_WAIT)
        if gw.pipeline.access and path.startswith("/v1/"):
            try:
                for hook in gw.pipeline.access:
                    hook(ex)
            except GatewayError as err:
                # Refused before the body: answer now and close, so the unread body is never parsed as a request.
                self._refuse(err, close=True)
                return
            except Exception:
                gw.log.exception("policy failed", phase="access", request_id=rid)
                self._refuse(GatewayError(500, "The gateway failed to process the request."), close=True)
                return
        if p.expect_continue:
            self.transport.write(_CONTINUE)

    def _on_request(self) -> None:
        ex = self.ex
        p = self.parser
        ex.body = p.body
        ex.bytes_in = len(ex.body)
        path = ex.path
        try:
            if path in _PROXIED:
                if p.method != b"POST":
                    raise GatewayError(405, f"Method {p.method.decode('latin-1')} is not allowed on {path}; use POST.",
                                       code="method_not_allowed")
                self._proxy(ex)
            elif p.method != b"GET":
                if path in ("/healthz", "/readyz", "/metrics", "/v1/models"):
                    raise GatewayError(405, f"Method {p.method.decode('latin-1')} is not allowed on {path}; use GET.",
                                       code="method_not_allowed")
                raise GatewayError(404, f"Unknown request URL: {p.method.decode('latin-1')} {path}.",
                                   code="unknown_url")
            else:
                self._local(ex, path)
        except GatewayError as err:
            self._refuse(err)
        except Exception:
            self.gw.log.exception("request failed", request_id=ex.request_id)
            self._refuse(GatewayError(500, "The gateway failed to process the request."))

    def _local(self, ex: Exchange, path: str) -> None:
        gw = self.gw
        if path == "/healthz":
            self._respond(200, b'{"status":"ok"}')
        elif path == "/readyz":
            if gw.draining:
                self._respond(503, b'{"status":"draining"}')
            else:
                self._respond(200, b'{"status":"ready"}')
        elif path == "/metrics":
            self._respond(200, gw.stats.render(), b"content-type: text/plain; version=0.0.4; charset=utf-8\r\n")
        elif path == "/v1/models":
            self._respond(200, gw.router.models_body)
        else:
            raise GatewayError(404, f"Unknown request URL: GET {path}.", code="unknown_url")

    def _proxy(self, ex: Exchange) -> None:
        gw = self.gw
        f = peek_request(ex.body)
        if f is None:
            raise GatewayError(400, "We could not parse the JSON body of your request. The body must be a JSON "
                                    "object.", code="invalid_json")
        model = f.model
        if not model:
            raise GatewayError(400, "You must provide a model parameter.", param="model", code="missing_model")
        route = gw.router.resolve(model)
        if route is None:
            raise GatewayError(404, f"The model `{model}` does not exist or you do not have access to it.",
                               param="model", code="model_not_found")
        ex.fields = f
        ex.model = model
        ex.stream = f.stream
        ex.client_wants_usage = f.include_usage
        ex.route = route
        hooks = gw.pipeline.request
        if hooks:
            for i, hook in enumerate(hooks):
                pending = hook(ex)
                if pending is not None:      # a policy waits on I/O: continue when it is done
                    gw.loop.create_task(self._request_async(ex, pending, hooks[i + 1:]))
                    return
        self._send(ex, route.pick())

    async def _request_async(self, ex: Exchange, pending, rest) -> None:
        try:
            await pending
            for hook in rest:
                more = hook(ex)
                if more is not None:
                    await more
        except GatewayError as err:
            if self.ex is ex:
                self._refuse(err)
            return
        except Exception:
            self.gw.log.exception("policy failed", phase="request", request_id=ex.request_id)
            if self.ex is ex:
                self._refuse(GatewayError(500, "The gateway failed to process the request."))
            return
        if self.ex is ex and not self.closing:
            try:
                self._send(ex, ex.route.pick())
            except GatewayError as err:
                self._refuse(err)

    # -- upstream -----------------------------------------------------------------------------------------

    def _send(self, ex: Exchange, target) -> None:
        gw = self.gw
        body = ex.body
        f = ex.fields
        if body is not self.parser.body:     # a policy rewrote the body: offsets must be read again
            f = ex.fields = peek_request(body)
            if f is None:
                raise GatewayError(500, "A policy produced an invalid request body.")
        edits = None
        if target.model:
            edits = [(f.model_start, f.model_end, target.model_json)]
        if ex.stream and gw.pipeline.needs_usage and not f.include_usage:
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
        data = head + body
        pool = gw.pools.get(target)
        conn = pool.acquire()
        self._wait(UPSTREAM_WAIT)
        if ex.stream and gw.keepalive_interval > 0:
            self.next_keepalive = gw.loop.time() + gw.keepalive_interval
        ex.t_sent = perf_counter()
        if conn is not None:
            self.upstream = conn
            conn.send(self, data)
        else:
            gw.loop.create_task(self._connect_and_send(ex, pool, data))

    async def _connect_and_send(self, ex: Exchange, pool, data: bytes) -> None:
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
        ex.t_sent = perf_counter()
        conn.send(self, data)

    def upstream_head(self, r) -> None:
        ex = self.ex
        now = perf_counter()
        ex.t_first_byte = now
        ex.status = r.status
        gw = self.gw
        for hook in gw.pipeline.response_headers:
            hook(ex)
        if ex.stream and r.status == 200:
            self.relay = SSERelay(self.strip_usage, gw.pipeline.needs_usage)
            self._wait(STREAMING)
        else:
            self.parts = []
        if self.own_head:                   # our SSE head is out already (keep-alive comments were sent)
            self.chunked = True
            if self.relay is None:          # the upstream refused after all: its error becomes an SSE event
                self.parts = []
            return
        # Overhead so far: before the request was sent, plus this head's processing.
        overhead_us = int(((ex.t_sent - ex.t_start) + (perf_counter() - now)) * 1e6)
        extra = (b"x-request-id: " + ex.request_id.encode() + b"\r\nx-fastgw-overhead-us: "
                 + str(overhead_us).encode() + b"\r\n")
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

    def upstream_body(self, data: bytes) -> None:
        ex = self.ex
        relay = self.relay
        if relay is not None:
            if not relay.events and self.next_keepalive:
                ex.t_first_byte = perf_counter()     # time to first token
                self.next_keepalive = 0.0
            data = relay.feed(data)
            if not data:
                return
            out = _frame(data)
            self.deadline = self.gw.loop.time() + self.gw.stream_gap_timeout
        else:
            self.parts.append(data)
            if self.own_head:
                return                      # rendered as one SSE error event at the end
            out = _frame(data) if self.chunked else data
        if self.pending_head is not None:
            out = self.pending_head + out
            self.pending_head = None
            self.head_sent = True
        self._write(out)

    def upstream_end(self) -> None:
        ex = self.ex
        self.upstream = None
        now = perf_counter()
        ex.upstream_wait = now - ex.t_sent
        relay = self.relay
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
            elif self.gw.pipeline.needs_usage:
                self._count_streamed(ex, relay)
        else:
            parts = self.parts
            body = parts[0] if len(parts) == 1 else b"".join(parts)
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

    def _count_streamed(self, ex: Exchange, relay) -> None:
        """No usage in the stream: count what streamed exactly, so limits and budgets still hold."""
        from fastgw.tokenizer import count_text, encoding_for_model

        ex.completion_tokens = count_text(relay.text(), encoding_for_model(ex.model))
        ex.prompt_tokens = ex.prompt_tokens_estimate

    def upstream_failed(self, kind: str, message: str) -> None:
        ex = self.ex
        self.upstream = None
        if ex is None:
            return
        gw = self.gw
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
            status = 504 if kind == "timeout" else 502
            self._refuse(GatewayError(status, f"The upstream failed: {message}.", type="upstream_error",
                                      code="upstream_" + kind))
            return
        # The response had started: end it by closing, so the client sees a broken stream, not a clean end.
        gw.stats.upstream_error(ex.upstream_name, kind)
        ex.error = "upstream_" + kind
        self.closing = True
        self.transport.close()
        self._finish(ex)

    # -- responses ----------------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        self.ex.bytes_out += len(data)
        self.transport.write(data)

    def _respond(self, status: int, body: bytes, content_type: bytes = _JSON, extra: bytes = b"") -> None:
        ex = self.ex
        lines = [content_type, b"x-request-id: " + ex.request_id.encode() + b"\r\n"]
        if extra:
            lines.append(extra)
        if not self.keep_alive:
            lines.append(b"connection: close\r\n")
        ex.status = status
        self._write(H.response_head(status, reason(status), lines, len(body)) + body)
        self._finish(ex)

    def _refuse(self, err: GatewayError, close: bool = False) -> None:
        ex = self.ex
        if ex is None:                       # a protocol error before a request existed
            ex = self.ex = Exchange(self.gw.next_request_id(), self.client_addr, b"", "", None, perf_counter())
        if close:
            self.keep_alive = False
        ex.error = err.code or err.type
        if err.status == 429 or err.status == 401 or err.status == 403:
            self.gw.stats.rejected(ex.consumer, ex.model, err.code or str(err.status))
        extra = b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in err.headers) + b"".join(ex.response_headers)
        self._respond(err.status, err.body(), _JSON, extra)

    def _finish(self, ex: Exchange) -> None:
        """The request is over: account, log, and move on to the next request or close."""
        gw = self.gw
        ex.t_end = perf_counter()
        if ex.t_sent and not ex.upstream_wait:
            ex.upstream_wait = ex.t_end - ex.t_sent
        pipe = gw.pipeline
        for hook in pipe.complete:
            try:
                pending = hook(ex)
                if pending is not None:
                    gw.loop.create_task(pending)
            except Exception:
                gw.log.exception("policy failed", phase="complete", request_id=ex.request_id)
        gw.record(ex, pipe)
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
        self.parser.start_next()
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        self._wait(IDLE)
        if self.parser.buffered:
            self._wait(HEAD_WAIT)
            self._advance()

    # -- deadlines ----------------------------------------------------------------------------------------

    def _wait(self, what: int) -> None:
        gw = self.gw
        self.wait = what
        self.deadline = gw.loop.time() + gw.timeouts[what]

    def check_deadline(self, now: float) -> None:
        """Called by the worker's sweeper about every second (more often when keep-alive comments are due)."""
        if self.next_keepalive and now >= self.next_keepalive and self.ex is not None:
            self._send_keepalive(now)
        if now < self.deadline or self.closing:
            return
        wait = self.wait
        if wait == IDLE:
            self.closing = True
            self.transport.close()
        elif wait in (HEAD_WAIT, BODY_WAIT):
            if self.ex is None and not self.parser.buffered and self.proxy_buf is None:
                self.closing = True
                self.transport.close()
            else:
                self._refuse(GatewayError(408, "The request was not received in time.", code="request_timeout"),
                             close=True)
        elif wait == UPSTREAM_WAIT or wait == STREAMING:
            up = self.upstream
            self.upstream = None
            if up is not None:
                up.abort()
            self.upstream_failed("timeout", "no response from the upstream in time")
        else:                                # WRITING: the client stopped reading
            self.closing = True
            if self.upstream is not None:
                self.upstream.abort()
                self.upstream = None
            self.transport.abort()

    def _send_keepalive(self, now: float) -> None:
        gw = self.gw
        self.next_keepalive = now + gw.keepalive_interval
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
