"""http_response: fastgw.protocol.http.ResponseParser on any bytes from an upstream (one or more responses).

Oracles: h11 (client role) with the differential rules of tests/core/test_http_response.py, to a GET and to a
HEAD; the same events whole, in pieces and byte by byte over every response the connection carries (a
keep-alive connection is read on while it stays reusable); the head forward_head writes for the client parses
back with h11 to the status, reason and the fields it should keep.
"""
import h11

from fastgw.protocol import http as H
from tests.core.test_http_response import check_against_h11
from tests.fuzz.common import BYTEWISE_MAX, bytewise, pieces

HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
       b"proxy-authorization", b"proxy-authenticate", b"content-length"}


def one_input(data: bytes) -> None:
    for method in (b"GET", b"HEAD"):
        check_against_h11(data, pieces(data), method)
    for head_request in (False, True):
        whole = connection(data and [data], head_request)
        assert connection(pieces(data), head_request) == whole
        if len(data) <= BYTEWISE_MAX:
            assert connection(bytewise(data), head_request) == whole


def connection(reads, head_request: bool) -> list:
    """Every response on one upstream connection, as the relay reads them (the next one while the last keeps the
    connection alive), then the upstream's close: the list of what was read and how it ended."""
    r = H.ResponseParser()
    r.start(head_request=head_request)
    reads = list(reads)
    out, body, eof = [], [], False
    while True:
        ev = r.next_event()
        if ev == H.NEED_DATA:
            if reads:
                r.feed(reads.pop(0))
            elif not eof:
                r.feed_eof()            # the upstream closes: ends a close-delimited body, else an error
                eof = True
            else:
                return out + [("incomplete", r.buffered)]
        elif ev == H.HEAD:
            out.append(("head", r.status, r.reason, r.headers(), r.keep_alive))
            check_forward_head(r)
        elif ev == H.BODY:
            piece = r.take_body()
            assert piece, "BODY with nothing to take"
            body.append(piece)
        elif ev == H.END:
            out.append(("body", b"".join(body)))
            out.append(("end",))
            body = []
            if not r.keep_alive:
                return out
            r.start(head_request=head_request)
        else:
            assert ev == H.ERROR and r.error_status == 502, (ev, r.error_status)
            return out + [("error", r.error_message)]


def check_forward_head(r) -> None:
    fields = r.headers()
    listed = {t.strip(b" \t").lower() for n, v in fields if n == b"connection" for t in v.split(b",")}
    want = [(n, v) for n, v in fields if n not in HOP | listed] + [(b"content-length", b"0")]
    out = r.forward_head(b"", False, 0)
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "gw")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(out)
    resp = conn.next_event()
    assert isinstance(resp, h11.Response), resp
    assert (resp.status_code, resp.reason, list(resp.headers)) == (r.status, r.reason, want)
