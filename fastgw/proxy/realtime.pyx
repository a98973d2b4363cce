# cython: language_level=3
"""GET /v1/realtime: OpenAI's Realtime API, a WebSocket session relayed both ways to one deployment.

How a session flows (each step names the method):
1. `start_realtime` (called by ClientConnection._on_request; the access phase, key-auth, ran at the head):
   checks the upgrade (GET, Upgrade: websocket, Sec-WebSocket-Version 13, a Sec-WebSocket-Key), reads `model`
   from the query and routes it, runs the request phase (request limits count the session as one request). A
   refusal here raises GatewayError, which the client connection answers as OpenAI's error JSON. Then the
   `RealtimeSession` takes the client's transport over (`set_protocol`; bytes the HTTP parser held after the
   head are the client's first frames) and replaces the client connection in `gw.connections`.
2. `_open` (a task): the rest of a request phase that waits on I/O, the deployment (`Route.pick`; OpenAI and
   Azure deployments only), a DEDICATED upstream connection (never pooled: it becomes a WebSocket; TLS as the
   deployment's pool would do it), and the upgrade request with the deployment's key, its model id, our own
   Sec-WebSocket-Key and no Sec-WebSocket-Extensions (no permessage-deflate: the frames must be readable).
3. `_upstream_head`: a 101 whose Sec-WebSocket-Accept matches our key -> the client gets its 101 (its accept
   computed from its own key) and the session is OPEN. Anything else becomes an error for the client: the
   upstream's 4xx with its error JSON, else 502 (504 when no answer came within first_byte_timeout).
4. OPEN: bytes go both ways as they come, never re-framed, with backpressure both ways (a side whose transport
   is full for writing pauses reading the other). A FrameReader (fastgw/protocol/websocket.pyx) reads the
   upstream's frames as they pass: the `response.done` events' `response.usage` input/output tokens are summed
   and charged one response at a time (`_charge_response`): the complete phase settles the response's reservation
   with its usage, then the request phase reserves for the next response, so each response counts as a request for
   request limits, and a session whose consumer has run out of its limits or budget is closed (an `error` event,
   then close frames 1008) instead of spending on until it ends. Another reader follows the client's frames, only
   to know where a frame ends (a close frame of ours may only go in between frames) and whether the client sent a
   close.
5. The end: either side's connection closing (after the close frames went through, or not) closes the other and
   ends the exchange at once (`_end`): the last reservation is settled (with nothing, if no response came since),
   and the access-log line is written with the session's totals (status 101, tokens, cost, bytes in and out). A
   client that vanishes closes the upstream at once.

Deadlines (the worker's sweeper calls check_deadline): the upgrade must be answered within the deployment's
connect + first_byte timeouts; an open session is closed (close frames 1001 both ways) after [server]
realtime_idle_timeout seconds (600) without a byte either way: not [upstream] total_timeout (a bound on one
answer), nor the HTTP idle and stream-gap timeouts: a voice session may stay quiet for minutes between turns. Drain (SIGTERM): sessions get close frames 1001 a second before the drain timeout ends.
"""
import asyncio
import socket
from urllib.parse import parse_qsl, urlencode

import orjson

from fastgw.protocol.http cimport RequestParser
from fastgw.proxy.deadlines cimport now
from fastgw.proxy.exchange cimport Exchange
from fastgw.proxy.gateway cimport Gateway
from fastgw.proxy.phases cimport refused, run_complete, run_request
from fastgw.proxy.relay cimport ClientSide
from fastgw.routing.router cimport Deployment, Route, Router

from fastgw.errors import GatewayError, Reply, model_not_found
from fastgw.protocol.http import END, ERROR, BODY, NEED_DATA, ResponseParser
from fastgw.protocol.websocket import FrameReader, accept_key, close_frame, new_key, valid_key

AZURE_REALTIME_API_VERSION = "2025-04-01-preview"   # when the deployment's api_version is not set
_NEEDLE = b'"response.done"'
# Client headers never forwarded upstream: its key (the deployment's replaces it), our request id (re-added),
# the WebSocket handshake's own fields (ours replace them; no extension is ever offered upstream).
_DROP = (b"authorization", b"api-key", b"x-api-key", b"x-request-id", b"accept-encoding", b"sec-websocket-key",
         b"sec-websocket-version", b"sec-websocket-extensions", b"sec-websocket-protocol",
         b"sec-websocket-accept")
_KEY_PROTOCOL = "openai-insecure-api-key."         # a browser's key, as a subprotocol: never forwarded
cdef Py_ssize_t _MAX_HEAD = 64 * 1024
cdef Py_ssize_t _MAX_ERROR_BODY = 1024 * 1024
cdef Py_ssize_t _EARLY_LIMIT = 1024 * 1024           # client bytes held before the upstream is open

cdef enum:
    OPENING         # request phase, picking, connecting, upgrade sent: no answer yet
    OPEN            # both upgraded: frames flow
    DONE


def start_realtime(ClientSide client, Exchange ex, RequestParser parser):
    """Check and route the upgrade request, run the request phase, and hand the connection to a session.
    Raises GatewayError (or Reply) when the request is answered here, as HTTP."""
    cdef Gateway gw = client.gw
    if ex.method != b"GET":
        raise GatewayError(405, f"Method {ex.method.decode('latin-1')} is not allowed on /v1/realtime; use GET "
                                "with a WebSocket upgrade.", code="method_not_allowed")
    upgrade = parser.header(b"upgrade")
    connection = parser.header(b"connection") or b""
    if upgrade is None or upgrade.strip().lower() != b"websocket" or b"upgrade" not in connection.lower():
        raise GatewayError(400, "/v1/realtime is a WebSocket endpoint: the request needs `Upgrade: websocket` and "
                                "`Connection: Upgrade`.", code="websocket_upgrade_required")
    version = parser.header(b"sec-websocket-version")
    if version is None or version.strip() != b"13":
        raise GatewayError(400, "Sec-WebSocket-Version must be 13.", code="invalid_websocket_version",
                           headers=(("sec-websocket-version", "13"),))
    key = parser.header(b"sec-websocket-key")
    if not valid_key(key):
        raise GatewayError(400, "Sec-WebSocket-Key must be the base64 of 16 bytes.", code="invalid_websocket_key")
    target = parser.target
    query = parse_qsl(target.partition(b"?")[2].decode("latin-1"), keep_blank_values=True)
    model = next((v for k, v in query if k == "model"), "")
    if not model:
        raise GatewayError(400, "You must provide a model parameter (GET /v1/realtime?model=...).", param="model",
                           code="missing_model")
    route = (<Router>gw.router).resolve(model)
    if route is None:
        raise model_not_found(model)
    ex.model = model
    ex.route = route
    pending = None
    if gw.request_hooks:
        try:
            pending = run_request(gw, ex)
        except GatewayError as err:
            refused(gw, ex, err)
            raise
    cdef RealtimeSession s = RealtimeSession(client, ex, key.strip(), query, parser.take_buffered())
    gw.connections.discard(client)      # the session answers the sweeper and the drain from now on
    gw.connections.add(s)
    client.transport.set_protocol(s)
    s.task = gw.loop.create_task(s._open(pending))


cdef class _UpstreamSide:
    """The upstream connection's protocol: everything goes to its session."""
    cdef RealtimeSession s
    cdef object transport

    def __init__(self, RealtimeSession s):
        self.s = s

    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data):
        self.s.upstream_data(data)

    def eof_received(self):
        return False                    # the upstream closed: so do we (connection_lost follows)

    def connection_lost(self, exc):
        self.s.upstream_lost()

    def pause_writing(self):           # the upstream reads slower than the client sends
        t = self.s.transport
        if not t.is_closing():
            t.pause_reading()

    def resume_writing(self):
        t = self.s.transport
        if not t.is_closing():
            t.resume_reading()


cdef class RealtimeSession:
    """One Realtime session: the client's protocol once it asked to upgrade, and the owner of its upstream."""
    cdef ClientSide client
    cdef Gateway gw
    cdef readonly Exchange ex
    cdef readonly object transport          # the client's (the worker's drain may abort it)
    cdef object upstream                    # the upstream's transport, once connected
    cdef Deployment d
    cdef public object task
    cdef int state
    cdef bytes client_key, our_key
    cdef list query
    cdef list early                         # client bytes that came before the session was open
    cdef Py_ssize_t early_bytes
    cdef bytes head_buf                     # the upstream's answer to the upgrade, until its head is whole
    cdef object err_parser                  # a refusal's response being read (ResponseParser)
    cdef list err_parts
    cdef Py_ssize_t err_bytes
    cdef object from_upstream, from_client  # FrameReaders
    cdef double deadline, last_active
    cdef object drain_timer
    cdef readonly long long responses
    cdef long long total_in, total_out      # the session's usage (ex holds the current response's)
    cdef double total_cost                  # what the budgets charged for the responses settled so far

    def __init__(self, ClientSide client, Exchange ex, bytes client_key, list query, bytes early):
        self.client = client
        self.gw = client.gw
        self.ex = ex
        self.transport = client.transport
        self.client_key = client_key
        self.query = query
        self.early = [early] if early else []
        self.early_bytes = len(early)
        self.state = OPENING
        self.deadline = now() + 30.0        # until the deployment's own timeouts are known
        client.closing = True               # the client connection's HTTP loop is over for this connection

    # -- opening ----------------------------------------------------------------------------------------

    async def _open(self, pending):
        cdef Exchange ex = self.ex
        try:
            if pending is not None:
                try:
                    await pending
                except GatewayError as err:
                    refused(self.gw, ex, err)
                    raise
            if self.state != OPENING:
                return
            d = self._pick()
            self.d = d
            d.started()
            ex.deployment = d
            ex.upstream_name = d.name
            ex.attempts = 1
            head = self._upgrade_request(d)
            self.deadline = now() + d.connect_timeout
            try:
                transport, _ = await asyncio.wait_for(
                    self.gw.loop.create_connection(lambda: _UpstreamSide(self), d.host, d.port, ssl=d.ssl,
                                                   server_hostname=d.server_hostname), d.connect_timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                _note(ex, d, "connect")
                raise GatewayError(502, f"The upstream failed: cannot connect to the upstream: {type(exc).__name__}.",
                                   type="upstream_error", code="upstream_connect") from None
            if self.state != OPENING:       # the client left meanwhile
                transport.abort()
                return
            self.upstream = transport
            self.head_buf = b""
            ex.t_sent = now()
            self.deadline = ex.t_sent + d.first_byte_timeout
            transport.write(head)
        except GatewayError as err:
            self._refuse(err)
        except Reply as answer:
            self._answer(answer)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.gw.log.exception("realtime session failed", request_id=ex.request_id)
            self._refuse(GatewayError(500, "The gateway failed to process the request."))

    cdef Deployment _pick(self):
        cdef Exchange ex = self.ex
        cdef Route route = <Route>ex.route
        cdef Deployment d = route.pick(ex, None)
        if d is None or (d.breaker is not None and not d.admit()):
            raise GatewayError(503, f"No deployment of model `{route.name}` can take a session now.",
                               type="api_error", code="no_available_deployment", headers=(("retry-after", "1"),))
        name = d.provider.name
        if name != "openai" and name != "azure":
            raise GatewayError(400, f"The Realtime API is not available for model `{ex.model}` (provider {name}).",
                               code="unsupported_endpoint")
        return d

    cdef bytes _upgrade_request(self, Deployment d):
        """The upgrade request to the deployment: its path and model id, its key, our WebSocket key, the client's
        other headers and query parameters, its subprotocols without a key."""
        cdef Exchange ex = self.ex
        model = d.model or ex.model
        if d.provider.name == "azure":
            base = d.base_path.removesuffix("/openai")
            api_version = d.config.api_version or AZURE_REALTIME_API_VERSION
            params = [("api-version", api_version), ("deployment", model)] + [
                (k, v) for k, v in self.query if k not in ("model", "api-version", "deployment")]
            path = base + "/openai/realtime"
        else:
            params = [("model", model)] + [(k, v) for k, v in self.query if k != "model"]
            path = d.base_path + "/realtime"
        line = b"GET " + path.encode() + b"?" + urlencode(params).encode() + b" HTTP/1.1\r\n"
        self.our_key = new_key()
        extra = [d.header_lines, b"upgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-version: 13\r\n",
                 b"sec-websocket-key: " + self.our_key + b"\r\n",
                 b"x-request-id: " + ex.request_id.encode() + b"\r\n"]
        offered = ex.header(b"sec-websocket-protocol")
        if offered is not None:
            keep = [p.strip() for p in offered.decode("latin-1").split(",")
                    if p.strip() and not p.strip().startswith(_KEY_PROTOCOL)]
            if keep:
                extra.append(b"sec-websocket-protocol: " + ", ".join(keep).encode("latin-1") + b"\r\n")
        drop = _DROP + d.own_header_names if d.own_header_names else _DROP
        return (<RequestParser>ex._parser).forward_head(line, b"".join(extra), -1, drop)

    # -- the upstream's bytes -------------------------------------------------------------------------------

    def upstream_data(self, data):
        try:
            if self.state == OPEN:
                self._relay_down(data)
            elif self.state == OPENING:
                if self.err_parser is not None:
                    self._error_body(data, False)
                else:
                    self._upstream_head(data)
        except Exception:
            self._internal("realtime relay failed")

    cdef void _upstream_head(self, bytes data) except *:
        cdef Exchange ex = self.ex
        buf = self.head_buf + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _MAX_HEAD:
                self._upstream_failed("protocol", "the upstream's answer to the upgrade has no end of head")
            else:
                self.head_buf = buf
            return
        self.head_buf = None
        head = buf[:end]
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        status = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0
        ex.t_first_byte = now()
        if status != 101:
            if not status:
                self._upstream_failed("protocol", "the upstream's answer to the upgrade is not HTTP")
                return
            # A refusal: read it whole (it may be chunked or end at close), then answer the client with it.
            p = self.err_parser = ResponseParser()
            p.start(False)
            self.err_parts = []
            self._error_body(buf, False)
            return
        fields = {}
        for ln in lines[1:]:
            name, _, value = ln.partition(b":")
            fields.setdefault(name.strip().lower(), value.strip())
        if (fields.get(b"upgrade", b"").lower() != b"websocket"
                or fields.get(b"sec-websocket-accept") != accept_key(self.our_key)):
            self._upstream_failed("protocol", "the upstream's 101 does not accept our WebSocket key")
            return
        if fields.get(b"sec-websocket-extensions"):
            self._upstream_failed("protocol", "the upstream enabled a WebSocket extension nobody offered")
            return
        self._opened(fields.get(b"sec-websocket-protocol"), buf[end + 4:])

    cdef void _opened(self, protocol, bytes rest) except *:
        """The upstream switched: answer the client's upgrade, then relay."""
        cdef Exchange ex = self.ex
        cdef Deployment d = self.d
        ex.status = 101
        d.first_byte(ex.t_first_byte - ex.t_sent)
        if d.breaker is not None:
            d.succeeded()
        lines = [b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n",
                 b"sec-websocket-accept: " + accept_key(self.client_key) + b"\r\n",
                 b"x-request-id: " + ex.request_id.encode() + b"\r\n", (<Route>ex.route).served_line]
        if protocol:
            lines.append(b"sec-websocket-protocol: " + protocol + b"\r\n")
        lines.extend(ex.response_headers)
        lines.append(b"\r\n")
        head = b"".join(lines)
        ex.bytes_out += len(head)
        self.transport.write(head)
        self.from_upstream = FrameReader(_NEEDLE)
        self.from_client = FrameReader(_NEEDLE, 0)     # boundaries and close frames only: nothing kept
        self.state = OPEN
        self.last_active = now()
        if self.early:
            early, self.early = self.early, None
            self.early_bytes = 0
            for chunk in early:
                self._relay_up(chunk)
            if not self.transport.is_closing():
                self.transport.resume_reading()
        if rest:
            self._relay_down(rest)

    cdef void _error_body(self, bytes data, bint eof) except *:
        """Read the upstream's refusal of the upgrade; answer the client with it once whole."""
        p = self.err_parser
        if eof:
            p.feed_eof()
        else:
            p.feed(data)
        while True:
            ev = p.next_event()
            if ev == BODY:
                chunk = p.take_body()
                if self.err_bytes < _MAX_ERROR_BODY:
                    self.err_parts.append(chunk)
                    self.err_bytes += len(chunk)
            elif ev == END:
                self._refused_upgrade(p.status, b"".join(self.err_parts), p.header(b"retry-after"))
                return
            elif ev == ERROR:
                self._upstream_failed("protocol", "the upstream sent an invalid response: " + p.error_message)
                return
            elif ev == NEED_DATA:
                if eof:
                    self._upstream_failed("reset", "the upstream closed the connection before the response was "
                                                   "complete")
                return

    cdef void _refused_upgrade(self, int status, bytes body, retry_after) except *:
        """The upstream answered the upgrade with `status`: its 4xx error JSON goes to the client as it is; any
        other answer is a 502."""
        cdef Exchange ex = self.ex
        cdef Deployment d = self.d
        if status == 429 or status >= 500:
            _note(ex, d, "http_%d" % status)
            if d.breaker is not None:
                d.failed("http_%d" % status)
        elif d.breaker is not None:
            d.succeeded()
        error = None
        if 400 <= status < 500:
            try:
                doc = orjson.loads(body)
                error = doc.get("error") if type(doc) is dict else None
            except orjson.JSONDecodeError:
                pass
        if type(error) is dict:
            headers = (("retry-after", retry_after.decode("latin-1")),) if retry_after else ()
            ex.error = str(error.get("code") or error.get("type") or "upstream_refused")
            self._answer(Reply(body, status, "application/json", headers))
            return
        self._refuse(GatewayError(502, f"The upstream refused the WebSocket upgrade with HTTP {status}.",
                                  type="upstream_error", code="upstream_refused"))

    cdef void _upstream_failed(self, str kind, str message) except *:
        cdef Exchange ex = self.ex
        _note(ex, self.d, kind)
        if self.d is not None and self.d.breaker is not None:
            self.d.failed(kind)
        self._refuse(GatewayError(504 if kind == "timeout" else 502, f"The upstream failed: {message}.",
                                  type="upstream_error", code="upstream_" + kind))

    # -- relaying ---------------------------------------------------------------------------------------

    cdef void _relay_down(self, bytes data) except *:
        """Upstream -> client: as it came; its response.done events counted."""
        cdef Exchange ex = self.ex
        self.last_active = now()
        ex.bytes_out += len(data)
        self.transport.write(data)
        reader = self.from_upstream
        found = reader.feed(data)
        if found is not None:
            self._count(found)
        if reader.error is not None:
            self.gw.log.warning("realtime upstream sent invalid frames", request_id=ex.request_id,
                                error=reader.error)
            _note(ex, self.d, "protocol")
            self._close_both("upstream_protocol", True)

    cdef void _count(self, list found) except *:
        cdef Exchange ex = self.ex
        for msg in found:
            try:
                event = orjson.loads(msg)
            except orjson.JSONDecodeError:
                continue
            if type(event) is not dict or event.get("type") != "response.done":
                continue
            self.responses += 1
            ex.events = <int>self.responses
            response = event.get("response")
            usage = response.get("usage") if type(response) is dict else None
            if type(usage) is not dict:
                continue
            tin, tout = usage.get("input_tokens"), usage.get("output_tokens")
            self._charge_response(tin if type(tin) is int and 0 <= tin < 2**53 else 0,
                                  tout if type(tout) is int and 0 <= tout < 2**53 else 0)
            if self.state == DONE:
                return

    cdef void _charge_response(self, long long tin, long long tout) except *:
        """A response of the session is done: charge it now, and reserve for the next one (module doc, step 4)."""
        cdef Exchange ex = self.ex
        cdef Gateway gw = self.gw
        self.total_in += tin
        self.total_out += tout
        ex.prompt_tokens, ex.completion_tokens = tin, tout
        if gw.complete_hooks:
            ex.cost = 0.0
            run_complete(gw, ex)            # settles this response's reservation with its usage
            self.total_cost += ex.cost
        ex.prompt_tokens = ex.completion_tokens = 0    # the next response's, so far
        if not gw.request_hooks:
            return
        del ex.response_headers[:]          # the 101 went out long ago: the hooks' header lines go nowhere
        try:
            pending = run_request(gw, ex)
        except GatewayError as err:
            self._spent(err)
            return
        if pending is not None:
            gw.loop.create_task(self._reserve_later(pending))

    async def _reserve_later(self, pending):
        try:
            await pending
        except GatewayError as err:
            if self.state != DONE:
                self._spent(err)
        except Exception:
            if self.state != DONE:
                self._internal("realtime reservation failed")

    cdef void _spent(self, object err):
        """The consumer's limits or budget refuse the next response: tell the client why, then close."""
        cdef Exchange ex = self.ex
        refused(self.gw, ex, err)
        ex.error = err.code or err.type
        if _between_frames(self.from_upstream):
            event = orjson.dumps({"type": "error", "event_id": f"event_fastgw_{ex.request_id}",
                                  "error": orjson.loads(err.body())["error"]})
            frame = _text_frame(event)
            ex.bytes_out += len(frame)
            self.transport.write(frame)
        self._close_both(err.code or "policy_refused", False, 1008)

    cdef void _relay_up(self, bytes data) except *:
        """Client -> upstream: as it came (the client's frames are masked, as the upstream expects)."""
        cdef Exchange ex = self.ex
        self.last_active = now()
        ex.bytes_in += len(data)
        self.upstream.write(data)
        self.from_client.feed(data)

    # -- the client's transport (this object is its protocol) -------------------------------------------

    def connection_made(self, transport):       # not called: the transport was handed over already open
        pass

    def data_received(self, data):
        try:
            if self.state == OPEN:
                self._relay_up(data)
            elif self.state == OPENING:
                # Frames sent before our 101 (allowed to pipeline): held, within a bound.
                self.early.append(data)
                self.early_bytes += len(data)
                if self.early_bytes > _EARLY_LIMIT:
                    self.transport.pause_reading()
        except Exception:
            self._internal("realtime relay failed")

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        if self.state == DONE:
            return
        cdef Exchange ex = self.ex
        if self.state == OPENING:
            # Left before the session opened: whatever is under way stops; nginx's 499.
            ex.status = 499
            self._end("client_disconnected", True)
            return
        said_bye = self.from_client is not None and self.from_client.close_code >= 0
        self._end("" if said_bye else "client_disconnected", not said_bye)

    def pause_writing(self):                   # the client reads slower than the upstream sends
        if self.upstream is not None and not self.upstream.is_closing():
            self.upstream.pause_reading()

    def resume_writing(self):
        if self.upstream is not None and not self.upstream.is_closing():
            self.upstream.resume_reading()

    def upstream_lost(self):
        if self.state == DONE:
            return
        if self.state == OPENING:
            try:
                if self.err_parser is not None:
                    self._error_body(b"", True)
                else:
                    self._upstream_failed("reset", "the upstream closed the connection before answering the "
                                                   "upgrade")
            except Exception:
                self._internal("realtime relay failed")
            return
        said_bye = self.from_upstream is not None and self.from_upstream.close_code >= 0
        if not said_bye:
            # Gone without a close frame: the client gets one from us (1014, bad gateway) where a frame may go.
            _note(self.ex, self.d, "reset")
            if _between_frames(self.from_upstream) and not self.transport.is_closing():
                frame = close_frame(1014, "the upstream went away")
                self.ex.bytes_out += len(frame)
                self.transport.write(frame)
        self._end("" if said_bye else "upstream_disconnected", False)

    # -- the end --------------------------------------------------------------------------------------------

    cdef void _refuse(self, object err) except *:
        """Answer the upgrade request with an error (nothing was switched), then close."""
        if self.state == DONE:
            return
        self.client.keep_alive = False
        self._finish()
        self.client.refuse(err, True)            # answers, then accounts (exchange_over)
        self.transport.close()

    cdef void _answer(self, object answer) except *:
        if self.state == DONE:
            return
        self.client.keep_alive = False
        self._finish()
        self.client.reply(answer)
        self.transport.close()

    cdef void _finish(self) except *:
        """Everything but the accounting: state DONE, the upstream closed, the deployment's attempt ended."""
        self.state = DONE
        self.gw.connections.discard(self)
        if self.task is not None and not self.task.done() and self.task is not asyncio.current_task():
            self.task.cancel()
        if self.drain_timer is not None:
            self.drain_timer.cancel()
            self.drain_timer = None
        up = self.upstream
        if up is not None and not up.is_closing():
            up.close()
        if self.d is not None:
            self.d.ended()

    cdef void _end(self, str error, bint abort_upstream) except *:
        """The session is over: close both sides (what was written still goes out), then account it."""
        if self.state == DONE:
            return
        cdef Exchange ex = self.ex
        if error and not ex.error:
            ex.error = error
        if self.state == OPEN and self.gw.complete_hooks:
            # The last reservation, settled with what came since the last response (nothing, usually); the access
            # log then gets the session's totals.
            ex.cost = 0.0
            run_complete(self.gw, ex)
            ex.settled = True
            ex.cost += self.total_cost
        if self.total_in or self.total_out:
            ex.prompt_tokens, ex.completion_tokens = self.total_in, self.total_out
        if abort_upstream and self.upstream is not None and not self.upstream.is_closing():
            self.upstream.abort()
        self._finish()
        if not self.transport.is_closing():
            self.transport.close()
        self.client.exchange_over(ex)

    cdef void _close_both(self, str error, bint protocol_error, int code=0) except *:
        """Our side ends an open session: a close frame each way where a frame may go, then close."""
        if code == 0:
            code = 1002 if protocol_error else 1001
        why = "limit reached" if code == 1008 else "going away"
        if _between_frames(self.from_upstream) and not protocol_error:
            frame = close_frame(code, why)
            self.ex.bytes_out += len(frame)
            self.transport.write(frame)
        if _between_frames(self.from_client) and self.upstream is not None:
            self.upstream.write(close_frame(code, why, True))
        self._end(error, False)

    cdef void _internal(self, str what):
        self.gw.log.exception(what, request_id=self.ex.request_id)
        if self.state == OPENING:
            try:
                self._refuse(GatewayError(500, "The gateway failed to process the request."))
                return
            except Exception:
                pass
        if self.upstream is not None:
            self.upstream.abort()
        self.transport.abort()
        try:
            self._end("internal_error", True)
        except Exception:
            pass

    # -- what the worker asks of a connection -----------------------------------------------------------

    def check_deadline(self, double t):
        if self.state == OPEN:
            if t - self.last_active >= self.gw.realtime_idle_timeout:
                if self.transport.get_write_buffer_size() or self.upstream.get_write_buffer_size():
                    # Nothing moved because a side stopped reading: a close would wait on it forever.
                    self.upstream.abort()
                    self.transport.abort()
                    self._end("idle_timeout", True)
                else:
                    self._close_both("idle_timeout", False)
        elif self.state == OPENING and t >= self.deadline:
            if self.upstream is not None:
                self.upstream.abort()
                self._upstream_failed("timeout", "no answer to the WebSocket upgrade in time")
            else:
                self._refuse(GatewayError(504, "The session could not be opened in time.", type="upstream_error",
                                          code="upstream_timeout"))

    def close_if_idle(self):
        """Draining: a session is never idle; it gets close frames (1001) a second before the drain ends."""
        if self.drain_timer is None and self.state != DONE:
            delay = self.gw.cfg.server.drain_timeout - 1.0 if self.gw.cfg is not None else 0.0
            self.drain_timer = self.gw.loop.call_later(delay if delay > 0 else 0.0, self._going_away)
        return False

    def _going_away(self):
        self.drain_timer = None
        if self.state == OPEN:
            self._close_both("going_away", False)
        elif self.state == OPENING:
            self._refuse(GatewayError(503, "The gateway is shutting down.", type="api_error", code="draining"))


cdef bint _between_frames(reader):
    """A frame of our own may be written to the side `reader` follows (None: nothing relayed yet)."""
    return reader is None or (reader.error is None and reader.at_boundary)


cdef void _note(Exchange ex, Deployment d, str kind) except *:
    if ex.upstream_errors is None:
        ex.upstream_errors = []
    ex.upstream_errors.append((d.name if d is not None else ex.upstream_name, kind))


cdef bytes _text_frame(bytes payload):
    """One unmasked text frame (server to client) holding `payload`."""
    cdef Py_ssize_t n = len(payload)
    if n < 126:
        head = bytes((0x81, n))
    elif n < 65536:
        head = bytes((0x81, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x81, 127)) + n.to_bytes(8, "big")
    return head + payload
