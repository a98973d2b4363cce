"""The data plane end to end: the official openai SDK and raw sockets through `fastgw serve` to the mock."""
from __future__ import annotations

import asyncio
import signal
import socket
import time

import httpx
import openai
import orjson
import pytest

from tests.conftest import require_tool
from tests.integration.conftest import model_config, raw_request, wait_for, wait_for_value

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}]}


def client(gw, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base + "/v1", api_key="sk-client-key", max_retries=0, timeout=20, **kw)


def post(port: int, body: bytes, headers: str = "", path: str = "/v1/chat/completions") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{headers}\r\n").encode() + body


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """Read one HTTP/1.1 response (content-length or chunked); bytes after it stay for the next call."""
    f = _readers.get(sock.fileno())
    if f is None:
        f = _readers[sock.fileno()] = sock.makefile("rb")
    status = int(f.readline().split()[1])
    headers = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        k, v = line.decode().split(":", 1)
        headers[k.lower()] = v.strip()
    if "content-length" in headers:
        return status, headers, f.read(int(headers["content-length"]))
    body = b""
    while True:
        size = int(f.readline().strip(), 16)
        body += f.read(size)
        f.readline()
        if size == 0:
            return status, headers, body


_readers: dict = {}


def test_sdk_sync_chat_stream_and_not(mock, start_gateway):
    gw = start_gateway(model_config(mock.url))
    c = client(gw)
    r = c.chat.completions.create(**CHAT)
    assert r.choices[0].message.content
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
    pieces = [ch.choices[0].delta.content for ch in c.chat.completions.create(**CHAT, stream=True)
              if ch.choices and ch.choices[0].delta.content]
    assert "".join(pieces) == r.choices[0].message.content
    # The client asked for usage: the usage chunk reaches it.
    chunks = list(c.chat.completions.create(**CHAT, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(pieces)


def test_sdk_other_endpoints(mock, start_gateway):
    gw = start_gateway(model_config(mock.url, name="*"))
    c = client(gw)
    emb = c.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(emb.data) == 2 and emb.usage.prompt_tokens > 0
    comp = c.completions.create(model="gpt-4o-mini", prompt="Once")
    assert comp.choices[0].text
    resp = c.responses.create(model="gpt-4o-mini", input="Hi")
    assert resp.output_text and resp.usage.output_tokens > 0
    events = [e.type for e in c.responses.create(model="gpt-4o-mini", input="Hi", stream=True)]
    assert events[-1] == "response.completed"


def test_sdk_async_100_concurrent(mock, start_gateway):
    gw = start_gateway(model_config(mock.url))

    async def run():
        c = openai.AsyncOpenAI(base_url=gw.base + "/v1", api_key="k", max_retries=0, timeout=30,
                               http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=100)))

        async def one(i):
            if i % 2:
                s = await c.chat.completions.create(**CHAT, stream=True)
                return "".join([ch.choices[0].delta.content or "" async for ch in s if ch.choices])
            r = await c.chat.completions.create(**CHAT)
            return r.choices[0].message.content

        out = await asyncio.gather(*(one(i) for i in range(100)))
        await c.close()
        return out

    out = asyncio.run(run())
    assert len(out) == 100 and len(set(out)) == 1 and out[0]
    lines = wait_for(lambda: len(l := gw.access_lines()) >= 100 and l, what="100 access log lines")
    assert sum(1 for l in lines if l["status"] == 200) == 100


def test_stream_chunks_arrive_before_the_stream_ends(mock, start_gateway):
    """Each upstream event is relayed when it arrives: no response buffering."""
    gw = start_gateway(model_config(mock.url))
    body = orjson.dumps({**CHAT, "stream": True})
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(post(gw.port, body, "x-mock-chunks: 4\r\nx-mock-chunk-delay-ms: 400\r\n"))
        t0 = time.monotonic()
        got = b""
        while b"data: {" not in got:
            got += s.recv(65536)
        first = time.monotonic() - t0
        assert b"[DONE]" not in got
        while b"[DONE]" not in got:
            got += s.recv(65536)
        total = time.monotonic() - t0
    # 6 events 400 ms apart: the first must come long before the last.
    assert total - first > 1.0


def test_curl_sees_chunks_before_the_end(mock, start_gateway):
    import subprocess

    curl = require_tool("curl")
    gw = start_gateway(model_config(mock.url))
    p = subprocess.Popen([curl, "-sN", gw.base + "/v1/chat/completions", "-H", "x-mock-chunks: 3",
                          "-H", "x-mock-chunk-delay-ms: 500", "-d", orjson.dumps({**CHAT, "stream": True})],
                         stdout=subprocess.PIPE)
    first = p.stdout.readline()
    assert first.startswith(b"data: {")
    assert p.poll() is None          # curl is still receiving: the first line came before the end
    rest = p.stdout.read()
    assert b"data: [DONE]" in rest
    assert p.wait(10) == 0


def test_keep_alive_and_pipelining_keep_order(mock, start_gateway):
    gw = start_gateway(model_config(mock.url))
    body = orjson.dumps(CHAT)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        # Keep-alive: two requests one after the other on one connection.
        for i in range(2):
            s.sendall(post(gw.port, body, f"x-request-id: ka-{i}\r\n"))
            status, headers, _ = read_response(s)
            assert status == 200 and headers["x-request-id"] == f"ka-{i}"
        # Pipelining: three requests in one write (one slow upstream answer first), responses in order.
        s.sendall(post(gw.port, body, "x-request-id: p-0\r\nx-mock-delay-ms: 300\r\n")
                  + post(gw.port, body, "x-request-id: p-1\r\n")
                  + b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-request-id: p-2\r\n\r\n")
        ids = [read_response(s)[1]["x-request-id"] for _ in range(3)]
        assert ids == ["p-0", "p-1", "p-2"]


def test_client_disconnect_mid_stream_cancels_upstream(mock, start_gateway):
    gw = start_gateway(model_config(mock.url))
    body = orjson.dumps({**CHAT, "stream": True})
    connections_before = mock.stats.connections_total
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    s.sendall(post(gw.port, body, "x-mock-chunks: 50\r\nx-mock-chunk-delay-ms: 100\r\n"))
    got = b""
    while b"data: {" not in got:
        got += s.recv(65536)
    open_during = mock.stats.open_connections
    assert open_during >= 1
    s.close()
    # The gateway aborts its upstream connection: the mock sees it close long before the 5 s stream ends.
    wait_for(lambda: mock.stats.open_connections < open_during, timeout=2.5, what="the upstream connection closed")
    assert mock.stats.connections_total == connections_before + 1      # the stream's one upstream connection
    # And the gateway still serves, over a new upstream connection (the aborted one was not put back in its pool).
    r = client(gw).chat.completions.create(**CHAT)
    assert r.choices[0].message.content
    assert mock.stats.connections_total == connections_before + 2
    assert mock.stats.requests == 2
    lines = wait_for(lambda: len(l := gw.access_lines()) >= 2 and l, what="two access log lines")
    assert any(l["status"] == 499 and l["error"] == "client_disconnected" for l in lines)


def test_upstream_reset_mid_stream_ends_without_fake_done(mock, start_gateway):
    gw = start_gateway(model_config(mock.url))
    body = orjson.dumps({**CHAT, "stream": True})
    got = raw_request(gw.port, post(gw.port, body, "x-mock-reset-after: 3\r\n"))
    assert got.startswith(b"HTTP/1.1 200")
    assert got.count(b"data: {") == 3
    assert b"[DONE]" not in got
    assert not got.endswith(b"0\r\n\r\n")      # no clean end of the chunked body either
    # The SDK sees an error, not a silently truncated answer.
    with pytest.raises((httpx.HTTPError, openai.APIError)):
        list(client(gw, default_headers={"x-mock-reset-after": "2"}).chat.completions.create(**CHAT, stream=True))


def test_upstream_timeout_and_unreachable(mock, start_gateway):
    cfg = model_config(mock.url, extra="[upstream]\nfirst_byte_timeout = 0.5\n")
    gw = start_gateway(cfg)
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        client(gw, default_headers={"x-mock-delay-ms": "3000"}).chat.completions.create(**CHAT)
    assert e.value.status_code == 504 and time.monotonic() - t0 < 2.5
    assert e.value.body["code"] == "upstream_timeout"
    # Unreachable upstream: 502, OpenAI-shaped.
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    gw2 = start_gateway(model_config(f"http://127.0.0.1:{port}/v1"))
    with pytest.raises(openai.APIStatusError) as e:
        client(gw2).chat.completions.create(**CHAT)
    assert e.value.status_code == 502 and e.value.body["code"] == "upstream_connect"


def test_upstream_errors_keep_status_and_body(mock, start_gateway):
    gw = start_gateway(model_config(mock.url))
    with pytest.raises(openai.APIStatusError) as e:
        client(gw, default_headers={"x-mock-status": "429"}).chat.completions.create(**CHAT)
    assert e.value.status_code == 429 and "error" in e.value.response.json()


def test_errors_are_openai_shaped(mock, start_gateway):
    gw = start_gateway(model_config(mock.url, extra="[server]\nmax_body_bytes = 100000\nmax_header_bytes = 4096\n"))
    h = httpx.Client(base_url=gw.base, timeout=10)

    def check(r, status, code=None):
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        if code:
            assert err["code"] == code

    check(h.get("/nope"), 404, "unknown_url")
    check(h.get("/v1/chat/completions"), 405, "method_not_allowed")
    check(h.post("/healthz"), 405)
    check(h.post("/v1/chat/completions", content=b"{not json"), 400, "invalid_json")
    check(h.post("/v1/chat/completions", json={"messages": []}), 400, "missing_model")
    check(h.post("/v1/chat/completions", json={**CHAT, "model": "no-such-model"}), 404, "model_not_found")
    check(h.post("/v1/chat/completions", content=b"{" + b" " * 200000 + b"}"), 413)
    check(h.get("/healthz", headers={"x-big": "a" * 8000}), 431)
    models = h.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["gpt-4o-mini"]


def test_smuggling_attempts_are_refused_and_closed(mock, start_gateway):
    gw = start_gateway(model_config(mock.url))
    body = orjson.dumps(CHAT)
    attacks = [
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\ncontent-length: 5\r\n\r\nabcde",
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-a: b\r\n c\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nhost: x\rx-a: b\r\n\r\n",
    ]
    for a in attacks:
        got = raw_request(gw.port, a)
        assert got.startswith(b"HTTP/1.1 400") or got.startswith(b"HTTP/1.1 501"), (a, got)
        assert got.count(b"HTTP/1.1") == 1          # nothing smuggled behind it was answered
        assert b"connection: close" in got.lower()
    # A valid request still works afterwards.
    assert raw_request(gw.port, post(gw.port, body, "connection: close\r\n")).startswith(b"HTTP/1.1 200")


def test_client_key_never_reaches_provider_and_provider_key_is_added(mock, start_gateway):
    gw = start_gateway(model_config(mock.url, key_env="TEST_PROVIDER_KEY"), env={"TEST_PROVIDER_KEY": "sk-provider"})
    r = client(gw, default_headers={"x-mock-echo-headers": "1", "x-request-id": "rid-42",
                                    "api-key": "other-client-key"})
    seen = orjson.loads(r.chat.completions.create(**CHAT).choices[0].message.content)
    seen = {k.lower(): v for k, v in seen.items()}
    assert seen["authorization"] == "Bearer sk-provider"
    assert "api-key" not in seen and "accept-encoding" not in seen
    assert seen["x-request-id"] == "rid-42"
    raw = r.chat.completions.with_raw_response.create(**CHAT)
    assert raw.headers["x-request-id"] == "rid-42"
    assert int(raw.headers["x-fastgw-overhead-us"]) >= 0
    assert "sk-provider" not in gw.ops_log() and "sk-client-key" not in gw.out_path.read_text()


def test_two_workers_both_serve_and_metrics_sum(mock, start_gateway):
    gw = start_gateway(model_config(mock.url), workers=2)
    workers = set()
    for _ in range(40):        # new connection each time: the kernel spreads them over both listeners
        r = httpx.post(gw.base + "/v1/chat/completions", json=CHAT, headers={"connection": "close"}, timeout=10)
        assert r.status_code == 200
        workers.add(r.headers["x-request-id"].split("-")[2])
    assert workers == {"0", "1"}

    def answered_200():         # each worker publishes its counters once a second: poll the sum
        text = httpx.get(gw.base + "/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("fastgw_requests_total{") and 'status="200"' in line)

    wait_for_value(answered_200, 40, what="fastgw_requests_total{status=200} summed over both workers")


def test_stream_keepalive_comments_while_waiting_for_first_token(mock, start_gateway):
    gw = start_gateway(model_config(mock.url, extra="[server]\nstream_keepalive_interval = 0.2\n"))
    body = orjson.dumps({**CHAT, "stream": True})
    got = raw_request(gw.port, post(gw.port, body, "x-mock-first-token-delay-ms: 1200\r\nconnection: close\r\n"))
    assert got.startswith(b"HTTP/1.1 200")
    assert got.count(b": keep-alive") >= 2
    assert got.index(b": keep-alive") < got.index(b"data: {")
    assert b"data: [DONE]" in got and got.endswith(b"0\r\n\r\n")


def test_expect_100_continue(mock, start_gateway):
    gw = start_gateway(model_config(mock.url))
    body = orjson.dumps(CHAT)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(post(gw.port, body, "expect: 100-continue\r\n").split(b"\r\n\r\n")[0] + b"\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(body)
        status, _, resp = read_response(s)
        assert status == 200 and orjson.loads(resp)["choices"]


def test_slow_client_gets_408_and_is_closed(mock, start_gateway):
    gw = start_gateway(model_config(mock.url, extra="[server]\nheader_timeout = 0.5\nbody_timeout = 0.5\n"))
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        t0 = time.monotonic()
        got = s.recv(65536)
        assert got.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 3
        assert s.recv(65536) == b""             # and closed


def test_sigterm_drains_open_stream(mock, start_gateway):
    gw = start_gateway(model_config(mock.url, extra="[server]\nshutdown_delay = 2.0\ndrain_timeout = 10\n"))
    body = orjson.dumps({**CHAT, "stream": True})
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    s.sendall(post(gw.port, body, "x-mock-chunks: 8\r\nx-mock-chunk-delay-ms: 250\r\n"))
    got = s.recv(65536)
    gw.signal(signal.SIGTERM)
    # Unready within the shutdown_delay, while still answering (the listener closes after it).
    wait_for(lambda: httpx.get(gw.base + "/readyz", timeout=5).status_code == 503, timeout=1.5,
             what="/readyz 503 during shutdown_delay")
    while b"0\r\n\r\n" not in got:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    s.close()
    assert b"data: [DONE]" in got               # the stream finished
    assert gw.proc.wait(15) == 0


def test_sighup_reloads_config_and_refuses_a_bad_one(mock, start_gateway):
    gw = start_gateway(model_config(mock.url))
    body = orjson.dumps({**CHAT, "stream": True})
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    s.sendall(post(gw.port, body, "x-mock-chunks: 6\r\nx-mock-chunk-delay-ms: 200\r\n"))
    got = s.recv(65536)
    gw.config_path.write_text(model_config(mock.url) + model_config(mock.url, name="new-model"))
    gw.signal(signal.SIGHUP)
    wait_for(lambda: "new-model" in httpx.get(gw.base + "/v1/models").text, what="new-model in /v1/models")
    while b"0\r\n\r\n" not in got:              # the stream in flight was not dropped
        got += s.recv(65536)
    assert b"data: [DONE]" in got
    s.close()
    gw.config_path.write_text("[server]\nport = 'not a port'\n")
    gw.signal(signal.SIGHUP)
    wait_for(lambda: "config reload refused" in gw.ops_log(), what="config reload refused")
    assert "new-model" in httpx.get(gw.base + "/v1/models").text


def test_embedded_default_serves_without_keys(start_gateway):
    gw = start_gateway()
    r = client(gw).chat.completions.create(**CHAT)
    assert r.choices[0].message.content
    assert httpx.get(gw.base + "/healthz").json() == {"status": "ok"}


def test_upstream_flag_needs_no_config(mock, start_gateway):
    gw = start_gateway(args=("--upstream", mock.url))
    r = client(gw).chat.completions.create(model="anything-at-all", messages=[{"role": "user", "content": "x"}])
    assert r.model == "anything-at-all"


def test_model_name_rewrite_reaches_the_provider(mock, start_gateway):
    cfg = model_config(mock.url, name="fast").replace('url = ', 'model = "gpt-4o-mini-2024-07-18"\nurl = ')
    gw = start_gateway(cfg)
    r = client(gw).chat.completions.create(model="fast", messages=CHAT["messages"])
    assert r.model == "gpt-4o-mini-2024-07-18"         # the mock answers with the model it was asked for
    chunks = list(client(gw).chat.completions.create(model="fast", messages=CHAT["messages"], stream=True))
    assert chunks[0].model == "gpt-4o-mini-2024-07-18"


def test_stream_gap_and_total_timeouts_cut_a_stalled_stream(mock, start_gateway):
    gw = start_gateway(model_config(mock.url, extra="[upstream]\nstream_gap_timeout = 0.5\ntotal_timeout = 30\n"))
    body = orjson.dumps({**CHAT, "stream": True})
    t0 = time.monotonic()
    got = raw_request(gw.port, post(gw.port, body, "x-mock-chunks: 3\r\nx-mock-chunk-delay-ms: 3000\r\n"))
    assert got.startswith(b"HTTP/1.1 200") and b"[DONE]" not in got and not got.endswith(b"0\r\n\r\n")
    assert time.monotonic() - t0 < 2.5                  # cut after the 0.5 s gap, not after 9 s of slow chunks
    gw2 = start_gateway(model_config(mock.url, extra="[upstream]\nstream_gap_timeout = 5\ntotal_timeout = 1.0\n"))
    t0 = time.monotonic()
    got = raw_request(gw2.port, post(gw2.port, body, "x-mock-chunks: 20\r\nx-mock-chunk-delay-ms: 300\r\n"))
    assert b"data: {" in got and b"[DONE]" not in got
    assert time.monotonic() - t0 < 3                    # the total timeout ends it, though chunks keep coming


def test_https_upstream_with_a_private_ca(tmp_path, start_gateway):
    import trustme

    from tests.integration.conftest import MockThread

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server_ctx = __import__("ssl").create_default_context(__import__("ssl").Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    m = MockThread(ssl=server_ctx)
    try:
        ca_file = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        url = f"https://127.0.0.1:{m.port}/v1"
        gw = start_gateway(model_config(url).replace('url = ', f'ca_file = "{ca_file}"\nurl = '))
        assert client(gw).chat.completions.create(**CHAT).choices[0].message.content
        # Without the CA the certificate is not trusted: 502, never an unverified connection.
        gw2 = start_gateway(model_config(url))
        with pytest.raises(openai.APIStatusError) as e:
            client(gw2).chat.completions.create(**CHAT)
        assert e.value.status_code == 502
    finally:
        m.stop()


def test_a_client_that_half_closes_has_left_and_its_upstream_request_is_cancelled(mock, start_gateway):
    """A FIN while the request is in flight is a client that left (a close and a half-close look the same on the
    wire; nginx decides so too): the upstream request is cancelled at once, not paid for and answered to nobody."""
    gw = start_gateway(model_config(mock.url))
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(post(gw.port, orjson.dumps(CHAT), "x-mock-delay-ms: 3000\r\nx-request-id: half\r\n"))
        wait_for(lambda: mock.stats.active_requests == 1, what="the request at the mock")
        s.shutdown(socket.SHUT_WR)
        wait_for(lambda: mock.stats.active_requests == 0, timeout=1.0, what="the upstream request cancelled")
        try:
            assert s.recv(65536) == b""
        except ConnectionResetError:
            pass
    line = wait_for(lambda: [x for x in gw.access_lines() if x["request_id"] == "half"], what="its access line")[0]
    assert line["status"] == 499 and line["error"] == "client_disconnected"


def test_query_strings_do_not_change_the_route(mock, start_gateway):
    # The path is the target up to '?': clients that add a query (Azure-style api-version, probes with a
    # cache-buster) reach the same endpoint; the path in an error message is the path, as received.
    gw = start_gateway(model_config(mock.url))
    h = httpx.Client(base_url=gw.base, timeout=10)
    assert h.post("/v1/chat/completions?api-version=2024-10-21", json=CHAT).json()["object"] == "chat.completion"
    assert h.get("/healthz?probe=1").json() == {"status": "ok"}
    assert h.get("/v1/models?").status_code == 200
    r = h.get("/caf\xe9?x=?y".encode("latin-1").decode("latin-1"))
    assert r.status_code == 404 and r.json()["error"]["message"] == "Unknown request URL: GET /caf%C3%A9."
    # Below /v1/ every path is passed through (issue 15): the upstream (the mock) says it does not know it.
    r = h.get("/v1/caf\xe9?x=?y".encode("latin-1").decode("latin-1"))
    assert r.status_code == 404 and r.json()["error"]["message"] == "Invalid URL (GET /v1/caf%C3%A9)"
