"""http_request: fastgw.protocol.http.RequestParser on any bytes (one or more pipelined requests).

Oracles: h11 with the differential rules of tests/core/test_http_request.py (accepted requests parse as h11
parses them; a refusal is h11's or one of the documented STRICTER ones); the same outcome whole, in pieces and
byte by byte, and with the bodies streamed (stream_body(), as uploads are read); smaller limits only ever turn the outcome into a 431/413 after the same messages; the head
forward_head writes for each accepted request parses back (h11 and our parser) to the fields it should keep.
"""
import h11

from fastgw.protocol import http as H
from tests.core.test_http_request import check_against_h11, ours_requests
from tests.fuzz.common import BYTEWISE_MAX, bytewise, pieces

SMALL = dict(max_head_bytes=96, max_headers=4, max_body_bytes=24)
HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
       b"proxy-authorization", b"proxy-authenticate", b"host", b"content-length", b"expect"}
DROP = frozenset({b"authorization", b"x-api-key"})


def one_input(data: bytes) -> None:
    check_against_h11(data, pieces(data))
    whole = ours_requests([data])
    if len(data) <= BYTEWISE_MAX:
        assert ours_requests(bytewise(data)) == whole
    # Bodies handed out in BODY events (uploads) join to the same messages, with the same errors and limits
    # (a message cut short reads "ok" or "incomplete" depending on whether its body bytes were handed out).
    same_when_streamed(ours_requests(pieces(data), True, max_stream_bytes=16 * 1024 * 1024), whole)
    same_when_streamed(ours_requests([data], True, max_stream_bytes=24, **SMALL), ours_requests([data], **SMALL))
    check_limits(data, whole)
    check_forward_heads(data)


def same_when_streamed(streamed, whole) -> None:
    assert streamed[0] == whole[0], "a streamed body changed the messages"
    assert streamed[1] == whole[1] or {streamed[1], whole[1]} <= {"ok", "incomplete"}, (streamed[1], whole[1])


def check_limits(data: bytes, whole) -> None:
    small = ours_requests([data], **SMALL)
    assert ours_requests(pieces(data), **SMALL) == small, "feeding in pieces changed the outcome"
    if small != whole:
        msgs, verdict = small
        assert isinstance(verdict, tuple) and verdict[1] in (413, 431), (small, whole)
        assert whole[0][:len(msgs)] == msgs


def check_forward_heads(data: bytes) -> None:
    p = H.RequestParser()
    p.feed(data)
    while True:
        ev = p.next_event()
        if ev == H.HEAD:
            check_forward_head(p)
        elif ev == H.END:
            p.start_next()
        else:
            return


def check_forward_head(p) -> None:
    fields = p.headers()
    out = p.forward_head(b"POST /v1/chat/completions HTTP/1.1\r\n", b"host: up\r\n", 0, DROP)
    listed = {t.strip(b" \t").lower() for n, v in fields if n == b"connection" for t in v.split(b",")}
    kept = [(n, v) for n, v in fields if n not in HOP | listed | DROP]
    want = kept + [(b"host", b"up"), (b"content-length", b"0")]
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(out)
    req = conn.next_event()
    assert isinstance(req, h11.Request), req
    assert list(req.headers) == want
    q = H.RequestParser()
    q.feed(out)
    assert q.next_event() == H.HEAD and q.headers() == want and q.next_event() == H.END
