# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The relay of one proxied exchange: admission, the upstream request, and the response back to the client.

A Relay is made per proxied request by the client connection, once its body is in. It runs the request phase,
asks the deployment's provider for the request, sends it on a pooled upstream connection, and relays the
response as the provider reads it. Its progress is one RelayState (relay.pxd), moving only forward.

Invariants:
- Nothing reaches the client before the upstream's head, except our own SSE head and keep-alive comments
  (OWN_SSE_HEAD), sent only to a stream that waits long for its first token.
- Until the client has a head (AWAITING_HEAD, HEAD_HELD) a failed attempt may be retried: a stale kept-alive
  connection on the same deployment, a refused connection on the route's other deployments.
- After it (RELAYING, OWN_SSE_HEAD) a failure ends the response by closing the connection: the client sees a
  broken stream, never a made-up `[DONE]` or a clean last chunk.
- The relay ends in DONE exactly once, and then hands the exchange back (ClientSide.exchange_over or refuse),
  which accounts it.
"""
import asyncio
import re
import sys

cimport cython

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.string cimport memcpy

from fastgw.protocol.http cimport RequestParser
from fastgw.proxy.phases cimport refused, run_request, run_response_headers, run_stream_event
from fastgw.proxy.upstream cimport Pool

from fastgw.errors import GatewayError, Reply, reason
from fastgw.protocol import http as H
from fastgw.protocol.jsonpeek import peek_request, peek_response

_frame = H.frame_chunk
cdef bytes _LAST_CHUNK = H.LAST_CHUNK
cdef bytes _JSON = b"content-type: application/json\r\n"
# Client headers that never reach a provider: its key (the provider key replaces it), our request id (re-added),
# and accept-encoding (a compressed response could not be metered or relayed event by event); from an Anthropic
# client also its API version (the deployment's own is sent; two would conflict).
# A tuple, not a set: forward_head walks it once per request, and a tuple walks by index (a set by iterator).
cdef tuple _DROP = (b"authorization", b"api-key", b"x-api-key", b"x-request-id", b"accept-encoding")
cdef tuple _DROP_MESSAGES = _DROP + (b"anthropic-version",)
cdef bytes _SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                        b"transfer-encoding: chunked\r\n")
cdef bytes _KEEPALIVE_EVENT = _frame(b": keep-alive\n\n")
# A non-streamed response body is kept (to read its usage, or to translate it) up to this size.
cdef Py_ssize_t _MAX_KEPT = 16 * 1024 * 1024
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
# Endpoints whose streams end with `data: [DONE]`: one that stops before it was cut short upstream.
cdef tuple _ENDS_WITH_DONE = ("/v1/chat/completions", "/v1/completions")


cdef class ClientSide:
    """The part of a client connection that relays use; fastgw.proxy.client.ClientConnection is the rest."""

    cdef void exchange_over(self, Exchange ex) except *:
        raise NotImplementedError

    cdef void refuse(self, object err, bint close) except *:
        raise NotImplementedError

    cdef void reply(self, object answer) except *:
        raise NotImplementedError

    cdef void break_off(self) except *:
        """End a response that had started by closing the connection."""
        self.closing = True
        self.transport.close()


cdef Relay new_relay(ClientSide client, Exchange ex):
    cdef Relay r = Relay.__new__(Relay)
    r.client = client
    r.gw = client.gw
    r.ex = ex
    r.state = ADMITTING
    return r


@cython.freelist(8)
cdef class Relay(UpstreamListener):
    # -- admission ------------------------------------------------------------------------------------------

    cdef void start(self) except *:
        """Read the request's fields, route it, run the request phase, send it. Raises GatewayError (a refusal)
        or Reply (a policy answered) when the request ends here."""
        cdef Exchange ex = self.ex
        cdef Gateway gw = self.gw
        f = peek_request(ex.body)
        if f is None:
            raise GatewayError(400, "We could not parse the JSON body of your request. The body must be a JSON "
                                    "object.", code="invalid_json")
        model = f.model
        if not model:
            raise GatewayError(400, "You must provide a model parameter.", param="model", code="missing_model")
        route = (<Router>gw.router).resolve(model)
        if route is None:
            raise GatewayError(404, f"The model `{model}` does not exist or you do not have access to it.",
                               param="model", code="model_not_found")
        ex.fields = f
        ex.model = model
        ex.stream = f.stream
        ex.client_wants_usage = f.include_usage
        ex.route = route
        if gw.request_hooks:
            wait_for(self.client, UPSTREAM_WAIT)     # policies waiting on I/O count against the first byte
            try:
                pending = run_request(gw, ex)
            except GatewayError as err:
                refused(gw, ex, err)
                raise
            if pending is not None:
                gw.loop.create_task(self._admit_later(pending))
                return
        self._admitted()

    async def _admit_later(self, pending):
        try:
            await pending
            if self.state == ADMITTING:
                self._admitted()
        except GatewayError as err:
            if self.state == ADMITTING:
                refused(self.gw, self.ex, err)
                self.state = DONE
                self.client.refuse(err, False)
        except Reply as answer:
            if self.state == ADMITTING:
                self.state = DONE
                self.client.reply(answer)
        except Exception:
            self.gw.log.exception("request failed", request_id=self.ex.request_id)
            if self.state != DONE:
                self.state = DONE
                self.client.refuse(GatewayError(500, "The gateway failed to process the request."), False)

    cdef void _admitted(self) except *:
        cdef Exchange ex = self.ex
        if ex.body is not (<RequestParser>ex._parser).body:   # a policy rewrote the body: read its fields again
            f = ex.fields = peek_request(ex.body)
            if f is None:
                raise GatewayError(500, "A policy produced an invalid request body.", code="policy_error")
        self._send((<Route>ex.route).pick())

    # -- the upstream request ---------------------------------------------------------------------------------

    cdef void _send(self, Deployment d) except *:
        cdef Exchange ex = self.ex
        cdef Gateway gw = self.gw
        cdef Provider provider = <Provider>d.provider
        cdef bint add_usage = ex.stream and gw.needs_usage and not ex.fields.include_usage
        if ex.messages_api:
            if d.messages_provider is None:
                raise GatewayError(400, f"The Messages API is not available for model `{ex.model}` (provider "
                                        f"{provider.name}).", code="unsupported_endpoint")
            provider = <Provider>d.messages_provider
        # Accounting needs a stream's usage: ask for it, and hide that extra chunk from this client.
        self.strip_usage = add_usage
        self.deployment = d
        self.provider = provider
        ex.deployment = d                    # before request_body: a translating provider reads its config
        line = provider.request_line(ex, d.request_lines)   # first: it refuses an endpoint the provider lacks
        body = provider.request_body(ex, d.model_json, add_usage)
        ex.upstream_name = d.name
        head = (<RequestParser>ex._parser).forward_head(
            line,
            d.header_lines + b"x-request-id: " + ex.request_id.encode() + b"\r\n",
            len(body), _DROP_MESSAGES if ex.messages_api else _DROP)
        pool = d.pool                        # cached on the deployment: no Pools lookup per request
        if pool is None:
            pool = d.pool = gw.pools.get(d)
        cdef UpstreamConnection conn = (<Pool>pool).acquire()
        self.state = AWAITING_HEAD
        wait_for(self.client, UPSTREAM_WAIT)
        if ex.stream and gw.keepalive_interval > 0:
            self.next_keepalive = now() + gw.keepalive_interval
        ex.t_sent = now()
        if conn is not None:
            self.upstream = conn
            conn.send(self, head, body)
        elif (<Pool>pool).reserve():
            gw.loop.create_task(self._open_and_send(pool, d, head, body))
        else:
            # The pool is full: wait in its queue (connection_ready or slot_ready), at most queue_timeout.
            self.pending_request = (head, body)
            self.queued_at = ex.t_sent
            (<Pool>pool).enqueue(self)
            if self.client.deadline > ex.t_sent + (<Pool>pool).queue_timeout:
                self.client.deadline = ex.t_sent + (<Pool>pool).queue_timeout

    cdef void connection_ready(self, UpstreamConnection conn) except *:
        """Our turn in the queue: a connection released by another request."""
        head, body = self.pending_request
        self.pending_request = None
        cdef double t = now()
        conn.pool.queue_wait += t - self.queued_at
        self.upstream = conn
        self.ex.t_sent = t
        wait_for(self.client, UPSTREAM_WAIT)
        conn.send(self, head, body)

    cdef void slot_ready(self) except *:
        """Our turn in the queue: a slot to open a connection in (another one closed)."""
        head, body = self.pending_request
        self.pending_request = None
        cdef Pool pool = <Pool>self.deployment.pool
        pool.queue_wait += now() - self.queued_at
        wait_for(self.client, UPSTREAM_WAIT)
        self.gw.loop.create_task(self._open_and_send(pool, self.deployment, head, body))

    async def _open_and_send(self, Pool pool, Deployment d, bytes head, bytes body):
        try:
            conn = await pool.open_one()
        except (OSError, asyncio.TimeoutError) as exc:
            if self.state != DONE and self.deployment is d:
                self.upstream_failed("connect", f"cannot connect to the upstream: {type(exc).__name__}")
            return
        # Still wanted unless the exchange ended (the client left, a timeout) or moved on to another deployment;
        # OWN_SSE_HEAD is still waiting for this connection (keep-alive comments went out meanwhile).
        if self.state == DONE or self.deployment is not d:
            pool.release(conn)
            return
        self.upstream = conn
        self.ex.t_sent = now()
        conn.send(self, head, body)

    # -- the response (UpstreamListener) ---------------------------------------------------------------------

    cdef void upstream_head(self, ResponseParser r) except *:
        cdef Exchange ex = self.ex
        cdef Gateway gw = self.gw
        cdef double t = now()
        ex.t_first_byte = t
        ex.status = r.status
        if gw.response_hooks:
            try:
                run_response_headers(gw, ex)
            except GatewayError as err:
                self._give_up(err)
                return
        if ex.stream and r.status == 200:
            self.sse = self.provider.open_stream(ex, self.strip_usage, gw.needs_usage)
            wait_for(self.client, STREAMING)
        else:
            self.parts = []
        if self.state == OWN_SSE_HEAD:      # our SSE head is out already (keep-alive comments were sent)
            self.chunked = True
            if self.sse is not None:
                self.state = RELAYING
            return                          # else the upstream refused after all: its error becomes an SSE event
        # Overhead so far: before the request was sent, plus this head's processing.
        cdef long overhead_us = <long>(((ex.t_sent - ex.t_start) + (now() - t)) * 1e6)
        extra = _id_and_overhead_lines(ex.request_id.encode(), overhead_us)
        if ex.response_headers:
            extra += b"".join(ex.response_headers)
        if not self.client.keep_alive:
            extra += b"connection: close\r\n"
        self.state = HEAD_HELD
        if self.sse is None and self.provider.translates:
            retry_after = r.header(b"retry-after")  # the one upstream header a translated error keeps
            if retry_after is not None:
                extra += b"retry-after: " + retry_after + b"\r\n"
            self.pending_head = extra       # the head is made at the end, for the translated body
        elif r.content_length >= 0 and self.sse is None:
            self.pending_head = r.forward_head(extra, False, r.content_length)
        else:
            self.chunked = True
            self.pending_head = r.forward_head(extra, True, 0)
            if self.sse is not None:        # the client sees a stream's head with this read's events
                self._emit(self.pending_head)
                self.pending_head = None
                self.state = RELAYING

    cdef void upstream_body(self, data) except *:
        cdef Exchange ex
        cdef double d, total
        if self.sse is not None:            # a stream's events (inline: this runs once per upstream read)
            ex = self.ex
            data = self.sse.feed(data)
            if not data:
                return
            if ex.t_first_token == 0.0:
                ex.t_first_token = now()
            if self.gw.stream_event_hooks:
                try:
                    self._stream_events(data)
                except GatewayError as err:
                    self._give_up(err)
                    return
            d = now() + self.gw.stream_gap_timeout
            total = ex.t_start + self.gw.total_timeout
            self.client.deadline = d if d < total else total
            self._emit(_frame(data))
            return
        parts = self.parts
        if parts is not None:
            parts.append(data)
            self.parts_bytes += len(data)
            if self.parts_bytes > _MAX_KEPT and self.state != OWN_SSE_HEAD:
                if self.provider.translates:
                    self._give_up(GatewayError(502, "The upstream's response is too large to translate.",
                                               type="upstream_error", code="upstream_too_large"))
                    return
                self.parts = None           # a huge body: relayed, but not kept for its usage
        if self.state == OWN_SSE_HEAD or self.provider.translates:
            return                          # rendered whole at the end
        out = _frame(data) if self.chunked else data
        if self.pending_head is not None:
            out = self.pending_head + out
            self.pending_head = None
            self.state = RELAYING
        self._emit(out)

    cdef void _stream_events(self, data) except *:
        """Each complete event of the relayed stream, to the stream_event hooks (only when some policy has one)."""
        buf = self.events_tail + data if self.events_tail else data
        start = 0
        for m in _EVENT_END.finditer(buf):
            run_stream_event(self.gw, self.ex, buf[start:m.end()])
            start = m.end()
        self.events_tail = buf[start:] if start < len(buf) else None

    cdef void upstream_end(self) except *:
        cdef Exchange ex = self.ex
        cdef UpstreamConnection up = self.upstream
        self.upstream = None
        ex.upstream_wait = now() - ex.t_sent
        try:
            if self.sse is not None:
                self._end_stream()
            else:
                self._end_body()
        except GatewayError as err:         # the response was broken, truncated or not JSON: the connection it
            if up is not None and up.listener is None:   # came on (back in its pool, unless a queued request
                up.abort()                  # has it already) is not trusted again
            self._give_up(err)
            return
        self._flush()
        self._done()

    cdef void _end_stream(self) except *:
        cdef Exchange ex = self.ex
        cdef SSERelay sse = self.sse
        tail = sse.finish()
        if tail:
            if ex.t_first_token == 0.0:
                ex.t_first_token = now()
            if self.gw.stream_event_hooks:
                self._stream_events(tail)
            self._emit(_frame(tail))
        ex.events = sse.events
        if sse.usage_seen:
            ex.prompt_tokens = sse.prompt_tokens
            ex.completion_tokens = sse.completion_tokens
        elif self.gw.needs_usage:
            _count_streamed(ex, sse)
        if not (sse.done or self.provider.translates or ex.endpoint not in _ENDS_WITH_DONE):
            # The upstream ended the body before `data: [DONE]`: the client's stream is broken off too, never given
            # a clean end the upstream's lacked (a translating provider's stream checks its own end event).
            raise GatewayError(502, "The upstream's stream ended before data: [DONE].", type="upstream_error",
                               code="upstream_truncated")
        self._emit(_LAST_CHUNK)

    cdef void _end_body(self) except *:
        cdef Exchange ex = self.ex
        parts = self.parts
        body = b"" if parts is None else parts[0] if len(parts) == 1 else b"".join(parts)
        if self.provider.translates:
            body = self.provider.response_body(ex, ex.status, body)
        if self.state == OWN_SSE_HEAD:
            out = _frame(b"data: " + body.replace(b"\n", b"") + b"\n\n") + _LAST_CHUNK
        elif self.provider.translates:
            out = H.response_head(ex.status, reason(ex.status), [_JSON, self.pending_head], len(body)) + body
            self.pending_head = None
        else:
            if parts is not None and ex.status < 300 and ex.status != 204:
                # A success is one JSON object on every proxied endpoint: anything else is the upstream's fault
                # (a 502), never passed on as a success. Its structure checked and its usage read in one light scan.
                usage = peek_response(body)
                if usage is None:
                    self.out1 = self.outq = None    # its end never goes out: a client that has its start sees it cut
                    raise GatewayError(502, "The upstream's response is not valid JSON.", type="upstream_error",
                                       code="upstream_malformed")
                ex.prompt_tokens, ex.completion_tokens = usage
            out = _LAST_CHUNK if self.chunked else b""
            if self.pending_head is not None:
                out = self.pending_head + out
                self.pending_head = None
        if out:
            self._emit(out)

    cdef void upstream_failed(self, str kind, str message) except *:
        self.upstream = None
        if self.state == DONE:
            return
        if self.state == AWAITING_HEAD or self.state == HEAD_HELD:
            self._retry_or_fail(kind, message)
            return
        # The response had started: end it by closing, so the client sees a broken stream, not a clean end.
        cdef Exchange ex = self.ex
        _note_upstream_error(ex, kind)
        ex.error = "upstream_" + kind
        self.state = DONE
        self._flush()                       # what arrived before the failure still reaches the client
        self.client.break_off()
        self.client.exchange_over(ex)

    cdef void upstream_bug(self) except *:
        err = sys.exc_info()[1]
        if isinstance(err, GatewayError):   # a translating provider refused the upstream's data: no bug
            self._give_up(err)
            return
        self.gw.log.exception("upstream response handling failed", request_id=self.ex.request_id)
        self._give_up(GatewayError(500, "The gateway failed to process the request."))

    cdef void _retry_or_fail(self, str kind, str message) except *:
        """Nothing reached the client yet: retry a stale keep-alive connection, or try another deployment."""
        cdef Exchange ex = self.ex
        self.pending_head = None
        self.out1 = self.outq = None
        self.parts = None
        self.sse = None
        self.chunked = False
        self.attempts += 1
        if kind == "stale" and self.attempts <= 2:
            self._resend(self.deployment)
            return
        if kind != "stale":
            _note_upstream_error(ex, kind)
        if (kind == "connect" or kind == "busy") and ex.route is not None:
            self.tried = (self.tried or []) + [self.deployment]
            others = [d for d in (<Route>ex.route).fallbacks(self.deployment) if d not in self.tried]
            if others:
                self._resend(others[0])
                return
        self.state = DONE
        if kind == "busy":                  # our own limit, not the upstream's fault: 503, retry soon
            err = GatewayError(503, f"The gateway's connections to the upstream are all busy: {message}.",
                               type="api_error", code="upstream_busy", headers=(("retry-after", "1"),))
        else:
            err = GatewayError(504 if kind == "timeout" else 502, f"The upstream failed: {message}.",
                               type="upstream_error", code="upstream_" + kind)
        self.client.refuse(err, False)

    cdef void _resend(self, Deployment d) except *:
        try:
            self._send(d)
        except GatewayError as err:         # this deployment's provider cannot express the request
            self._give_up(err)

    cdef void _give_up(self, object err) except *:
        """Our side (a policy, or our own code) cannot go on with this response: drop the upstream request, and
        answer `err` if nothing of the response reached the client yet, else break the response off."""
        up = self.upstream
        self.upstream = None
        if up is not None:
            up.abort()
        if self.state == DONE:
            return
        cdef Exchange ex = self.ex
        if (self.state == RELAYING or self.state == OWN_SSE_HEAD) and ex.bytes_out:
            ex.error = err.code or err.type
            self.state = DONE
            self._flush()
            self.client.break_off()
            self.client.exchange_over(ex)
        else:
            self.state = DONE
            self.out1 = self.outq = None    # nothing of this response goes out: the error answer does
            self.client.refuse(err, False)

    cdef void _done(self) except *:
        self.state = DONE
        self.client.exchange_over(self.ex)

    cdef void upstream_read_done(self) except *:
        self._flush()

    cdef inline void _emit(self, data) except *:
        """Queue bytes for the client; they go out together when this upstream read is processed, so a head,
        its events and the stream's end that arrive in one read cost one write (one syscall), not three."""
        if self.out1 is None:
            self.out1 = data                # the common case, one piece per read: no list
        elif self.outq is None:
            self.outq = [self.out1, data]
        else:
            self.outq.append(data)

    cdef void _flush(self) except *:
        data = self.out1
        if data is None:
            return
        q = self.outq
        self.out1 = self.outq = None
        client_write(self.client, data if q is None else b"".join(q))

    # -- what the client connection tells the relay ------------------------------------------------------------

    cdef void cancel(self) except *:
        """The exchange ends without this relay (the client left, or was answered otherwise): drop the upstream
        request at once; its connection cannot be reused."""
        self.state = DONE
        self.queued = False                  # leaves a pool's queue (skipped when its turn comes)
        up = self.upstream
        self.upstream = None
        if up is not None:
            up.abort()

    cdef void timed_out(self) except *:
        if self.state == ADMITTING:
            self.state = DONE
            self.client.refuse(GatewayError(504, "The request could not be admitted in time.",
                                            code="admission_timeout"), False)
            return
        if self.queued:                      # waited its queue_timeout for a connection of a full pool
            self.queued = False
            pool = <Pool>self.deployment.pool
            pool.queue_wait += now() - self.queued_at
            self.upstream_failed("busy", f"all {pool.max_connections} connections to {pool.name} stayed busy for "
                                         f"{pool.queue_timeout:g} s")
            return
        up = self.upstream
        self.upstream = None
        if up is not None:
            up.abort()
        self.upstream_failed("timeout", "no response from the upstream in time")

    cdef void keepalive_due(self, double t) except *:
        """A stream waits for its first token: keep the client's connection busy with SSE comments."""
        self.next_keepalive = t + self.gw.keepalive_interval
        if self.sse is not None and self.sse.events:
            self.next_keepalive = 0.0        # tokens are flowing: no more comments
            return
        if self.state == AWAITING_HEAD:
            # No upstream head yet: commit to a 200 SSE stream so the connection is not idle.
            head = _SSE_HEAD + b"x-request-id: " + self.ex.request_id.encode() + b"\r\n"
            if not self.client.keep_alive:
                head += b"connection: close\r\n"
            client_write(self.client, head + b"\r\n")
            self.state = OWN_SSE_HEAD
        elif not (self.state == OWN_SSE_HEAD or (self.state == RELAYING and self.sse is not None)):
            self.next_keepalive = 0.0        # a plain body is on its way: comments would corrupt it
            return
        client_write(self.client, _KEEPALIVE_EVENT)

    cdef void pause_upstream(self) except *:
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.pause_reading()

    cdef void resume_upstream(self) except *:
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.resume_reading()


cdef void _note_upstream_error(Exchange ex, str kind) except *:
    if ex.upstream_errors is None:
        ex.upstream_errors = []
    ex.upstream_errors.append((ex.upstream_name, kind))


cdef void _count_streamed(Exchange ex, SSERelay sse) except *:
    """No usage in the stream: count what streamed, and the prompt, exactly, so limits and budgets still hold.
    A stream that promised its usage ("usage": null on its chunks) and ended without it kept no text: its
    counts stay unknown (-1), so limits and budgets keep what they reserved."""
    if sse.usage_promised:
        return
    from fastgw.tokens.exact import count_prompt, count_text, encoding_for_model

    # text past the first few MB is not kept (sse.pyx MAX_TEXT): its tokens are estimated, ~4 bytes each
    ex.completion_tokens = count_text(sse.text(), encoding_for_model(ex.model)) + sse.text_skipped // 4
    ex.prompt_tokens = count_prompt(ex.body, ex.endpoint, ex.model)


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


def id_and_overhead_lines(bytes request_id, long long overhead_us):
    """_id_and_overhead_lines for tests."""
    return _id_and_overhead_lines(request_id, overhead_us)
