"""A raw-socket upstream that misbehaves on request: the faults the built-in mock cannot make (broken framing,
resets at chosen moments, bytes nobody asked for).

Each request names its fault in an `x-fault` header (the gateway forwards client headers); without one it gets
a valid chat completion whose id names the connection and the request on it ("chatcmpl-c3-r2"), so a test can
tell which upstream connection served it. Connections are kept alive unless the fault ends them; the server
counts the connections it accepted and those the gateway closed."""
from __future__ import annotations

import socket
import struct
import threading
import time

import orjson


def completion(cid: str) -> bytes:
    return orjson.dumps({
        "id": cid, "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})


def json_response(body: bytes, status: bytes = b"200 OK", extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % len(body)
            + extra + b"\r\n" + body)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


STREAM_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
               b"transfer-encoding: chunked\r\n\r\n")


def event(text: str) -> bytes:
    return b"data: " + orjson.dumps({"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1,
                                     "model": "gpt-4o-mini", "choices": [{"index": 0, "delta": {"content": text},
                                                                          "finish_reason": None}]}) + b"\n\n"


GOOD_EVENTS = event("Hel") + event("lo")
DONE = b"data: [DONE]\n\n"


class Request:
    def __init__(self, head: bytes, body: bytes):
        self.head = head
        self.body = body
        self.headers = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            self.headers[name.strip().lower().decode()] = value.strip().decode("latin-1")


class FaultyUpstream:
    """See the module docstring. `faults` maps an x-fault value to fn(upstream, conn, request, cid) -> keep
    (False: the connection is over, closed or reset by the fault)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.lock = threading.Lock()
        self.accepted = 0              # connections accepted
        self.closed_by_peer = 0        # connections the gateway closed (seen at a read, or at a write that failed)
        self.served = {}               # x-fault value -> ids of the connections that got it
        self.errors = []               # exceptions of the fault functions themselves (a bug in the test)
        self.stream_sent = 0           # bytes of the "endless-stream" answer sent so far
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self):
        self.stopped = True
        self.sock.close()

    def _accept(self):
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
                n = self.accepted
            threading.Thread(target=self._serve, args=(conn, n), daemon=True).start()

    def _read_request(self, conn, buf: bytes):
        while b"\r\n\r\n" not in buf:
            data = conn.recv(65536)
            if not data:
                return None, buf
            buf += data
        head, _, rest = buf.partition(b"\r\n\r\n")
        req = Request(head, b"")
        n = int(req.headers.get("content-length", "0"))
        while len(rest) < n:
            data = conn.recv(65536)
            if not data:
                return None, rest
            rest += data
        req.body = rest[:n]
        return req, rest[n:]

    def _serve(self, conn, n: int):
        buf = b""
        r = 0
        try:
            while True:
                try:
                    req, buf = self._read_request(conn, buf)
                except (ConnectionResetError, OSError):
                    req = None
                if req is None:
                    self.gone()
                    return
                r += 1
                fault = req.headers.get("x-fault", "ok")
                with self.lock:
                    self.served.setdefault(fault, []).append(n)
                try:
                    keep = FAULTS[fault](self, conn, req, f"chatcmpl-c{n}-r{r}")
                except Exception as exc:   # noqa: BLE001 - reported by the tests (up.errors), not lost in a thread
                    self.errors.append((fault, repr(exc)))
                    return
                if not keep:
                    return
        finally:
            conn.close()

    def gone(self) -> None:
        with self.lock:
            self.closed_by_peer += 1

    def conns_of(self, fault: str) -> list:
        with self.lock:
            return list(self.served.get(fault, []))


def reset(conn) -> None:
    """Close with a TCP reset, not a FIN."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def wait_closed(up, conn, req=None, cid="") -> bool:
    """Answer nothing (more) and wait until the gateway gives up on the connection; note it."""
    conn.settimeout(30)
    try:
        while conn.recv(65536):
            pass
    except OSError:
        pass
    up.gone()
    return False


def _send(data: bytes, keep: bool = True):
    def fault(up, conn, req, cid):
        conn.sendall(data)
        return keep
    return fault


def _then_reset(data: bytes):
    def fault(up, conn, req, cid):
        conn.sendall(data)
        time.sleep(0.05)            # the bytes go out before the reset
        reset(conn)
        return False
    return fault


def _trickle(data: bytes, gap: float):
    def fault(up, conn, req, cid):
        try:
            for i in range(len(data)):
                conn.sendall(data[i:i + 1])
                time.sleep(gap)
        except OSError:             # the gateway gave up and closed
            up.gone()
        return False
    return fault


def _ok(up, conn, req, cid):
    conn.sendall(json_response(completion(cid)))
    return True


def _ok_stream(up, conn, req, cid):
    conn.sendall(STREAM_HEAD + chunk(GOOD_EVENTS) + chunk(DONE) + b"0\r\n\r\n")
    return True


def _extra_response(up, conn, req, cid):
    # One answer, and right behind it (same write) a second one to a request that was never sent.
    conn.sendall(json_response(completion(cid)) + json_response(completion("chatcmpl-unasked")))
    return True


def _late_response(up, conn, req, cid):
    # One answer, then (the connection idle in the gateway's pool) another one nobody asked for.
    conn.sendall(json_response(completion(cid)))
    time.sleep(0.3)
    conn.sendall(json_response(completion("chatcmpl-unasked")))
    return True


def _endless_stream(up, conn, req, cid):
    # A stream as long as the client wants: generated as it is sent (blocking sends: while the gateway reads
    # nothing, the send waits and stream_sent stands still), until the gateway closes.
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    piece = chunk(event("x" * 1000))
    try:
        conn.sendall(STREAM_HEAD)
        while True:
            conn.sendall(piece)
            up.stream_sent += len(piece)
    except OSError:
        up.gone()
    return False


_BIG = 20 * 1024 * 1024
_HUGE_BODY = b'{"id":"chatcmpl-big","object":"chat.completion","choices":[],"padding":"' + b"x" * _BIG + b'"}'

FAULTS = {
    "ok": _ok,
    "ok-stream": _ok_stream,
    "endless-stream": _endless_stream,
    "continue-then-ok": lambda up, conn, req, cid: conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n"
                                                                + json_response(completion(cid))) or True,
    # the connection
    "reset-before": lambda up, conn, req, cid: reset(conn) or False,
    "close-before": lambda up, conn, req, cid: False,
    "reset-during": _then_reset(json_response(completion("chatcmpl-x") + b" " * 4000)[:300]),
    "reset-during-stream": _then_reset(STREAM_HEAD + chunk(GOOD_EVENTS)),
    "hang": wait_closed,
    "hang-after-head": lambda up, conn, req, cid: conn.sendall(STREAM_HEAD) or wait_closed(up, conn),
    "trickle-head": _trickle(json_response(completion("chatcmpl-t")), 0.2),
    "trickle-body": _trickle(json_response(b'{"id":"chatcmpl-t"' + b" " * 50 + b"}"), 0.15),
    # the status line and the headers
    "bad-status": _send(b"HTTP/1.1 2OO OK\r\ncontent-length: 2\r\n\r\n{}", keep=False),
    "not-http": _send(b"SSH-2.0-OpenSSH_9.6\r\n\r\n", keep=False),
    "http09": _send(completion("chatcmpl-09"), keep=False),
    "bad-header": _send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nbad header\r\n\r\n{}", keep=False),
    "bare-lf": _send(b"HTTP/1.1 200 OK\ncontent-type: application/json\ncontent-length: 2\n\n{}", keep=False),
    "obs-fold": _send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-a: b\r\n c\r\n\r\n{}", keep=False),
    "nul-in-header": _send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-a: b\x00c\r\n\r\n{}", keep=False),
    "huge-head": _send(b"HTTP/1.1 200 OK\r\n" + b"x-pad: " + b"p" * 100000 + b"\r\ncontent-length: 2\r\n\r\n{}",
                       keep=False),
    "switching": _send(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\n",
                       keep=False),
    # the body
    "not-json": _send(json_response(b"<html><body>Bad gateway</body></html>")),
    "truncated-json": _send(json_response(b'{"id":"chatcmpl-x","object":"chat.completion","choices":[{"ind')),
    "empty-200": _send(json_response(b"")),
    "json-array": _send(json_response(b"[1, 2, 3]")),
    "json-trailing": _send(json_response(completion("chatcmpl-x") + b"}")),
    "huge-body": _send(json_response(_HUGE_BODY)),
    # the framing
    "cl-short-then-close": _send(json_response(completion("chatcmpl-x"))[:-20], keep=False),
    "cl-smaller": _send(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n"
                        + completion("chatcmpl-x")),
    "cl-larger": _send(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 9999\r\n\r\n"
                       + completion("chatcmpl-x")),
    "cl-twice": _send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}", keep=False),
    "cl-signed": _send(b"HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\n{}", keep=False),
    "cl-and-chunked": _send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n"
                            b"2\r\n{}\r\n0\r\n\r\n", keep=False),
    "te-gzip": _send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n{}", keep=False),
    "chunk-bad-size": _send(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                            b"zz\r\n{}\r\n0\r\n\r\n", keep=False),
    "chunk-no-crlf": _send(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                           b"2\r\n{}XX0\r\n\r\n", keep=False),
    "chunk-huge-size": _send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nffffffffffffffffff\r\n{}", keep=False),
    "chunk-then-close": _send(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                              + chunk(completion("chatcmpl-x")[:30]), keep=False),
    "chunk-trailer-cl": _send(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                              + chunk(completion("chatcmpl-x")) + b"0\r\ncontent-length: 5\r\n\r\n", keep=False),
    # streams
    "stream-bad-chunk": _send(STREAM_HEAD + chunk(GOOD_EVENTS) + b"zz\r\n", keep=False),
    "stream-not-sse": _send(STREAM_HEAD + chunk(b"<html>not an event stream</html>") + b"0\r\n\r\n"),
    "stream-bad-json": _send(STREAM_HEAD + chunk(b"data: {not json\n\n") + b"0\r\n\r\n"),
    "stream-no-done": _send(STREAM_HEAD + chunk(GOOD_EVENTS) + b"0\r\n\r\n"),
    "stream-cut-event": _send(STREAM_HEAD + chunk(GOOD_EVENTS + b'data: {"id":"chatcmpl-s","obj') + b"0\r\n\r\n"),
    "stream-close-delimited": _send(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n" + GOOD_EVENTS,
                                    keep=False),
    # bytes nobody asked for
    "extra-response": _extra_response,
    "late-response": _late_response,
}
