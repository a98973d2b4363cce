# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The relay of one proxied exchange: admission, the upstream request, and the response back to the client.

A Relay is made per proxied request by the client connection, once its body is in. It runs the request phase,
asks the deployment's provider for the request, sends it on a pooled upstream connection, and relays the
response as the provider reads it. Its progress is one RelayState (relay.pxd), moving only forward.

Invariants:
- Nothing reaches the client before the upstream's head, except our own SSE head and keep-alive comments
  (OWN_SSE_HEAD), sent only to a stream that waits long for its first token.
- Until the client has a head (AWAITING_HEAD, HEAD_HELD) a failed attempt may be retried, and `_retry_or_fail`
  (with `_replace_answer` for an error answer read whole) is the one place that decides: a stale kept-alive
  connection on the same deployment, a refused connection on the model's other deployments, and, as the model's
  [models.retry] allows, any failure or 429/5xx answer on the next deployment by the route's balancing, then the
  fallback models. A retry is the only move back, to AWAITING_HEAD; otherwise states only move forward.
- An error answer that another attempt may replace is held whole (`holding`): none of it reaches the client
  unless it is relayed after all.
- After it (RELAYING, OWN_SSE_HEAD) a failure ends the response by closing the connection: the client sees a
  broken stream, never a made-up `[DONE]` or a clean last chunk.
- The relay ends in DONE exactly once, and then hands the exchange back (ClientSide.exchange_over or refuse),
  which accounts it.
- Every attempt is counted on its deployment for the balancing: started() when it is sent, ended() exactly
  once however it ends (answered, failed, given up, cancelled, or replaced by the next attempt); first_byte()
  when an answer (not a 429 or 5xx) begins: the head, or a stream's first event.
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
from fastgw.routing.retry cimport RetryPolicy
from fastgw.cache.cache cimport LOOKUP, REFRESH, ResponseCache

from fastgw.errors import GatewayError, Reply, model_not_found, reason
from fastgw.protocol import http as H
from fastgw.protocol.jsonpeek import peek_request, peek_response
from fastgw.protocol.multipart import FormPrefix, MultipartError
from fastgw.routing.retry import fallback_reason, retry_after_seconds
from fastgw.cache.entry import encode_json as _encode_json, encode_stream as _encode_stream

_frame = H.frame_chunk
cdef bytes _LAST_CHUNK = H.LAST_CHUNK
cdef bytes _JSON = b"content-type: application/json\r\n"
cdef bytes _SSE_TYPE = b"content-type: text/event-stream\r\ncache-control: no-cache\r\n"
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
# An upload's bytes held while its request waits for a connection; past this its client is paused.
cdef Py_ssize_t _UPLOAD_QUEUE = 1024 * 1024
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

    cdef void pause_body(self, bint pause) except *:
        """Stop (True) or resume (False) reading the request's body: an upload waits for its upstream."""
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
    client.limits = None                # the last exchange's deployment's timeouts do not apply to this one
    return r


@cython.freelist(8)
cdef class Relay(UpstreamListener):
    # -- admission ------------------------------------------------------------------------------------------

    cdef void start(self) except *:
        """Read the request's fields, route it, run the request phase, send it. Raises GatewayError (a refusal)
        or Reply (a policy answered) when the request ends here."""
        cdef Exchange ex = self.ex
        cdef Gateway gw = self.gw
        if ex.passthrough:                  # another /v1 endpoint: its own routing rules
            routed = gw.passthrough.route_json(ex)
            if type(routed) is not tuple:   # ids to look up in the shared resource map (Redis) first
                wait_for(self.client, UPSTREAM_WAIT)
                gw.loop.create_task(self._route_later(routed))
                return
            ex.route, self.pinned = routed
        else:
            f = peek_request(ex.body)
            if f is None:
                raise GatewayError(400, "We could not parse the JSON body of your request. The body must be a "
                                        "JSON object.", code="invalid_json")
            model = f.model
            if not model:
                raise GatewayError(400, "You must provide a model parameter.", param="model",
                                   code="missing_model")
            route = (<Router>gw.router).resolve(model)
            if route is None:
                raise model_not_found(model)
            ex.fields = f
            ex.model = model
            ex.stream = f.stream
            ex.client_wants_usage = f.include_usage
            ex.route = route
        self._admit()

    cdef void _admit(self) except *:
        """The request phase, then the send (routed: ex.route is set). Raises as start() does."""
        cdef Exchange ex = self.ex
        cdef Gateway gw = self.gw
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

    # -- a streamed upload: its bytes go upstream as they come, never held whole --------------------------------

    cdef void upload_begin(self, object boundary, long long limit) except *:
        """The request's body comes in pieces (upload_data, then upload_end), at most `limit` bytes. A multipart
        body's fields before its first file are read first (FormPrefix): its `model` routes it."""
        self.up_q = []
        self.up_limit = limit
        self.up_chunked = (<RequestParser>self.ex._parser).chunked
        if boundary is not None:
            self.form = FormPrefix(boundary)
        else:
            self._upload_route()

    cdef void upload_data(self, bytes data) except *:
        self.up_total += len(data)
        self.ex.bytes_in += len(data)
        if self.state == DONE:
            return                          # answered already (the connection closes after the answer)
        if self.up_total > self.up_limit:
            self._give_up(GatewayError(413, f"The request body is larger than {self.up_limit} bytes, the limit "
                                            f"of {self.ex.path}.", code="request_too_large"))
            return
        if self.state == ADMITTING or self.state == AWAITING_HEAD:
            wait_for(self.client, BODY_WAIT)   # the next piece is due within body_timeout
        if self.form is not None:
            try:
                ready = self.form.feed(data)
            except MultipartError as exc:
                self._give_up(_invalid_multipart(exc))
                return
            if ready:
                self._upload_route()
            return
        if self.up_live:
            if self.upstream is not None:
                self.upstream.transport.write(_frame(data) if self.up_chunked else data)
            return
        self.up_q.append(data)
        self.up_q_bytes += len(data)
        if self.up_q_bytes > _UPLOAD_QUEUE:   # the upstream request is not on a connection yet: wait for it
            self.client.pause_body(True)

    cdef void upload_end(self) except *:
        """The client's body is complete."""
        if self.state == DONE:
            return
        if self.form is not None:
            try:
                self.form.feed(b"", True)
            except MultipartError as exc:
                self._give_up(_invalid_multipart(exc))
                return
            self._upload_route()
            if self.state == DONE:
                return
        if self.up_live and self.upstream is not None:
            if self.up_chunked:
                self.upstream.transport.write(_LAST_CHUNK)
            self.upstream.body_open = False
        if self.state == AWAITING_HEAD:
            _wait_upstream(self)            # the upstream's answer is due from now

    cdef void _upload_route(self) except *:
        """The upload's first fields are known (or it has none): route it and admit it."""
        cdef Exchange ex = self.ex
        form = self.form
        self.form = None
        model = None
        if form is not None:
            ex.form = form.fields
            model = form.fields.get("model") or None
            self.up_q.append(form.data)
            self.up_q_bytes += len(form.data)
            self.up_model_span = form.model_span
        try:
            routed = self.gw.passthrough.route(ex, model, None)
            if type(routed) is not tuple:   # ids to look up in the shared resource map (Redis) first
                self.gw.loop.create_task(self._route_later(routed))
                return
            ex.route, self.pinned = routed
            self._admit()
        except GatewayError as err:
            if self.state == ADMITTING:
                refused(self.gw, ex, err)
            self._give_up(err)
        except Reply as answer:
            if self.state == ADMITTING:
                self.state = DONE
                self.client.reply(answer)

    cdef bytes _upload_first(self, Deployment d):
        """What the upload's request starts with: the bytes read so far (the deployment's model id in a multipart
        `model` field), framed; the queue is empty after."""
        q = self.up_q
        span = self.up_model_span
        if span is not None and d.model and q:
            first = <bytes>q[0]
            q[0] = first[:span[0]] + d.model.encode() + first[span[1]:]
        self.up_model_span = None
        data = b"".join(q)
        self.up_q = []
        self.up_q_bytes = 0
        return _frame(data) if self.up_chunked and data else data

    cdef void _upload_live(self, UpstreamConnection conn) except *:
        """The upload's request is on `conn`: what came meanwhile goes out, then every piece as it comes."""
        self.up_live = True
        conn.body_open = self.client.uploading
        if self.up_q:
            data = b"".join(self.up_q)
            self.up_q = []
            self.up_q_bytes = 0
            conn.transport.write(_frame(data) if self.up_chunked else data)
        if not self.client.uploading:
            if self.up_chunked:
                conn.transport.write(_LAST_CHUNK)
        self.client.pause_body(False)

    cdef void upstream_paused(self, bint paused) except *:
        if self.client.uploading:
            self.client.pause_body(paused)

    async def _route_later(self, pending):
        """A pass-through request naming resources this instance has not seen: routed once the shared resource
        map has answered, then admitted as start() admits."""
        try:
            routed = await pending
            if self.state == ADMITTING:
                self.ex.route, self.pinned = routed
                self._admit()
        except GatewayError as err:         # not found, another consumer's, the map unavailable; or refused
            if self.state == ADMITTING:
                self._give_up(err)
        except Reply as answer:
            if self.state == ADMITTING:
                self.state = DONE
                self.client.reply(answer)
        except Exception:
            self.gw.log.exception("request failed", request_id=self.ex.request_id)
            if self.state != DONE:
                self._give_up(GatewayError(500, "The gateway failed to process the request."))

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
        if ex.fields is not None and ex.body is not (<RequestParser>ex._parser).body:
            # a policy rewrote the body: read its fields again
            f = ex.fields = peek_request(ex.body)
            if f is None:
                raise GatewayError(500, "A policy produced an invalid request body.", code="policy_error")
        if self.gw.cache is not None and self._cache_lookup():
            return                          # answered from the cache, or its lookup (Redis) is under way
        self._route()

    # -- the response cache (fastgw.cache): after the request phase, before a deployment is picked --------------

    cdef bint _cache_lookup(self) except -1:
        """True when the cache answered the request, or its lookup is under way (then _cache_later goes on)."""
        cdef ResponseCache cache = <ResponseCache>self.gw.cache
        cdef Exchange ex = self.ex
        cdef int use = cache.decide(ex)
        if use == REFRESH and cache.semantic is not None:
            ex.cache_semantic = cache.semantic.query(ex)    # its answer is indexed (embedded in the background)
        if use != LOOKUP:
            return False
        if cache.shared:
            entry = cache.backend.get(ex.cache_key)
            if entry is not None and self._cache_answer(entry, 0.0):
                return True
            if cache.semantic is not None:
                ex.cache_semantic = cache.semantic.query(ex)
                if ex.cache_semantic is not None:      # an opted-in model: look for a similar prompt, waiting
                    self.gw.loop.create_task(self._cache_later(None))
                    return True
            cache.missed(ex)
            return False
        if cache.semantic is not None:
            ex.cache_semantic = cache.semantic.query(ex)
        self.gw.loop.create_task(self._cache_later(cache.backend.get(ex.cache_key)))
        return True

    async def _cache_later(self, pending):
        """A lookup that waits: Redis's (`pending`: a hit answers) and, after an exact miss, the semantic one (the
        prompt's embedding, then its index). Anything else (a miss, Redis or the embeddings down or slow) goes
        upstream."""
        cdef ResponseCache cache = <ResponseCache>self.gw.cache
        entry = await pending if pending is not None else None     # never raises: a failed lookup is a miss
        if self.state != ADMITTING:         # the client left, or timed out, meanwhile
            return
        try:
            if entry is not None and self._cache_answer(entry, 0.0):
                return
            q = self.ex.cache_semantic
            if q is not None:
                found = await cache.semantic.search(q)      # never raises either
                if self.state != ADMITTING:
                    return
                if found is not None:
                    key, similarity = found
                    entry = cache.backend.get(key)
                    if not cache.shared:
                        entry = await entry
                        if self.state != ADMITTING:
                            return
                    if entry is not None and self._cache_answer(entry, similarity):
                        return
                    if entry is None:       # expired or overwritten: its vector goes too
                        cache.semantic.forget(q, key)
            cache.missed(self.ex)
            self._route()
        except GatewayError as err:
            if self.state == ADMITTING:
                self.state = DONE
                self.client.refuse(err, False)
        except Exception:
            self.gw.log.exception("request failed", request_id=self.ex.request_id)
            if self.state != DONE:
                self.state = DONE
                self.client.refuse(GatewayError(500, "The gateway failed to process the request."), False)

    cdef bint _cache_answer(self, bytes entry, double similarity) except -1:
        """Answer from a cache entry: the JSON body, or the stream's events in one write. False when this client
        cannot be served from it (a miss). similarity > 0: a semantic hit's."""
        cdef ResponseCache cache = <ResponseCache>self.gw.cache
        cdef Exchange ex = self.ex
        body = cache.payload(ex, entry)
        if body is None:
            return False
        cache.hit(ex, entry, len(body), similarity)
        ex.cache_key = None
        ex.cache_semantic = None
        ex.status = 200
        extra = _id_and_overhead_lines(ex.request_id.encode(), <long long>((now() - ex.t_start) * 1e6),
                                       (<Route>ex.route).served_line)
        lines = [_SSE_TYPE if ex.stream else _JSON, extra]
        if ex.response_headers:
            lines.extend(ex.response_headers)
        if not self.client.keep_alive:
            lines.append(b"connection: close\r\n")
        if ex.stream:
            ex.t_first_token = now()
        self.state = DONE
        client_write(self.client, H.response_head(200, b"OK", lines, len(body)) + body)
        self.client.exchange_over(ex)
        return True

    cdef void _route(self) except *:
        """Pick a deployment (the pinned one, by the route's balancing, a fallback model's) and send."""
        cdef Exchange ex = self.ex
        cdef Route route = <Route>ex.route
        cdef double deadline = route.retry.deadline
        if deadline > 0.0:
            self.deadline_at = ex.t_start + deadline
        cdef Deployment d = self.pinned
        if d is not None:                   # a resource's requests go where it was made, whatever its state
            self._send(d)
            return
        d = route.pick(ex, None)
        if d is None or (d.breaker is not None and not d.admit()):
            d = self._next(route, None, False)            # a half-open probe taken meanwhile: another one
            if d is None and not route.any_full(None):   # none available (breakers open): a fallback model
                d = self._fallback(route.retry.fallbacks)
            if d is None:                                 # every one at max_concurrent: the model's queue, or 503
                self._queue_for_deployment()
                return
        self._send(d)

    cdef void _queue_for_deployment(self) except *:
        """No deployment can take the request now: wait in the route's queue (max_queue) for one with a free slot,
        at most its queue_timeout; a 503 when the queue is full or nothing would free up."""
        cdef Route route = <Route>self.ex.route
        self.queued_pick = route.wait(self.ex, self._deployment_free)
        if self.queued_pick is None:
            raise _no_deployment(route, False)
        wait_for(self.client, UPSTREAM_WAIT)
        cdef double until = now() + route.queue_timeout
        if until < self.client.deadline:
            self.client.deadline = until

    def _deployment_free(self, Deployment d):
        """Our turn in the route's queue: `d` has a slot for us."""
        self.queued_pick = None
        if self.state != ADMITTING:
            return
        try:
            self._send(d)
        except GatewayError as err:         # this deployment's provider cannot express the request
            self._give_up(err)
        except Exception:                   # runs inside another request's end: never let a bug reach it
            self.gw.log.exception("request failed", request_id=self.ex.request_id)
            self._give_up(GatewayError(500, "The gateway failed to process the request."))

    # -- the upstream request ---------------------------------------------------------------------------------

    cdef void _send(self, Deployment d, bint same_attempt=False) except *:
        """Send the request to `d` (a new attempt, unless `same_attempt`: a stale connection's resend)."""
        cdef Exchange ex = self.ex
        cdef Gateway gw = self.gw
        cdef Provider provider = <Provider>d.provider
        cdef bint add_usage = (ex.stream and (gw.needs_usage or ex.cache_key is not None) and not ex.passthrough
                               and not ex.fields.include_usage)
        self._end_attempt()                  # a retry: the attempt before it is over
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
        cdef long long length = -1
        extra = b""
        if ex.passthrough:
            line = provider.passthrough_line(ex, d)
            if self.up_q is not None:        # an upload: its first bytes now, the rest as they come
                before = self.up_q_bytes
                body = self._upload_first(d)
                if self.up_chunked:
                    extra = b"transfer-encoding: chunked\r\n"
                else:                        # the model id may have changed the length
                    length = (<RequestParser>ex._parser).content_length + len(body) - before
            else:
                body = provider.passthrough_body(ex, d.model_json)
        else:
            line = provider.request_line(ex, d.request_lines)   # first: it refuses an endpoint the provider lacks
            body = provider.request_body(ex, d.model_json, add_usage)
        ex.upstream_name = d.name
        drop = _DROP_MESSAGES if ex.messages_api else _DROP
        if d.own_header_names:               # a deployment's own `headers` replace the client's of those names
            drop = drop + d.own_header_names
        head = (<RequestParser>ex._parser).forward_head(
            line,
            d.header_lines + b"x-request-id: " + ex.request_id.encode() + b"\r\n" + extra,
            len(body) if self.up_q is None else length, drop)
        pool = d.pool                        # cached on the deployment: no Pools lookup per request
        if pool is None:
            pool = d.pool = gw.pools.get(d)
        # An upload cannot be sent again: never on an idle kept-alive connection, which may turn out stale.
        cdef UpstreamConnection conn = (<Pool>pool).acquire() if self.up_q is None else None
        self.state = AWAITING_HEAD
        d.started()                          # sent, or queued for one of its connections
        self.attempt_open = True
        if d.own_timeouts:
            self.client.limits = d
        elif self.client.limits is not None:  # a retry on a deployment without timeouts of its own
            self.client.limits = None
        if not same_attempt:
            ex.attempts += 1
            self.route_attempts += 1
        self.attempt_id += 1
        _wait_upstream(self)
        if ex.stream and gw.keepalive_interval > 0:
            self.next_keepalive = now() + gw.keepalive_interval
        ex.t_sent = now()
        if conn is not None:
            self.upstream = conn
            conn.send(self, head, body)
        elif (<Pool>pool).reserve():
            gw.loop.create_task(self._open_and_send(pool, d, head, body, self.attempt_id))
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
        _wait_upstream(self)
        conn.send(self, head, body)
        if self.up_q is not None:
            self._upload_live(conn)

    cdef void slot_ready(self) except *:
        """Our turn in the queue: a slot to open a connection in (another one closed)."""
        head, body = self.pending_request
        self.pending_request = None
        cdef Pool pool = <Pool>self.deployment.pool
        pool.queue_wait += now() - self.queued_at
        _wait_upstream(self)
        self.gw.loop.create_task(self._open_and_send(pool, self.deployment, head, body, self.attempt_id))

    async def _open_and_send(self, Pool pool, Deployment d, bytes head, bytes body, int attempt):
        try:
            conn = await (pool.open_one(d.connect_timeout) if d.own_timeouts else pool.open_one())
        except (OSError, asyncio.TimeoutError) as exc:
            if self.state != DONE and self.attempt_id == attempt:
                self.upstream_failed("connect", f"cannot connect to the upstream: {type(exc).__name__}")
            return
        # Still wanted unless the exchange ended (the client left, a timeout) or moved on to another attempt;
        # OWN_SSE_HEAD is still waiting for this connection (keep-alive comments went out meanwhile).
        if self.state == DONE or self.attempt_id != attempt:
            pool.release(conn)
            return
        self.upstream = conn
        self.ex.t_sent = now()
        conn.send(self, head, body)
        if self.up_q is not None:
            self._upload_live(conn)

    # -- the response (UpstreamListener) ---------------------------------------------------------------------

    cdef void upstream_head(self, ResponseParser r) except *:
        cdef Exchange ex = self.ex
        cdef Gateway gw = self.gw
        cdef double t = now()
        ex.t_first_byte = t
        ex.status = r.status
        if gw.response_hooks:
            # A retry's hooks add their lines again: drop those of the answer it replaced.
            if self.hook_lines:
                del ex.response_headers[self.hook_lines - 1:]
            else:
                self.hook_lines = len(ex.response_headers) + 1
            try:
                run_response_headers(gw, ex)
            except GatewayError as err:
                self._give_up(err)
                return
        if r.status >= 400 and self.state == AWAITING_HEAD and self._holds(r):
            self.holding = True
        if ex.passthrough:                  # what the answer is, it says itself: a stream, JSON, or other bytes
            ex.stream = r.status == 200 and _has_type(r, b"text/event-stream")
        if ex.stream and r.status == 200:
            self.sse = self.provider.open_stream(ex, self.strip_usage, gw.needs_usage)
            wait_for(self.client, STREAMING)
            if ex.cache_key is not None:
                self.cache_parts = []       # kept to be stored once the stream completed
        elif ex.passthrough and not _has_type(r, b"application/json"):
            self.parts = None               # audio, files' content, text: relayed as they come, never kept
            if r.status < 500 and r.status != 429:
                self.deployment.first_byte(t - ex.t_sent)
        else:
            self.parts = []
            # A list a consumer asked for is read whole, to show only that consumer's resources.
            self.whole = ex.passthrough and r.status < 300 and gw.passthrough.filters(ex)
            if r.status < 500 and r.status != 429:   # an answer, not a failure: how fast it came counts
                self.deployment.first_byte(t - ex.t_sent)
        if self.state == OWN_SSE_HEAD:      # our SSE head is out already (keep-alive comments were sent)
            self.chunked = True
            if self.sse is not None:
                self.state = RELAYING
            return                          # else the upstream refused after all: its error becomes an SSE event
        # Overhead so far: before the request was sent, plus this head's processing.
        cdef long overhead_us = <long>(((ex.t_sent - ex.t_start) + (now() - t)) * 1e6)
        extra = _id_and_overhead_lines(ex.request_id.encode(), overhead_us, (<Route>ex.route).served_line)
        if ex.response_headers:
            extra += b"".join(ex.response_headers)
        if not self.client.keep_alive:
            extra += b"connection: close\r\n"
        self.state = HEAD_HELD
        if self.sse is None and (self.provider.translates or self.whole):
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
            if self.cache_parts is not None and not self.provider.translates:
                self._cache_keep(data)      # the upstream's own bytes: its usage chunk too, even when hidden
            data = self.sse.feed(data)
            if not data:
                return
            if self.cache_parts is not None and self.provider.translates:
                self._cache_keep(data)      # what the client sees: the translation
            if ex.t_first_token == 0.0:
                ex.t_first_token = now()
                self.deployment.first_byte(ex.t_first_token - ex.t_sent)
            if self.gw.stream_event_hooks:
                try:
                    self._stream_events(data)
                except GatewayError as err:
                    self._give_up(err)
                    return
            d = now() + self.deployment.stream_gap_timeout   # its own timeouts, else [upstream]'s
            total = ex.t_start + self.deployment.total_timeout
            self.client.deadline = d if d < total else total
            self._emit(_frame(data))
            return
        parts = self.parts
        if parts is not None:
            parts.append(data)
            self.parts_bytes += len(data)
            if self.parts_bytes > _MAX_KEPT and self.state != OWN_SSE_HEAD:
                if self.provider.translates or self.holding or self.whole:
                    self._give_up(GatewayError(502, "The upstream's response is too large to translate.",
                                               type="upstream_error", code="upstream_too_large"))
                    return
                self.parts = None           # a huge body: relayed, but not kept for its usage
        if self.state == OWN_SSE_HEAD or self.provider.translates or self.holding or self.whole:
            return                          # rendered whole at the end (or replaced by another attempt)
        out = _frame(data) if self.chunked else data
        if self.pending_head is not None:
            out = self.pending_head + out
            self.pending_head = None
            self.state = RELAYING
        self._emit(out)

    cdef void _cache_keep(self, data) except *:
        """Keep a stream's bytes for the cache, up to its max_entry_bytes (past that it is not stored)."""
        self.cache_bytes += len(data)
        if self.cache_bytes > (<ResponseCache>self.gw.cache).max_entry:
            self.cache_parts = None
            return
        self.cache_parts.append(data)

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
        cdef int status = ex.status
        cdef UpstreamConnection up = self.upstream
        self.upstream = None
        self._end_attempt()
        ex.upstream_wait += now() - ex.t_sent
        if self.deployment.breaker is not None:     # (checked here: no call at all without a breaker)
            if status == 429 or status >= 500:
                self.deployment.failed(_status_kind(status))
            else:
                self.deployment.succeeded()
        try:
            if self.sse is not None:
                self._end_stream()
            elif self._end_body():
                return                      # another attempt replaces this answer
        except GatewayError as err:
            # A translating provider's refusal of a whole answer (Gemini's blocked prompt: content_filter) may
            # have a fallback like an upstream's 400; else it found the response broken or truncated.
            if self.state == HEAD_HELD and err.status == 400 and self._replace_answer(400, err.body()):
                return
            if err.status >= 500 and up is not None and up.listener is None:
                up.abort()                  # broken, truncated or not JSON: the connection it came on (back in its
                                            # pool, unless a queued request has it already) is not trusted again
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
        elif self.gw.needs_usage and not ex.passthrough:
            _count_streamed(ex, sse)
        if not (sse.done or self.provider.translates or ex.endpoint not in _ENDS_WITH_DONE):
            # The upstream ended the body before `data: [DONE]`: the client's stream is broken off too, never given
            # a clean end the upstream's lacked (a translating provider's stream checks its own end event).
            raise GatewayError(502, "The upstream's stream ended before data: [DONE].", type="upstream_error",
                               code="upstream_truncated")
        if self.cache_parts is not None:    # complete: the cache stores it (a failed or cut stream never gets here)
            if tail and self.provider.translates:
                self._cache_keep(tail)
            if self.cache_parts is not None and ex.cache_key is not None:
                (<ResponseCache>self.gw.cache).store(ex, _encode_stream(b"".join(self.cache_parts), ex.prompt_tokens,
                                                                        ex.completion_tokens))
            self.cache_parts = None
        self._emit(_LAST_CHUNK)

    cdef bint _end_body(self) except -1:
        """The end of a non-stream body; True when another attempt replaces it (nothing of it went out)."""
        cdef Exchange ex = self.ex
        parts = self.parts
        body = b"" if parts is None else parts[0] if len(parts) == 1 else b"".join(parts)
        if self.provider.translates:
            body = self.provider.response_body(ex, ex.status, body)
        cdef bint held = self.holding
        if held:
            self.holding = False
            if self._replace_answer(ex.status, body):
                return True
        if self.state == OWN_SSE_HEAD:
            out = _frame(b"data: " + body.replace(b"\n", b"") + b"\n\n") + _LAST_CHUNK
        elif self.provider.translates:
            out = H.response_head(ex.status, reason(ex.status), [_JSON, self.pending_head], len(body)) + body
            self.pending_head = None
            if ex.cache_key is not None and ex.status == 200:
                (<ResponseCache>self.gw.cache).store(ex, _encode_json(body, ex.prompt_tokens, ex.completion_tokens))
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
                if ex.cache_key is not None and ex.status == 200:
                    (<ResponseCache>self.gw.cache).store(ex, _encode_json(body, ex.prompt_tokens,
                                                                          ex.completion_tokens))
                if ex.passthrough:
                    ex.response_body = body
                    filtered = self.gw.passthrough.answered(ex, body, self.deployment, self.whole)
                    if self.whole:
                        self.whole = False
                        body = filtered if filtered is not None else body
                        self._emit(H.response_head(ex.status, reason(ex.status), [_JSON, self.pending_head],
                                                   len(body)) + body)
                        self.pending_head = None
                        return False
            if held:                        # relayed after all: the whole body goes out now
                out = ((_frame(body) if body else b"") + _LAST_CHUNK) if self.chunked else body
            else:
                out = _LAST_CHUNK if self.chunked else b""
            if self.pending_head is not None:
                out = self.pending_head + out
                self.pending_head = None
        if out:
            self._emit(out)
        return False

    cdef void upstream_failed(self, str kind, str message) except *:
        self.upstream = None
        self._end_attempt()
        if self.state == DONE:
            return
        if self.state == AWAITING_HEAD or self.state == HEAD_HELD:
            self._retry_or_fail(kind, message)
            return
        # The response had started: end it by closing, so the client sees a broken stream, not a clean end.
        cdef Exchange ex = self.ex
        _note_upstream_error(ex, kind)
        self.deployment.failed(kind)
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
        """Nothing reached the client yet: resend on a stale keep-alive connection, try again (`_try_again`), or
        answer the failure."""
        cdef Exchange ex = self.ex
        self._clear_response()
        if kind == "stale" and self.stale_resends < 2 and self.up_q is None:
            self.stale_resends += 1
            self._resend(self.deployment, True)
            return
        ex.upstream_wait += now() - ex.t_sent
        if kind != "stale":                 # a stale connection is not the upstream's failure
            _note_upstream_error(ex, kind)
            if kind != "busy":              # nor are our own pool's limits
                self.deployment.failed(kind)
        if self._try_again(kind, -1.0, None):
            return
        self.state = DONE
        if kind == "busy":                  # our own limit, not the upstream's fault: 503, retry soon
            err = GatewayError(503, f"The gateway's connections to the upstream are all busy: {message}.",
                               type="api_error", code="upstream_busy", headers=(("retry-after", "1"),))
        else:
            err = GatewayError(504 if kind == "timeout" else 502, f"The upstream failed: {message}.",
                               type="upstream_error", code="upstream_" + kind)
        self.client.refuse(err, False)

    cdef bint _holds(self, ResponseParser r) except -1:
        """Is this error answer one another attempt may replace? Then it is read whole before any of it goes out:
        a 429 or 5xx while an attempt or a fallback model is left, a 400 when the model has special fallbacks."""
        cdef int status = r.status
        cdef Route route = <Route>self.ex.route
        if status == 400:
            return route.retry.holds_400
        if status != 429 and status < 500:
            return False
        if self.deadline_at != 0.0 and now() >= self.deadline_at:
            return False
        if self.route_attempts >= route.retry.attempts and not self._fallback_left():
            return False
        self.retry_after = retry_after_seconds(r.header(b"retry-after-ms"), r.header(b"retry-after"))
        return True

    cdef bint _fallback_left(self):
        for r in self._requested().retry.fallbacks:
            if self.visited is None or r not in self.visited:
                return True
        return False

    cdef bint _replace_answer(self, int status, bytes body) except -1:
        """A held error answer is whole (`status`: the client's, a translating provider's answer translated):
        try again instead of relaying it (True), or relay it after all."""
        cdef Exchange ex = self.ex
        cdef list routes = None
        cdef double retry_after = -1.0
        if status == 400:
            reason = fallback_reason(body)
            routes = (<Route>ex.route).retry.fallback_lists(reason) if reason is not None else None
            if not routes:
                return False
            kind = "context_length_exceeded" if reason == "context_window" else "content_policy"
        elif status == 429 or status >= 500:
            kind = _status_kind(status)
            retry_after = self.retry_after
        else:
            return False
        head, chunked = self.pending_head, self.chunked
        _note_upstream_error(ex, kind)
        self._clear_response()
        if self._try_again(kind, retry_after, routes):
            return True
        ex.upstream_errors.pop()            # relayed after all: an answer, not a failed attempt
        self.pending_head, self.chunked = head, chunked
        return False

    cdef bint _try_again(self, str kind, double retry_after, list routes) except -1:
        """Start the next attempt after a failed one, if the model's retry policy, its fallbacks and the request's
        deadline allow; `routes`: the special fallbacks of a 400 that named some. False when none is left.

        An attempt goes to the next deployment by the route's balancing, one the request did not try yet first;
        back on a deployment it tried, it waits the jittered backoff, or longer when that deployment's retry-after
        asked for it (up to retry_after_cap). A connect failure moves on to an untried deployment even when no attempt
        is left (nothing reached the failed one). With none left, the fallback models, at once."""
        cdef Exchange ex = self.ex
        cdef Route route = <Route>ex.route
        cdef RetryPolicy policy = route.retry
        cdef Deployment failed = self.deployment
        cdef Deployment d = None
        cdef double delay = 0.0, t = now(), end
        if self.deadline_at != 0.0 and t >= self.deadline_at:
            return False
        if self.pinned is not None:         # a resource exists only where it was made
            return False
        if self.up_q is not None:           # an upload's bytes are gone once sent: it cannot be tried again
            return False
        if self.tried is None:
            self.tried = [failed]
        elif failed not in self.tried:
            self.tried.append(failed)
        if retry_after >= 0.0:              # not before what it asked (up to the cap), whichever attempt goes there
            if self.retry_at is None:
                self.retry_at = {}
            self.retry_at[failed] = t + (retry_after if retry_after < policy.retry_after_cap
                                         else policy.retry_after_cap)
        if routes is not None:
            d = self._fallback(routes)
        else:
            if self.route_attempts < policy.attempts:
                d = self._next(route, self.tried, True)
                if d is not None and d in self.tried:
                    delay = policy.backoff_delay(self.route_attempts)
                    if self.retry_at is not None and self.retry_at.get(d, 0.0) - t > delay:
                        delay = self.retry_at[d] - t
            elif kind == "connect" or kind == "busy":
                d = self._next(route, self.tried, False)
            if d is None:
                d = self._fallback(self._requested().retry.fallbacks)
        if d is None:
            return False
        if delay > 0.0:
            end = ex.t_start + self.gw.total_timeout
            if self.deadline_at != 0.0 and self.deadline_at < end:
                end = self.deadline_at
            if t + delay >= end:
                return False
            self.state = AWAITING_HEAD
            _wait_upstream(self)
            self.backoff = self.gw.loop.call_later(delay, self._after_backoff, d)
            return True
        self._resend(d)
        return True

    def _after_backoff(self, Deployment d):
        self.backoff = None
        if self.state == DONE:
            return
        try:
            self._resend(d)
        except Exception:
            self.gw.log.exception("retry failed", request_id=self.ex.request_id)
            self._give_up(GatewayError(500, "The gateway failed to process the request."))

    cdef Deployment _next(self, Route route, list tried, bint reuse):
        """The next deployment of `route` by its balancing, skipping `tried` and any whose breaker turned this
        request away; once every one was tried, with `reuse`, one of those again. None when none is available."""
        cdef Exchange ex = self.ex
        cdef list skip = list(tried) if tried else []
        cdef Deployment d
        while True:
            d = route.pick(ex, skip if skip else None)
            if d is None:
                if reuse and tried:
                    reuse = False
                    skip = [x for x in skip if x not in tried]
                    continue
                return None
            if d.admit():
                return d
            skip.append(d)

    cdef Route _requested(self):
        """The client's model (ex.route is another once a fallback model is being tried)."""
        return <Route>(self.visited[0] if self.visited else self.ex.route)

    cdef Deployment _fallback(self, list routes):
        """A deployment of the first of `routes` (fallback models) this request did not try yet that has one
        available; ex.route becomes that model. None when none has."""
        cdef Exchange ex = self.ex
        cdef Route r
        cdef Deployment d
        if self.visited is None:
            self.visited = [ex.route]       # the client's model: the first to move on from
        if ex.route not in self.visited:
            self.visited.append(ex.route)
        for r in routes:
            if r in self.visited:
                continue
            self.visited.append(r)
            d = self._next(r, None, False)
            if d is not None:
                self.gw.stats.fallback((<Route>ex.route).name, r.name)
                ex.route = r
                self.tried = None
                self.route_attempts = 0
                return d
        return None

    cdef void _clear_response(self) except *:
        """Forget the answer of a failed attempt (nothing of it reached the client)."""
        self.pending_head = None
        self.out1 = self.outq = None
        self.parts = None
        self.parts_bytes = 0
        self.sse = None
        self.events_tail = None
        self.chunked = False
        self.holding = False
        self.whole = False
        self.cache_parts = None
        self.cache_bytes = 0

    cdef void _resend(self, Deployment d, bint same_attempt=False) except *:
        try:
            self._send(d, same_attempt)
        except GatewayError as err:         # this deployment's provider cannot express the request
            self._give_up(err)

    cdef void _give_up(self, object err) except *:
        """Our side (a policy, or our own code) cannot go on with this response: drop the upstream request, and
        answer `err` if nothing of the response reached the client yet, else break the response off."""
        up = self.upstream
        self.upstream = None
        if up is not None:
            up.abort()
        self._end_attempt()
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

    cdef void _end_attempt(self) except *:
        """The attempt on self.deployment is over (answered, failed, given up or cancelled)."""
        if self.attempt_open:
            self.attempt_open = False
            self.deployment.ended()

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
        if self.queued_pick is not None:     # leaves the route's queue
            (<Route>self.ex.route).leave(self.queued_pick)
            self.queued_pick = None
        if self.backoff is not None:
            self.backoff.cancel()
            self.backoff = None
        up = self.upstream
        self.upstream = None
        if up is not None:
            up.abort()
        self._end_attempt()

    cdef void timed_out(self) except *:
        if self.queued_pick is not None:     # waited its queue_timeout for a deployment with a free slot
            (<Route>self.ex.route).leave(self.queued_pick)
            self.queued_pick = None
            self.state = DONE
            self.client.refuse(_no_deployment(<Route>self.ex.route, True), False)
            return
        if self.backoff is not None:         # the deadline came while the next attempt waited out its backoff
            self.backoff.cancel()
            self.backoff = None
            self.state = DONE
            self.client.refuse(GatewayError(504, "The upstream failed, and no other attempt could be made in time.",
                                            type="upstream_error", code="upstream_timeout"), False)
            return
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
        if self.backoff is not None:         # between two attempts: committing to a 200 now would end the retries
            return
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


cdef object _invalid_multipart(exc):
    return GatewayError(400, f"Invalid multipart/form-data body: {exc}.", code="invalid_multipart")


cdef bint _has_type(ResponseParser r, bytes media_type) except -1:
    """Is the response's content-type `media_type` (parameters aside, case-insensitive)?"""
    ct = r.header(b"content-type")
    return ct is not None and ct.split(b";", 1)[0].strip().lower() == media_type


cdef inline void _wait_upstream(Relay r) except *:
    """The client waits for this attempt's answer: first_byte_timeout, within the model's retry deadline."""
    wait_for(r.client, UPSTREAM_WAIT)
    if r.deadline_at != 0.0 and r.client.deadline > r.deadline_at:
        r.client.deadline = r.deadline_at


cdef str _status_kind(int status):
    """The upstream error kind of a 429 or 5xx answer (bounded: one per status)."""
    return "http_%d" % status


def _retry_in(Route route):
    """Whole seconds until a deployment of `route` lets a probe through (a 503's retry-after), at least 1."""
    waits = [d.breaker.info()["retry_in_s"] for d in route.deployments if d.breaker is not None]
    return str(max(1, int(min(waits) + 0.999))) if waits else "1"


cdef object _no_deployment(Route route, bint waited):
    """The 503 of a request no deployment of `route` could take: all at max_concurrent (with no room in its
    queue, or `waited` its queue_timeout there), or none available."""
    if waited or route.any_full(None):
        why = (f"waited {route.queue_timeout:g} s for a free slot" if waited else
               f"{route.queued} requests wait for a free slot already" if route.max_queue else
               "no request waits for a free slot (max_queue = 0)")
        return GatewayError(503, f"Every deployment of model `{route.name}` is at its max_concurrent; {why}.",
                            type="api_error", code="deployments_busy", headers=(("retry-after", "1"),))
    return GatewayError(503, f"No deployment of model `{route.name}` is available now: their circuit breakers are "
                             "open.", type="api_error", code="no_available_deployment",
                        headers=(("retry-after", _retry_in(route)),))


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


cdef bytes _id_and_overhead_lines(bytes request_id, long long overhead_us, bytes tail):
    """b"x-request-id: <id>\\r\\nx-fastgw-overhead-us: <µs>\\r\\n" + tail for every response head, written by
    hand (bytes % formatting cost ~1k instructions per request); tail: the route's x-fastgw-model line."""
    cdef const char* a = b"x-request-id: "
    cdef const char* b = b"\r\nx-fastgw-overhead-us: "
    cdef char digits[24]
    cdef int k = 0
    cdef Py_ssize_t n = len(request_id), m = len(tail), i
    cdef unsigned long long v = overhead_us if overhead_us > 0 else 0
    while True:
        digits[k] = <char>(48 + v % 10)
        k += 1
        v //= 10
        if v == 0:
            break
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 14 + n + 24 + k + 2 + m)
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
    if m:
        memcpy(o + k + 2, <const char*>tail, m)
    return out


def id_and_overhead_lines(bytes request_id, long long overhead_us, bytes tail=b""):
    """_id_and_overhead_lines for tests."""
    return _id_and_overhead_lines(request_id, overhead_us, tail)
