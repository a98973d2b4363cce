"""The mock OpenAI upstream over real sockets: the openai SDK pointed at it directly, and raw HTTP for
pipelining and the fault-injection headers."""
import asyncio
import base64
import socket
import struct
import threading
import time

import h11
import openai
import orjson
import pytest
import uvloop

from fastgw.devtools.mock import EMBEDDING_DIM, ROUTES, Routes, start_mock
from fastgw.devtools.mock.wire import JsonReply, Refusal, StreamReply, frame
from fastgw.errors import REASONS, error_body, error_type, reason

pytestmark = pytest.mark.timeout(30)


class MockThread:
    """The mock on a uvloop in a background thread (the SDK's sync client blocks the test thread)."""

    def __init__(self, **defaults):
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.call(start_mock("127.0.0.1", 0, **defaults))
        self.port = self.server.port
        self.stats = self.server.mock_stats
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def close(self):
        async def stop():
            self.server.close()
            await self.server.wait_closed()
        self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def mock():
    m = MockThread()
    yield m
    m.close()


@pytest.fixture
def client(mock):
    c = openai.OpenAI(base_url=mock.base_url, api_key="sk-test", max_retries=0, timeout=10)
    yield c
    c.close()


def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


# -- SDK ------------------------------------------------------------------------------------------------

def test_chat_non_stream(client):
    r = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert r.object == "chat.completion" and r.model == "gpt-4o-mini" and r.id
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content.startswith("Hello!")
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 14
    assert r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 14


def test_chat_model_with_special_characters(client):
    model = 'we"ird %d %(p)s \\ model'
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    assert r.model == model


def test_chat_stream_without_usage(client):
    chunks = list(client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks[1:-1]]
    assert len(content) == 14 and all(content)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)
    assert all(c.model == "gpt-4o" for c in chunks)


def test_chat_stream_with_usage(client, mock):
    with client.chat.completions.with_streaming_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True}) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        assert raw.headers["transfer-encoding"] == "chunked"
        chunks = list(raw.parse())
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 14
    assert last.usage.total_tokens == last.usage.prompt_tokens + 14
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "stop"


def test_chat_stream_chunk_count_header(client):
    chunks = list(client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
        extra_headers={"x-mock-chunks": "3"}))
    assert len(chunks) == 5  # role, 3 pieces, finish


def test_completions(client):
    r = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi")
    assert r.object == "text_completion" and r.choices[0].text and r.usage.completion_tokens == 14
    chunks = list(client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi", stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == 14


def test_embeddings_float_and_base64(client):
    r = client.embeddings.create(model="text-embedding-3-small", input=["a", "b", "c"])  # SDK asks base64
    assert [d.index for d in r.data] == [0, 1, 2]
    assert all(len(d.embedding) == EMBEDDING_DIM for d in r.data)
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens
    f = client.embeddings.create(model="text-embedding-3-small", input="a", encoding_format="float")
    assert f.data[0].embedding == pytest.approx(r.data[0].embedding)


def test_responses_non_stream_and_stream(client):
    r = client.responses.create(model="gpt-4.1-mini", input="hi")
    assert r.object == "response" and r.status == "completed"
    assert r.output_text.startswith("Hello!")
    assert r.usage.output_tokens == 14 and r.usage.total_tokens == r.usage.input_tokens + 14
    events = list(client.responses.create(model="gpt-4.1-mini", input="hi", stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == r.output_text
    assert events[-1].response.usage.output_tokens == 14
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_models(client):
    ids = [m.id for m in client.models.list()]
    assert "gpt-4o-mini" in ids


def test_status_fault_header(client):
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                       extra_headers={"x-mock-status": "429"})
    assert info.value.status_code == 429 and info.value.body["type"] == "rate_limit_error"
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="m", messages=[], extra_headers={"x-mock-status": "500"})


def test_no_usage_header(client):
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                       extra_headers={"x-mock-no-usage": "1"})
    assert r.usage is None
    chunks = list(client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}, extra_headers={"x-mock-no-usage": "1"}))
    assert all(c.usage is None for c in chunks) and chunks[-1].choices[0].finish_reason == "stop"


def test_echo_headers(client):
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                       extra_headers={"x-mock-echo-headers": "1", "x-custom": "v"})
    echoed = orjson.loads(r.choices[0].message.content)
    assert echoed["authorization"] == "Bearer sk-test" and echoed["x-custom"] == "v"


def test_echo_headers_in_a_stream_is_cut_into_its_pieces(client):
    chunks = list(client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
        extra_headers={"x-mock-echo-headers": "1", "x-custom": "streamed", "x-mock-chunks": "5"}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) == 5                             # the client must join the events to read the headers
    echoed = orjson.loads("".join(pieces))
    assert echoed["x-custom"] == "streamed" and echoed["x-mock-chunks"] == "5"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_reset_after_breaks_the_stream(client, mock):
    before = mock.stats.resets
    got = []
    with pytest.raises(openai.APIError):
        for c in client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                stream=True, extra_headers={"x-mock-reset-after": "3"}):
            got.append(c)
    assert len(got) <= 3
    assert mock.stats.resets == before + 1


def test_delays_and_slow_stream(client):
    start = time.monotonic()
    chunks = list(client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
        extra_headers={"x-mock-first-token-delay-ms": "50", "x-mock-chunk-delay-ms": "5", "x-mock-chunks": "4"}))
    assert len(chunks) == 6
    assert time.monotonic() - start >= 0.05 + 5 * 0.005  # the delays did happen (a lower bound only)
    start = time.monotonic()
    client.chat.completions.create(model="m", messages=[], extra_headers={"x-mock-delay-ms": "60"})
    assert time.monotonic() - start >= 0.06


# -- raw HTTP -------------------------------------------------------------------------------------------

def request(path=b"/v1/chat/completions", body=b'{"model":"m"}', method=b"POST", headers=b""):
    return (b"%s %s HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s"
            % (method, path, len(body), headers, body))


def read_responses(sock, count):
    """Parse `count` responses from sock with h11; returns [(status, headers dict, body)]."""
    return [(r.status_code, {k.decode(): v.decode() for k, v in r.headers}, body)
            for r, body in read_h11_responses(sock, count)]


def read_h11_responses(sock, count):
    """Parse `count` responses from sock with h11; returns [(h11.Response, body)]."""
    conn = h11.Connection(h11.CLIENT)

    def send_request():  # h11 pairs each response with a request of ours; the bytes are not sent
        conn.send(h11.Request(method="POST", target="/", headers=[("host", "x"), ("content-length", "0")]))
        conn.send(h11.EndOfMessage())

    send_request()
    out = []
    response = None
    body = b""
    while len(out) < count:
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            data = sock.recv(65536)
            conn.receive_data(data)
            if not data:
                break
            continue
        if isinstance(ev, h11.Response):
            response, body = ev, b""
        elif isinstance(ev, h11.Data):
            body += ev.data
        elif isinstance(ev, h11.EndOfMessage):
            out.append((response, body))
        elif ev is h11.PAUSED:
            conn.start_next_cycle()
            send_request()
        elif isinstance(ev, h11.ConnectionClosed):
            break
    return out


def connect(mock):
    return socket.create_connection(("127.0.0.1", mock.port), timeout=5)


def test_pipelining_keep_alive_and_errors(mock):
    with connect(mock) as s:
        s.sendall(request() + request(b"/nope") + request(body=b"{bad") +
                  request(b"/v1/models", b"", b"GET") + request(body=b'{"model":"m","stream":true}') +
                  request(headers=b"x-mock-delay-ms: 20\r\n") + request(b"/v1/embeddings", b'{"model":"e"}'))
        rs = read_responses(s, 7)
    assert [r[0] for r in rs] == [200, 404, 400, 200, 200, 200, 400]
    assert orjson.loads(rs[0][2])["object"] == "chat.completion"
    assert orjson.loads(rs[1][2])["error"]["code"] == "unknown_url"
    assert orjson.loads(rs[2][2])["error"]["type"] == "invalid_request_error"
    assert rs[4][1]["content-type"].startswith("text/event-stream")
    assert rs[4][2].endswith(b"data: [DONE]\n\n")
    assert orjson.loads(rs[5][2])["object"] == "chat.completion"  # the delayed one kept its place


def test_half_close_gets_the_delayed_answer_then_close(mock):
    with connect(mock) as s:
        s.sendall(request(headers=b"x-mock-delay-ms: 30\r\n"))
        s.shutdown(socket.SHUT_WR)
        rs = read_responses(s, 1)
        assert rs[0][0] == 200
        assert s.recv(10) == b""


def test_close_header_closes(mock):
    with connect(mock) as s:
        s.sendall(request(headers=b"x-mock-close: 1\r\n"))
        rs = read_responses(s, 1)
        assert rs[0][1]["connection"] == "close"
        assert s.recv(10) == b""  # the server closed


def test_malformed_http_gets_400_and_close(mock):
    with connect(mock) as s:
        s.sendall(b"GARBAGE\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400")


def test_stats_count_connections_and_requests(mock):
    wait_for(lambda: mock.stats.active_requests == 0)
    base_open, base_req = mock.stats.open_connections, mock.stats.requests
    s1, s2 = connect(mock), connect(mock)
    s1.sendall(request())
    read_responses(s1, 1)
    wait_for(lambda: mock.stats.open_connections == base_open + 2)
    assert mock.stats.requests == base_req + 1
    s1.close()
    s2.close()
    wait_for(lambda: mock.stats.open_connections == base_open)


def test_client_disconnect_mid_stream_stops_the_writer(mock):
    with connect(mock) as s:
        s.sendall(request(body=b'{"model":"m","stream":true}', headers=b"x-mock-chunk-delay-ms: 20\r\n"))
        assert s.recv(100).startswith(b"HTTP/1.1 200")
    wait_for(lambda: mock.stats.active_requests == 0)


def test_paced_stream_is_written_one_event_per_write(mock):
    # Real providers send a stream as one write per event; with no delay the mock writes it in one go unless
    # x-mock-paced asks for the providers' way (the perf suite's paced-stream scenarios rely on it).
    for paced, writes in ((b"", 1), (b"x-mock-paced: 1\r\n", 1 + 6 + 1)):   # head + 6 events + end
        wait_for(lambda: mock.stats.active_requests == 0)
        before = mock.stats.stream_writes
        with connect(mock) as s:
            s.sendall(request(body=b'{"model":"m","stream":true}', headers=b"x-mock-chunks: 3\r\n" + paced))
            [(status, _, body)] = read_responses(s, 1)
        assert status == 200 and body.count(b"data: ") == 6 and body.endswith(b"data: [DONE]\n\n")
        assert mock.stats.stream_writes - before == writes, paced


def test_prompt_tokens_deterministic(mock):
    body = b'{"model":"m","messages":[{"role":"user","content":"' + b"x" * 400 + b'"}]}'
    with connect(mock) as s:
        s.sendall(request(body=body) + request(body=body))
        rs = read_responses(s, 2)
    usages = [orjson.loads(r[2])["usage"] for r in rs]
    assert usages[0] == usages[1] and usages[0]["prompt_tokens"] == len(body) // 4


def test_embedding_base64_decodes_to_floats(mock):
    with connect(mock) as s:
        s.sendall(request(b"/v1/embeddings", b'{"model":"e","input":[[1,2,3]],"encoding_format":"base64"}'))
        (status, _, body), = read_responses(s, 1)
    vec = struct.unpack(f"<{EMBEDDING_DIM}f", base64.b64decode(orjson.loads(body)["data"][0]["embedding"]))
    assert status == 200 and len(vec) == EMBEDDING_DIM


def test_defaults_apply():
    m = MockThread(chunks=2)
    try:
        c = openai.OpenAI(base_url=m.base_url, api_key="k", max_retries=0)
        chunks = list(c.chat.completions.create(model="m", messages=[], stream=True))
        assert len(chunks) == 4
        c.close()
    finally:
        m.close()


def test_errors_are_rendered_by_fastgw_errors(mock):
    """The mock's status lines and error bodies are the gateway's own (fastgw.errors), so they cannot drift."""
    faults = (400, 401, 403, 404, 409, 413, 422, 429, 500, 502, 503, 504)
    with connect(mock) as s:
        s.sendall(b"".join(request(headers=b"x-mock-status: %d\r\n" % n) for n in faults)
                  + request(b"/nope") + request(body=b"{bad") + request(body=b"{}")
                  + request(method=b"GET", body=b""))
        got = read_h11_responses(s, len(faults) + 4)
    expected = [(n, f"mock error {n} (x-mock-status)", "mock_error") for n in faults] + [
        (404, "Invalid URL (POST /nope)", "unknown_url"),
        (400, "We could not parse the JSON body of your request.", "invalid_json"),
        (400, "you must provide a model parameter", "missing_model"),
        (405, "Method GET not allowed", None)]
    assert len(got) == len(expected)
    for (response, body), (status, message, code) in zip(got, expected):
        assert status in REASONS  # a reason of its own, not b"Unknown"
        assert (response.status_code, response.reason) == (status, reason(status))
        assert body == error_body(message, error_type(status), code)
    with connect(mock) as s:  # the parser's refusal, answered before the connection closes
        s.sendall(b"GARBAGE\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    assert head.startswith(b"HTTP/1.1 %d %s\r\n" % (status, reason(status)))
    assert orjson.loads(body)["error"]["type"] == error_type(status)


def test_a_wire_format_plugs_in_with_its_own_routes_and_errors():
    """The seam a new provider uses: routes (exact and by prefix) and an error function of its own, which
    also shapes its x-mock-status answers; unknown paths keep OpenAI's shape."""
    def toy_error(status, message, code=None):
        return orjson.dumps({"type": "error", "error": {"type": f"toy_{status}", "message": message}})

    def messages(req):
        if not req.body:
            raise Refusal(400, "empty", "empty_body")
        return JsonReply(200, orjson.dumps({"pieces": req.chunks, "query": req.query.decode()}))

    def generate(req):  # model in the path, as Gemini does
        model, _, verb = req.path[len(b"/toy/models/"):].partition(b":")
        return StreamReply([frame(b"data: %s %s\n\n" % (model, verb))])

    routes = Routes()
    routes.add_all(((b"POST", b"/toy/messages", messages), (b"POST", b"/toy/models/*", generate)), toy_error)
    m = MockThread(routes=routes, chunks=3)
    try:
        with connect(m) as s:
            s.sendall(request(b"/toy/messages?beta=1", b"x") + request(b"/toy/messages", b"")
                      + request(b"/toy/messages", b"x", headers=b"x-mock-status: 429\r\n")
                      + request(b"/toy/messages", b"", b"GET") + request(b"/toy/models/m1:stream", b"")
                      + request(b"/v1/chat/completions"))
            rs = read_responses(s, 6)
    finally:
        m.close()
    assert [r[0] for r in rs] == [200, 400, 429, 405, 200, 404]
    assert orjson.loads(rs[0][2]) == {"pieces": 3, "query": "beta=1"}
    assert orjson.loads(rs[1][2])["error"] == {"type": "toy_400", "message": "empty"}
    assert orjson.loads(rs[2][2])["error"]["type"] == "toy_429"
    assert orjson.loads(rs[3][2])["error"]["type"] == "toy_405"
    assert rs[4][1]["content-type"].startswith("text/event-stream") and rs[4][2] == b"data: m1 stream\n\n"
    assert rs[5][2] == error_body("Invalid URL (POST /v1/chat/completions)", "invalid_request_error",
                                  "unknown_url")


def test_routes_refuse_a_second_handler_for_the_same_method_and_path():
    with pytest.raises(ValueError):
        ROUTES.add(b"POST", b"/v1/chat/completions", lambda req: None)
