"""GET /v1/realtime through the running gateway (fastgw/proxy/realtime.pyx) to the mock's Realtime API
(fastgw/devtools/mock/realtime.py): the openai SDK's realtime client, key-auth at the upgrade, usage from
response.done in the access log and metrics, refused upgrades, a client that vanishes, a large fragmented
message, and the drain's close frame."""
from __future__ import annotations

import base64
import os
import signal
import socket

import httpx
import openai
import orjson
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

from fastgw.devtools.mock.wire import pieces
from fastgw.policies.auth.policy import hash_key
from tests.integration.conftest import model_config, wait_for

KEY = "sk-alice-realtime-key"


def auth_config(mock_url: str, tmp_path, extra: str = "") -> str:
    d = tmp_path / "policies"
    d.mkdir(exist_ok=True)
    (d / "10-auth.toml").write_text(
        f'policy = "key-auth"\n[[consumers]]\nname = "alice"\nkeys = ["{hash_key(KEY)}"]\n')
    return model_config(mock_url, extra=f'policies_dir = "{d}"\n{extra}', name="*")


def ws_url(gw, model="gpt-realtime") -> str:
    return f"ws://127.0.0.1:{gw.port}/v1/realtime?model={model}"


def access_line(gw, path="/v1/realtime", n=1):
    lines = wait_for(lambda: [x for x in gw.access_lines() if x["path"] == path] if len(
        [x for x in gw.access_lines() if x["path"] == path]) >= n else None, what="access log line")
    return lines[n - 1]


def metric(gw, name: str, **labels) -> float:
    total = 0.0
    for line in httpx.get(gw.base + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def upgrade_request(path="/v1/realtime?model=gpt-realtime", method="GET", extra=b"", key=b"dGhlIHNhbXBsZSBub25jZQ==",
                    version=b"13", upgrade=True) -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: x"]
    if upgrade:
        lines += [b"Upgrade: websocket", b"Connection: Upgrade"]
    if key is not None:
        lines.append(b"Sec-WebSocket-Key: " + key)
    if version is not None:
        lines.append(b"Sec-WebSocket-Version: " + version)
    return b"\r\n".join(lines) + b"\r\n" + extra + b"\r\n"


def exchange(port: int, data: bytes) -> tuple[int, dict, bytes, socket.socket]:
    """Send an upgrade request; (status, headers, what followed the head, the socket) once the head is in."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(data)
    buf = b""
    while b"\r\n\r\n" not in buf:
        got = s.recv(65536)
        if not got:
            break
        buf += got
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(b":")
        headers[k.strip().lower().decode()] = v.strip().decode()
    return int(lines[0].split()[1]), headers, rest, s


def refused(port: int, data: bytes) -> tuple[int, dict, dict]:
    status, headers, rest, s = exchange(port, data)
    with s:
        n = int(headers.get("content-length", "0"))
        while len(rest) < n:
            got = s.recv(65536)
            if not got:
                break
            rest += got
    return status, headers, orjson.loads(rest[:n])


def run_turn(conn, text: str) -> tuple[str, object]:
    conn.conversation.item.create(item={"type": "message", "role": "user",
                                        "content": [{"type": "input_text", "text": text}]})
    conn.response.create()
    deltas = []
    for ev in conn:
        if ev.type == "response.output_text.delta":
            deltas.append(ev.delta)
        elif ev.type == "response.done":
            return "".join(deltas), ev.response.usage
        elif ev.type == "error":
            raise AssertionError(ev.error)
    raise AssertionError("the session ended before response.done")


# -- the SDK ----------------------------------------------------------------------------------------------------


def test_sdk_session_metered_with_key_auth(tmp_path, mock, start_gateway):
    gw = start_gateway(auth_config(mock.url, tmp_path))
    client = openai.OpenAI(base_url=gw.base + "/v1", api_key=KEY, max_retries=0)
    with client.realtime.connect(model="gpt-realtime", extra_headers={"x-mock-chunks": "5"}) as conn:
        created = conn.recv()
        assert created.type == "session.created" and created.session.model == "gpt-realtime"
        conn.session.update(session={"type": "realtime", "instructions": "Be brief."})
        updated = conn.recv()
        assert updated.type == "session.updated" and updated.session.instructions == "Be brief."
        text1, usage1 = run_turn(conn, "Hello there, mock.")
        text2, usage2 = run_turn(conn, "And again.")
        assert text1 == text2 == "".join(pieces(5))
        assert usage1.output_tokens == usage2.output_tokens == 5
        assert usage2.input_tokens > usage1.input_tokens     # the conversation grew
    line = access_line(gw)
    assert line["status"] == 101 and line["consumer"] == "alice" and line["model"] == "gpt-realtime"
    assert line["prompt_tokens"] == usage1.input_tokens + usage2.input_tokens
    assert line["completion_tokens"] == 10
    assert line["bytes_in"] > 0 and line["bytes_out"] > 0 and line["error"] is None
    wait_for(lambda: metric(gw, "fastgw_completion_tokens_total", consumer="alice") == 10, what="token metrics")
    assert metric(gw, "fastgw_prompt_tokens_total", consumer="alice") == line["prompt_tokens"]


def test_wrong_or_missing_key_refused_at_the_upgrade(tmp_path, mock, start_gateway):
    gw = start_gateway(auth_config(mock.url, tmp_path))
    before = mock.stats.connections_total
    client = openai.OpenAI(base_url=gw.base + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(InvalidStatus) as e:
        with client.realtime.connect(model="gpt-realtime"):
            pass
    assert e.value.response.status_code == 401
    assert orjson.loads(e.value.response.body)["error"]["code"] == "invalid_api_key"
    status, _, body = refused(gw.port, upgrade_request())
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert mock.stats.connections_total == before               # refused before any upstream connection


def test_browser_subprotocol_key(tmp_path, mock, start_gateway):
    """A browser sends its key as the subprotocol openai-insecure-api-key.<key>: accepted, never forwarded."""
    gw = start_gateway(auth_config(mock.url, tmp_path))
    with ws_connect(ws_url(gw), subprotocols=["realtime", "openai-insecure-api-key." + KEY],
                    additional_headers={"x-mock-echo-headers": "1"}, compression=None) as ws:
        assert ws.subprotocol == "realtime"
        created = orjson.loads(ws.recv())
        upstream_headers = orjson.loads(created["session"]["instructions"])
    assert KEY not in orjson.dumps(upstream_headers).decode()
    assert upstream_headers["sec-websocket-protocol"] == "realtime"
    assert "sec-websocket-extensions" not in upstream_headers           # no permessage-deflate upstream
    assert access_line(gw)["consumer"] == "alice"
    with pytest.raises(InvalidStatus) as e:
        with ws_connect(ws_url(gw), subprotocols=["realtime", "openai-insecure-api-key.sk-wrong"]):
            pass
    assert e.value.response.status_code == 401


# -- refused upgrades ------------------------------------------------------------------------------------------


def test_bad_upgrades_get_openai_errors(tmp_path, mock, start_gateway):
    cfg = model_config(mock.url, name="gpt-realtime") + f"""
[[models]]
name = "claude-realtime"
[[models.deployments]]
url = "{mock.url}"
provider = "anthropic"
key_env = "REALTIME_TEST_ANTHROPIC_KEY"
"""
    gw = start_gateway(cfg, env={"REALTIME_TEST_ANTHROPIC_KEY": "sk-ant-test"})
    port = gw.port
    cases = [
        (upgrade_request(method="POST", extra=b"Content-Length: 0\r\n"), 405, "method_not_allowed"),
        (upgrade_request(upgrade=False), 400, "websocket_upgrade_required"),
        (upgrade_request(key=None), 400, "invalid_websocket_key"),
        (upgrade_request(key=b"not-base64-of-16"), 400, "invalid_websocket_key"),
        (upgrade_request(version=b"8"), 400, "invalid_websocket_version"),
        (upgrade_request(path="/v1/realtime"), 400, "missing_model"),
        (upgrade_request(path="/v1/realtime?model=nope"), 404, "model_not_found"),
        (upgrade_request(path="/v1/realtime?model=claude-realtime"), 400, "unsupported_endpoint"),
        # The upstream's own refusal of the upgrade: its 4xx error JSON as it is, anything else a 502.
        (upgrade_request(extra=b"x-mock-status: 401\r\n"), 401, "mock_error"),
        (upgrade_request(extra=b"x-mock-status: 500\r\n"), 502, "upstream_refused"),
    ]
    for data, want_status, want_code in cases:
        status, headers, body = refused(port, data)
        assert (status, body["error"]["code"]) == (want_status, want_code), data
        assert body["error"]["message"] and headers.get("x-request-id")
    status, headers, _ = refused(port, upgrade_request(version=b"8"))
    assert headers["sec-websocket-version"] == "13"
    wait_for(lambda: mock.stats.open_connections == 0, what="the refused upgrades' upstream connections closed")


# -- the session's end ----------------------------------------------------------------------------------------


def test_client_that_vanishes_closes_the_upstream(tmp_path, mock, start_gateway):
    gw = start_gateway(model_config(mock.url, name="*"))
    status, headers, rest, s = exchange(gw.port, upgrade_request())
    assert status == 101 and headers["upgrade"].lower() == "websocket"
    assert headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="   # from the client's own key
    while b"session.created" not in rest:
        rest += s.recv(65536)
    assert mock.stats.open_connections == 1
    s.close()                                         # no close frame: gone
    wait_for(lambda: mock.stats.open_connections == 0, what="the upstream session closed")
    line = access_line(gw)
    assert line["status"] == 101 and line["error"] == "client_disconnected"


def test_large_fragmented_message_relays_intact(tmp_path, mock, start_gateway):
    gw = start_gateway(model_config(mock.url, name="*"))
    audio = base64.b64encode(os.urandom(768 * 1024)).decode()          # 1 MB of base64 "audio"
    event = orjson.dumps({"type": "input_audio_buffer.append", "audio": audio}).decode()
    fragments = [event[i:i + 100_000] for i in range(0, len(event), 100_000)]
    with ws_connect(ws_url(gw), compression=None, max_size=None) as ws:
        assert orjson.loads(ws.recv())["type"] == "session.created"
        ws.send(fragments)                                             # one message in 11 frames
        ws.send(orjson.dumps({"type": "input_audio_buffer.commit"}).decode())
        assert orjson.loads(ws.recv())["type"] == "input_audio_buffer.committed"   # no error: it parsed
        ws.send(orjson.dumps({"type": "response.create"}).decode())
        while True:
            ev = orjson.loads(ws.recv())
            assert ev["type"] != "error", ev
            if ev["type"] == "response.done":
                break
    # The mock counts the decoded audio it received: every byte of every fragment arrived.
    assert ev["response"]["usage"]["input_tokens"] == 4 + (768 * 1024) // 800
    line = access_line(gw)
    assert line["bytes_in"] > len(event) and line["prompt_tokens"] == 4 + (768 * 1024) // 800


def test_unknown_event_is_the_mocks_error_event_relayed(tmp_path, mock, start_gateway):
    gw = start_gateway(model_config(mock.url, name="*"))
    with ws_connect(ws_url(gw), compression=None) as ws:
        ws.recv()
        ws.send('{"type":"no.such.event","event_id":"e1"}')
        ev = orjson.loads(ws.recv())
    assert ev["type"] == "error" and ev["error"]["code"] == "unknown_event" and ev["error"]["event_id"] == "e1"
    assert access_line(gw)["prompt_tokens"] == -1         # no response.done: usage unknown


def test_drain_closes_sessions_with_1001(tmp_path, mock, start_gateway):
    gw = start_gateway(model_config(mock.url, extra="[server]\ndrain_timeout = 1.5\n", name="*"))
    with ws_connect(ws_url(gw), compression=None) as ws:
        ws.recv()
        gw.signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as e:
            while True:
                ws.recv()
    assert e.value.rcvd is not None and e.value.rcvd.code == 1001
    assert gw.stop() == 0
    assert [x for x in gw.access_lines() if x["path"] == "/v1/realtime"][0]["error"] == "going_away"


# -- limits, budgets, providers, TLS ----------------------------------------------------------------------------


def test_each_response_is_charged_and_a_spent_session_is_closed(tmp_path, mock, start_gateway):
    """Each response.done is charged as it comes (its usage to limits and budgets) and the next response is
    reserved: once the budget is spent, the session gets an `error` event and close frames 1008, not a free run
    until it ends; the access line carries the session's totals; the next session is refused at the upgrade."""
    cfg = auth_config(mock.url, tmp_path)
    pdir = tmp_path / "policies"
    # $1 a token: the cost in USD is the token count. No completion estimate: admission reserves nothing.
    (pdir / "30-budget.toml").write_text(
        'policy = "budget"\ndefault_completion_tokens = 0\n[[budgets]]\nconsumer = "alice"\nusd = 30\nperiod = "day"\n'
        '[prices.gpt-realtime]\ninput = 1000000.0\noutput = 1000000.0\n')
    gw = start_gateway(cfg)
    client = openai.OpenAI(base_url=gw.base + "/v1", api_key=KEY, max_retries=0)
    usages = []
    with client.realtime.connect(model="gpt-realtime") as conn:
        conn.recv()
        while sum(u.input_tokens + u.output_tokens for u in usages) <= 30:   # responses until the budget is spent
            usages.append(run_turn(conn, "again")[1])
            assert len(usages) < 50
        event = conn.recv()                          # then, unasked: the refusal of the next response, and the close
        assert event.type == "error" and event.error.code == "insufficient_quota"
        with pytest.raises(ConnectionClosed) as closed:
            conn.recv()
    assert closed.value.rcvd.code == 1008
    spent = sum(u.input_tokens + u.output_tokens for u in usages)
    assert spent > 30 and spent - (usages[-1].input_tokens + usages[-1].output_tokens) <= 30
    line = access_line(gw)
    assert line["cost_usd"] == pytest.approx(spent)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (sum(u.input_tokens for u in usages),
                                                                 sum(u.output_tokens for u in usages))
    assert line["error"] == "insufficient_quota"
    with pytest.raises(InvalidStatus) as e:
        with client.realtime.connect(model="gpt-realtime"):
            pass
    assert e.value.response.status_code == 429
    assert orjson.loads(e.value.response.body)["error"]["code"] == "insufficient_quota"


def test_each_response_counts_as_a_request(tmp_path, mock, start_gateway):
    """The session's admission and each response's are requests to the request limits: with 3 an hour, a session
    of two responses uses them all, and the next session is refused at the upgrade."""
    cfg = auth_config(mock.url, tmp_path)
    (tmp_path / "policies" / "20-rate.toml").write_text(
        'policy = "rate-limit"\n[[rules]]\nper = ["consumer"]\nwindow = "hour"\nrequests = 3\n')
    gw = start_gateway(cfg)
    client = openai.OpenAI(base_url=gw.base + "/v1", api_key=KEY, max_retries=0)
    with client.realtime.connect(model="gpt-realtime") as conn:
        conn.recv()
        run_turn(conn, "one")
        run_turn(conn, "two")
    with pytest.raises(InvalidStatus) as e:
        with client.realtime.connect(model="gpt-realtime"):
            pass
    assert e.value.response.status_code == 429
    assert orjson.loads(e.value.response.body)["error"]["code"] == "rate_limit_exceeded"
    assert e.value.response.headers["retry-after"]


def test_deployment_model_id_and_key_and_azure(tmp_path, mock, start_gateway):
    """The deployment's model id and key go upstream, not the client's; an Azure deployment gets Azure's
    realtime URL (deployment and api-version) and its api-key header."""
    cfg = f"""
[[models]]
name = "voice"
[[models.deployments]]
url = "{mock.url}"
model = "gpt-realtime-2025"
key_env = "RT_OPENAI_KEY"

[[models]]
name = "voice-azure"
[[models.deployments]]
url = "{mock.url.removesuffix('/v1')}"
provider = "azure"
model = "my-realtime-deployment"
key_env = "RT_AZURE_KEY"
"""
    gw = start_gateway(cfg, env={"RT_OPENAI_KEY": "sk-upstream-openai", "RT_AZURE_KEY": "azure-upstream-key"})
    for model, want_model, header, want in (("voice", "gpt-realtime-2025", "authorization", "Bearer sk-upstream-openai"),
                                            ("voice-azure", "my-realtime-deployment", "api-key", "azure-upstream-key")):
        with ws_connect(ws_url(gw, model), additional_headers={"x-mock-echo-headers": "1",
                                                               "authorization": "Bearer sk-client"},
                        compression=None) as ws:
            created = orjson.loads(ws.recv())
        assert created["session"]["model"] == want_model
        upstream_headers = orjson.loads(created["session"]["instructions"])
        assert upstream_headers[header] == want and "sk-client" not in created["session"]["instructions"]
        assert upstream_headers["sec-websocket-key"] != "dGhlIHNhbXBsZSBub25jZQ=="


def test_https_upstream(tmp_path, start_gateway):
    import ssl

    import trustme

    from tests.integration.conftest import MockThread

    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    m = MockThread(ssl=server_ctx)
    try:
        ca_file = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        url = f"https://127.0.0.1:{m.port}/v1"
        gw = start_gateway(model_config(url, name="*").replace("url = ", f'ca_file = "{ca_file}"\nurl = '))
        client = openai.OpenAI(base_url=gw.base + "/v1", api_key="x", max_retries=0)
        with client.realtime.connect(model="gpt-realtime") as conn:
            assert conn.recv().type == "session.created"
            text, usage = run_turn(conn, "over TLS")
        assert text and usage.output_tokens == 14
        assert access_line(gw)["completion_tokens"] == 14
    finally:
        m.stop()


def test_upstream_that_vanishes_gets_the_client_a_1014(tmp_path, mock, start_gateway):
    gw = start_gateway(model_config(mock.url, name="*"))
    with ws_connect(ws_url(gw), additional_headers={"x-mock-reset-after": "1"}, compression=None) as ws:
        assert orjson.loads(ws.recv())["type"] == "session.created"
        with pytest.raises(ConnectionClosed) as e:
            ws.recv()
    assert e.value.rcvd is not None and e.value.rcvd.code == 1014
    line = access_line(gw)
    assert line["status"] == 101 and line["error"] == "upstream_disconnected"


def test_an_idle_session_is_closed_after_realtime_idle_timeout(tmp_path, mock, start_gateway):
    """[server] realtime_idle_timeout: a session quiet both ways that long gets close frames 1001."""
    gw = start_gateway(auth_config(mock.url, tmp_path, extra="[server]\nrealtime_idle_timeout = 1"))
    with ws_connect(ws_url(gw), additional_headers={"authorization": f"Bearer {KEY}"}, compression=None) as ws:
        assert orjson.loads(ws.recv())["type"] == "session.created"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd.code == 1001
    assert access_line(gw)["error"] == "idle_timeout"


def test_realtime_idle_timeout_must_be_positive():
    from fastgw.runtime.config import ConfigError, parse

    with pytest.raises(ConfigError, match="realtime_idle_timeout"):
        parse("[server]\nrealtime_idle_timeout = 0\n")
