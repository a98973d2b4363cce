"""The parsers' memory: nothing allocated before a message needs it, a message that arrives in one read is read
where it is (never copied, never buffered) and let go when consumed, a read that leaves a message incomplete is
copied into a buffer sized to it, big buffers are given back, and the header slots grow as fields arrive.
Parsing must not depend on any of it: the same messages cut anywhere, fed as bytes, bytearray or memoryview,
give the same result."""
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from fastgw.protocol import http as H
from tests.core.http_messages import split

BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
REQUEST = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))
REPLY_BODY = b'{"id":"c","object":"chat.completion","choices":[]}'
REPLY = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
    len(REPLY_BODY), REPLY_BODY)
STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
EVENT = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
SLOTS = 5 * 8               # bytes of one header slot (five Py_ssize_t)


def fresh(data: bytes) -> bytes:
    """A bytes object of our own (not an interned or shared constant), so its reference count is ours."""
    return bytes(bytearray(data))


def next_request(p):
    """Events up to END (or ERROR / NEED_DATA); returns the last one."""
    while True:
        ev = p.next_event()
        if ev != H.HEAD:
            return ev


def whole_response(r):
    """A response's body and its last event (END, ERROR or NEED_DATA)."""
    body = b""
    while True:
        ev = r.next_event()
        if ev == H.BODY:
            body += r.take_body()
        elif ev != H.HEAD:
            return body, ev


def test_a_fresh_parser_holds_no_buffer():
    assert H.RequestParser().buffer_bytes == 0
    assert H.ResponseParser().buffer_bytes == 0


def test_a_request_in_one_read_is_read_in_place_and_let_go():
    p = H.RequestParser()
    data = fresh(REQUEST)
    refs = sys.getrefcount(data)
    p.feed(data)
    assert sys.getrefcount(data) == refs + 1          # kept, not copied
    assert next_request(p) == H.END and p.body == BODY
    assert sys.getrefcount(data) == refs              # consumed: let go at END
    # Only the head and the first header slots were allocated (the input never was): 16 KB + 12 KB before.
    assert p.buffer_bytes == 512 + 16 * SLOTS
    p.start_next()
    assert p.method == b"" and p.headers() == [] and p.buffered == 0


def test_pipelined_requests_keep_the_read_until_the_last_is_consumed():
    p = H.RequestParser()
    data = fresh(REQUEST * 2)
    refs = sys.getrefcount(data)
    p.feed(data)
    assert next_request(p) == H.END
    assert sys.getrefcount(data) == refs + 1 and p.buffered == len(REQUEST)
    p.start_next()
    assert next_request(p) == H.END and p.body == BODY
    assert sys.getrefcount(data) == refs and p.buffered == 0


def test_a_read_that_ends_mid_message_is_copied_and_let_go():
    p = H.RequestParser()
    first, second = fresh(REQUEST[:40]), fresh(REQUEST[40:])
    refs = sys.getrefcount(first)
    p.feed(first)
    assert p.next_event() == H.NEED_DATA
    p.feed(second)                                    # the rest of `first` moves to the parser's buffer
    assert sys.getrefcount(first) == refs
    assert next_request(p) == H.END and p.body == BODY
    assert p.buffer_bytes == 512 + 512 + 16 * SLOTS    # input copy, head, header slots


def test_fed_bytearray_and_memoryview_are_copied():
    p = H.RequestParser()
    data = bytearray(REQUEST)
    p.feed(data)
    data[:4] = b"XXXX"                                # the caller may reuse its buffer at once
    assert p.next_event() == H.HEAD and p.method == b"POST"
    p = H.RequestParser()
    data = bytearray(REQUEST)
    p.feed(memoryview(data))
    data[-5:] = b"#####"
    assert next_request(p) == H.END and p.body == BODY


def post(body: bytes, chunked: bool = False) -> bytes:
    if chunked:
        return (b"POST /v1/embeddings HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    return b"POST /v1/embeddings HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def test_a_buffer_a_big_message_grew_is_freed_when_it_ends():
    """An idle connection keeps at most 16 KB whatever it was sent: long prompts arrive in many reads."""
    for size, chunked in ((400_000, False), (40_000, False), (400_000, True)):
        body = b"x" * size
        p = H.RequestParser()
        for piece in split(post(body, chunked), range(0, 500_000, 16384)):   # 16 KB reads
            p.feed(piece)
        assert next_request(p) == H.END and p.body == body
        assert p.buffer_bytes < 2048 or chunked, size          # the input buffer: at the end of the message
        p.start_next()
        assert p.buffer_bytes < 2048, (size, chunked)          # the de-chunked body's: when the next one starts
        p.feed(fresh(REQUEST))
        assert next_request(p) == H.END and p.body == BODY and p.buffer_bytes < 2048
    r = H.ResponseParser()
    r.start()
    body = b"y" * 300_000
    reply = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    for piece in split(reply, range(0, 400_000, 10_000)):     # reads cut where nothing else is: a buffer grows
        r.feed(piece[:5000])
        r.feed(piece[5000:])
    assert r.buffer_bytes > 300_000
    assert whole_response(r) == (body, H.END) and r.buffer_bytes < 2048


def test_a_small_buffer_is_kept_from_message_to_message():
    """Below 16 KB the buffer stays: no allocation per message for a client whose requests arrive in pieces."""
    body = b"z" * 10_000
    p = H.RequestParser()
    for _ in range(3):
        for piece in split(post(body), [3000, 7000]):
            p.feed(piece)
        assert next_request(p) == H.END and p.body == body
        held = p.buffer_bytes
        assert held > 10_000
        p.start_next()
        assert p.buffer_bytes == held


def test_header_slots_grow_up_to_max_headers():
    fields = [(b"x-field-%d" % i, b"value %d" % i) for i in range(99)]
    head = b"GET / HTTP/1.1\r\nHost: gw\r\n" + b"".join(b"%s: %s\r\n" % f for f in fields) + b"\r\n"
    p = H.RequestParser(max_headers=100)
    p.feed(head)
    assert p.next_event() == H.HEAD and p.headers() == [(b"host", b"gw")] + fields
    assert p.header(b"x-field-98") == b"value 98"
    assert p.buffer_bytes == len(head) + 100 * SLOTS     # slots 16 -> 32 -> 64 -> 100, never beyond
    p = H.RequestParser(max_headers=99)
    p.feed(head)
    assert p.next_event() == H.ERROR and p.error_status == 431
    r = H.ResponseParser(max_headers=40)
    r.start()
    r.feed(b"HTTP/1.1 204 No Content\r\n" + b"".join(b"%s: %s\r\n" % f for f in fields[:40]) + b"\r\n")
    assert r.next_event() == H.HEAD and r.headers() == fields[:40] and r.next_event() == H.END
    r.start()
    r.feed(b"HTTP/1.1 204 No Content\r\n" + b"".join(b"%s: %s\r\n" % f for f in fields[:41]) + b"\r\n")
    assert r.next_event() == H.ERROR and "too many header fields" in r.error_message


def test_a_stream_holds_one_read_and_a_small_body_buffer():
    r = H.ResponseParser()
    r.start()
    held = fresh(STREAM_HEAD)                          # the read the parser holds now
    r.feed(held)
    assert r.next_event() == H.HEAD and r.next_event() == H.NEED_DATA
    for _ in range(50):
        data = fresh(b"%x\r\n%s\r\n" % (len(EVENT), EVENT))
        refs = sys.getrefcount(held)
        r.feed(data)                                   # the new read is held, the previous one let go
        assert sys.getrefcount(held) == refs - 1
        assert r.next_event() == H.BODY and r.take_body() == EVENT and r.next_event() == H.NEED_DATA
        held = data
    assert r.buffer_bytes == 512 + 512 + 16 * SLOTS    # head, de-chunked event, header slots
    refs = sys.getrefcount(held)
    r.feed(b"0\r\n\r\n")
    assert r.next_event() == H.END and sys.getrefcount(held) == refs - 1


def test_a_reply_in_one_read_is_let_go_at_its_end():
    r = H.ResponseParser()
    r.start()
    data = fresh(REPLY)
    refs = sys.getrefcount(data)
    r.feed(data)
    assert whole_response(r) == (REPLY_BODY, H.END)
    assert sys.getrefcount(data) == refs               # an idle pooled connection keeps no reply
    assert r.headers() == [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(REPLY_BODY))]


# -- the same messages whatever the reads ----------------------------------------------------------------------

KINDS = st.sampled_from([bytes, bytearray, memoryview])


def as_kind(kind, piece):
    return memoryview(bytes(piece)) if kind is memoryview else kind(piece)


def parse_requests(pieces):
    p = H.RequestParser()
    out = []
    for piece in pieces:
        p.feed(piece)
        while True:
            ev = p.next_event()
            if ev == H.NEED_DATA:
                break
            if ev == H.END:
                out.append((p.method, p.target, p.headers(), p.body))
                p.start_next()
            else:
                assert ev == H.HEAD
    return out, p.buffered


def parse_responses(pieces, n):
    r = H.ResponseParser()
    pieces = list(pieces)
    out = []
    for _ in range(n):
        r.start()
        body = b""
        while True:
            ev = r.next_event()
            if ev == H.NEED_DATA:
                r.feed(pieces.pop(0))
            elif ev == H.HEAD:
                head = (r.status, r.headers())
            elif ev == H.BODY:
                body += r.take_body()
            else:
                assert ev == H.END
                break
        out.append((head, body))
    return out, r.buffered


CHUNKED_REQUEST = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"5\r\nhello\r\n1a\r\n" + b"z" * 26 + b"\r\n0\r\n\r\n")
STREAM = STREAM_HEAD + b"".join(b"%x\r\n%s\r\n" % (len(EVENT), EVENT) for _ in range(5)) + b"0\r\n\r\n"


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 10**6), max_size=12), st.lists(KINDS, min_size=13, max_size=13))
def test_requests_parse_the_same_whatever_the_reads(cuts, kinds):
    data = REQUEST + CHUNKED_REQUEST + REQUEST
    pieces = [as_kind(k, piece) for k, piece in zip(kinds, split(data, cuts))]
    assert parse_requests(pieces) == parse_requests([data])
    assert parse_requests([data])[0][1][3] == b"hello" + b"z" * 26


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 10**6), max_size=12), st.lists(KINDS, min_size=13, max_size=13))
def test_responses_parse_the_same_whatever_the_reads(cuts, kinds):
    data = REPLY + STREAM + REPLY
    pieces = [as_kind(k, piece) for k, piece in zip(kinds, split(data, cuts))]
    whole = parse_responses([data], 3)
    assert parse_responses(pieces, 3) == whole
    assert whole[0][1][1] == EVENT * 5
