# The relay of one proxied exchange and the client side it answers to (see relay.pyx).
from fastgw.protocol.http cimport ResponseParser
from fastgw.protocol.sse cimport SSERelay
from fastgw.providers.base cimport Provider
from fastgw.proxy.exchange cimport Exchange
from fastgw.proxy.gateway cimport Gateway
from fastgw.proxy.upstream cimport UpstreamConnection, UpstreamListener
from fastgw.routing.router cimport Deployment, Route, Router
from fastgw.proxy.deadlines cimport BODY_WAIT, STREAMING, UPSTREAM_WAIT, now


# A relay's progress: one state at a time, moving only forward (ADMITTING -> ... -> DONE).
cdef enum RelayState:
    ADMITTING       # the request phase runs (policies may be awaiting I/O); nothing sent upstream
    AWAITING_HEAD   # sent (or connecting) upstream, no response head; nothing sent to the client: retryable
    HEAD_HELD       # the response head is in and held, to go out with the first body bytes: still retryable
    RELAYING        # the client has a head: body bytes or stream events flow; a failure now breaks the response
    OWN_SSE_HEAD    # our own 200 SSE head went out (keep-alive comments) before the upstream answered; an
                    # upstream refusal is collected and sent as one SSE error event
    DONE            # ended (answered, failed or cancelled); the client connection accounts it


cdef class ClientSide:
    """What a relay needs of its client connection (fastgw.proxy.client.ClientConnection extends it)."""
    cdef readonly Gateway gw
    cdef readonly object transport
    cdef object transport_write       # transport.write, looked up once: every response and stream event uses it
    cdef readonly Exchange ex
    cdef public bint closing
    cdef bint keep_alive
    cdef int wait
    cdef double deadline
    cdef Deployment limits            # the exchange's deployment when it has timeouts of its own, else None
    cdef public bint uploading        # the request's body is still coming (a streamed upload, relay.upload_*)

    cdef void pause_body(self, bint pause) except *

    cdef void exchange_over(self, Exchange ex) except *
    cdef void refuse(self, object err, bint close) except *
    cdef void reply(self, object answer) except *
    cdef void break_off(self) except *


cdef class Relay(UpstreamListener):
    cdef readonly int state
    cdef ClientSide client
    cdef Gateway gw
    cdef readonly Exchange ex
    cdef Deployment deployment
    cdef Provider provider
    cdef UpstreamConnection upstream
    cdef SSERelay sse                 # a 200 stream's per-chunk relay (the provider's); None otherwise
    cdef bint chunked                 # the client's response is chunked (a stream, or a body of unknown length)
    cdef bint strip_usage             # we asked for the stream's usage: hide that chunk from the client
    cdef object pending_head          # HEAD_HELD: the head to write before the first body bytes
    cdef object out1                  # what one upstream read produced for the client (one write per read):
    cdef list outq                    #   its first piece, and a list only once there are more
    cdef object events_tail           # stream_event hooks: the bytes of an event not complete yet
    cdef list parts                   # a non-stream body kept to read its usage (None past _MAX_KEPT)
    cdef Py_ssize_t parts_bytes
    cdef bint attempt_open            # deployment.started() was called, deployment.ended() not yet
    cdef object queued_pick           # its place in the route's queue for a deployment with a free slot
    cdef object pending_request       # (head, body) while queued for a connection of a full pool
    cdef double queued_at
    cdef readonly double next_keepalive
    # Retries and fallbacks (see _retry_or_fail): ex.route is the model being tried, visited[0] the client's.
    cdef list tried                   # deployments of ex.route tried already (None: only the current one)
    cdef list visited                 # models tried already, the client's first, once a fallback was (None before)
    cdef int route_attempts           # attempts on ex.route
    cdef int stale_resends
    cdef int attempt_id               # the current attempt: a connection opened for an older one is not used
    cdef bint holding                 # an error answer is read whole, to be replaced by another attempt
    cdef double retry_after           # seconds the held answer's retry-after asks for; -1: none
    cdef dict retry_at                # deployment -> the earliest time to try it again (its retry-after)
    cdef double deadline_at           # no attempt starts after this (the model's retry.deadline_ms); 0: none
    cdef Py_ssize_t hook_lines        # ex.response_headers before this attempt's response_headers hooks
    cdef object backoff               # the timer of the next attempt while it waits out a backoff, or None
    cdef Deployment pinned            # pass-through: the deployment that made the resource asked for, or None
    cdef bint whole                   # pass-through: a 2xx JSON list read whole to be filtered for its consumer
    cdef list cache_parts             # a stream whose answer the cache stores: its bytes so far (None: not kept)
    cdef Py_ssize_t cache_bytes
    # A streamed upload (upload_begin): its first fields read (FormPrefix) until routed, then its bytes queued
    # (up_q) until the upstream request is on a connection (up_live), then written as they come.
    cdef object form
    cdef object up_model_span         # (start, end) of the multipart `model` value in up_q[0], or None
    cdef list up_q                    # None: not an upload
    cdef Py_ssize_t up_q_bytes
    cdef long long up_total, up_limit
    cdef bint up_chunked, up_live

    cdef void start(self) except *
    cdef void _admit(self) except *
    cdef void upload_begin(self, object boundary, long long limit) except *
    cdef void upload_data(self, bytes data) except *
    cdef void upload_end(self) except *
    cdef void _upload_route(self) except *
    cdef bytes _upload_first(self, Deployment d)
    cdef void _upload_live(self, UpstreamConnection conn) except *
    cdef void _admitted(self) except *
    cdef bint _cache_lookup(self) except -1
    cdef bint _cache_answer(self, bytes entry, double similarity) except -1
    cdef void _route(self) except *
    cdef void _queue_for_deployment(self) except *
    cdef void _end_attempt(self) except *
    cdef void _send(self, Deployment d, bint same_attempt=*) except *
    cdef void _stream_events(self, data) except *
    cdef void _cache_keep(self, data) except *
    cdef void _end_stream(self) except *
    cdef bint _end_body(self) except -1
    cdef bint _holds(self, ResponseParser r) except -1
    cdef bint _fallback_left(self)
    cdef bint _replace_answer(self, int status, bytes body) except -1
    cdef Route _requested(self)
    cdef void _retry_or_fail(self, str kind, str message) except *
    cdef bint _try_again(self, str kind, double retry_after, list routes) except -1
    cdef Deployment _next(self, Route route, list tried, bint reuse)
    cdef Deployment _fallback(self, list routes)
    cdef void _clear_response(self) except *
    cdef void _resend(self, Deployment d, bint same_attempt=*) except *
    cdef void _give_up(self, object err) except *
    cdef void _done(self) except *
    cdef void _emit(self, data) except *
    cdef void _flush(self) except *
    cdef void cancel(self) except *
    cdef void timed_out(self) except *
    cdef void keepalive_due(self, double t) except *
    cdef void pause_upstream(self) except *
    cdef void resume_upstream(self) except *


cdef Relay new_relay(ClientSide client, Exchange ex)


# Inline (not methods): a write and a deadline change run several times per request.
cdef inline void client_write(ClientSide c, data) except *:
    c.ex.bytes_out += len(data)
    c.transport_write(data)


cdef inline void wait_for(ClientSide c, int what) except *:
    """`c` waits for `what` from now on, for at most its timeout; no upstream wait outlives the request's total.
    The upstream waits of a deployment with timeouts of its own (c.limits) take those."""
    c.wait = what
    cdef double d = now() + c.gw.timeouts[what]
    cdef double total
    cdef Deployment own
    if (what == UPSTREAM_WAIT or what == STREAMING) and c.ex is not None:
        own = c.limits
        if own is None:
            total = c.ex.t_start + c.gw.total_timeout
        else:
            d = now() + (own.first_byte_timeout if what == UPSTREAM_WAIT else own.stream_gap_timeout)
            total = c.ex.t_start + own.total_timeout
        if total < d:
            d = total
    c.deadline = d
