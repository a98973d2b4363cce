"""Operating the running gateway (issue 5): PROXY protocol behind an NLB, drain and restarts, the admin port, the
command line and the environment overrides. Real `fastgw serve` processes, raw sockets, PROXY headers built here
with struct.pack (independently of fastgw/proxyproto.py)."""
from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time

import httpx
import orjson
import pytest

from tests.conftest import free_port, require_tool
from tests.integration.conftest import ROOT, model_config, wait_for, wait_port

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}]}
V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


# ---- PROXY headers, built from the spec (haproxy proxy-protocol.txt) ----

def v1(src: str, dst: str = "10.0.0.1", sport: int = 56324, dport: int = 8080) -> bytes:
    fam = "TCP6" if ":" in src else "TCP4"
    return f"PROXY {fam} {src} {dst} {sport} {dport}\r\n".encode()


def v2(src: str, dst: str | None = None, sport: int = 56324, dport: int = 8080, tlvs: bytes = b"") -> bytes:
    """A v2 PROXY command over TCP (0x21), IPv4 (0x11) or IPv6 (0x21) by the source's spelling."""
    if ":" in src:
        af, fam, dst = socket.AF_INET6, 0x21, dst or "2001:db8::1"
    else:
        af, fam, dst = socket.AF_INET, 0x11, dst or "10.0.0.1"
    block = socket.inet_pton(af, src) + socket.inet_pton(af, dst) + struct.pack("!HH", sport, dport) + tlvs
    return V2_SIG + struct.pack("!BBH", 0x21, fam, len(block)) + block


def v2_local(tlvs: bytes = b"") -> bytes:
    """v2 LOCAL (0x20): the balancer's own connection, e.g. its health check; no addresses."""
    return V2_SIG + struct.pack("!BBH", 0x20, 0x00, len(tlvs)) + tlvs


def aws_vpce_tlv(vpce: str) -> bytes:
    value = b"\x01" + vpce.encode()
    return struct.pack("!BH", 0xEA, len(value)) + value


def get(path: str, rid: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nhost: x\r\nx-request-id: {rid}\r\nconnection: close\r\n\r\n".encode()


def chat(rid: str) -> bytes:
    body = orjson.dumps(CHAT)
    return (f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"x-request-id: {rid}\r\nconnection: close\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body


def exchange(port: int, *pieces: bytes, gap: float = 0.0, timeout: float = 10.0) -> bytes:
    """Send the pieces (each its own TCP segment when gap > 0), read until the server closes.

    A reset counts as a close: a refused connection gives b"" whether the server closed or aborted it.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        got = []
        try:
            for piece in pieces:
                s.sendall(piece)
                if gap:
                    time.sleep(gap)
            while b := s.recv(65536):
                got.append(b)
        except (ConnectionResetError, BrokenPipeError):
            pass
        return b"".join(got)


def access_line(gw, rid: str) -> dict:
    """The access-log line of request `rid` (the log is flushed on a timer: wait for it)."""
    return wait_for(lambda: next((l for l in gw.access_lines() if l["request_id"] == rid), None),
                    what=f"access log line {rid}")


def ops_events(gw) -> list[dict]:
    return [orjson.loads(l) for l in gw.ops_log().splitlines() if l.startswith("{")]


def rate_limit_policies(tmp_path, rule: str) -> str:
    d = tmp_path / "policies"
    d.mkdir(exist_ok=True)
    (d / "20-rate.toml").write_text('policy = "rate-limit"\n' + rule)
    return str(d)


# ---- PROXY protocol ----

@pytest.fixture
def proxied(tmp_path, mock, start_gateway):
    """A gateway that requires PROXY headers from loopback peers, with a 2-requests-per-day limit per client."""
    pdir = rate_limit_policies(tmp_path, '[[rules]]\nid = "per-ip"\nper = ["client"]\nwindow = "day"\n'
                                         'requests = 2\n')
    extra = (f'policies_dir = "{pdir}"\n[server]\nproxy_protocol = "required"\n'
             f'trusted_proxies = ["127.0.0.0/8", "::1"]\nheader_timeout = 1.0\n')
    return start_gateway(model_config(mock.url, extra=extra))


VALID = [
    ("v1-tcp4", v1("203.0.113.7"), "203.0.113.7"),
    ("v1-tcp6", v1("2001:db8::7", "2001:db8::1"), "2001:db8::7"),
    ("v1-unknown", b"PROXY UNKNOWN\r\n", "127.0.0.1"),
    ("v2-ipv4", v2("198.51.100.23"), "198.51.100.23"),
    ("v2-ipv6", v2("2001:db8:0:0:0:0:0:42"), "2001:db8::42"),          # logged in the kernel's spelling
    ("v2-ipv4-aws-tlv", v2("198.51.100.24", tlvs=aws_vpce_tlv("vpce-08d2bf15fac5001c9")), "198.51.100.24"),
    ("v2-local", v2_local(), "127.0.0.1"),                              # LOCAL keeps the real peer
]


def test_proxy_valid_headers_set_the_logged_client(proxied):
    for name, header, client in VALID:
        got = exchange(proxied.port, header + get("/healthz", name))
        assert got.startswith(b"HTTP/1.1 200"), (name, got)
        assert access_line(proxied, name)["client"] == client, name
    # Header and request in one segment, or the header split over many segments (byte by byte for v2, in
    # three pieces for v1, the request in another): the same result.
    h = v2("192.0.2.99", tlvs=aws_vpce_tlv("vpce-1"))
    got = exchange(proxied.port, *[h[i:i + 1] for i in range(len(h))], get("/healthz", "split-v2"), gap=0.005)
    assert got.startswith(b"HTTP/1.1 200") and access_line(proxied, "split-v2")["client"] == "192.0.2.99"
    h = v1("192.0.2.98")
    got = exchange(proxied.port, h[:3], h[3:20], h[20:], get("/healthz", "split-v1"), gap=0.05)
    assert got.startswith(b"HTTP/1.1 200") and access_line(proxied, "split-v1")["client"] == "192.0.2.98"
    # The header's bytes are consumed exactly: a request glued to it, pipelined with a second one, both served.
    two = v1("192.0.2.97") + get("/healthz", "glued-1").replace(b"connection: close\r\n", b"") + get("/readyz", "glued-2")
    got = exchange(proxied.port, two)
    assert got.count(b"HTTP/1.1 200") == 2
    assert access_line(proxied, "glued-2")["client"] == "192.0.2.97"


MALFORMED = [
    ("missing header", b""),
    ("v1 bad address", b"PROXY TCP4 203.0.113.300 10.0.0.1 1 2\r\n"),
    ("v1 family/address mismatch", b"PROXY TCP6 203.0.113.7 10.0.0.1 1 2\r\n"),
    ("v1 missing field", b"PROXY TCP4 203.0.113.7 10.0.0.1 1\r\n"),
    ("v1 port out of range", b"PROXY TCP4 203.0.113.7 10.0.0.1 70000 2\r\n"),
    ("v1 bare LF", b"PROXY TCP4 203.0.113.7 10.0.0.1 1 2\n"),
    ("v1 too long", b"PROXY TCP4 " + b"1" * 120 + b"\r\n"),
    ("v1 lowercase", b"proxy TCP4 203.0.113.7 10.0.0.1 1 2\r\n"),
    ("v2 version 1", V2_SIG + struct.pack("!BBH", 0x11, 0x11, 12) + bytes(12)),
    ("v2 command 2", V2_SIG + struct.pack("!BBH", 0x22, 0x11, 12) + bytes(12)),
    ("v2 length short for IPv4", V2_SIG + struct.pack("!BBH", 0x21, 0x11, 8) + bytes(8)),
    ("v2 over 536 bytes", v2("198.51.100.1", tlvs=struct.pack("!BH", 0x04, 600) + bytes(600))),
    ("v2 TLV overruns", v2("198.51.100.1", tlvs=struct.pack("!BH", 0x04, 10) + bytes(4))),
    ("v2 bad signature", b"\r\n\r\n\x00\r\nQUIX\n" + struct.pack("!BBH", 0x21, 0x11, 12) + bytes(12)),
]


def test_proxy_bad_or_missing_header_is_closed_without_a_response(proxied):
    for name, header in MALFORMED:
        got = exchange(proxied.port, header + get("/healthz", "bad"))
        assert got == b"", (name, got)
    # Not one of them reached the HTTP layer (the access log is written in order: once a later request's line
    # is there, theirs would be too). Refusals are logged with their reason, at most one per 10 s per worker
    # (any client can trigger them at will: an unthrottled line each would let it flood the log).
    assert exchange(proxied.port, v2("203.0.113.9") + get("/healthz", "marker")).startswith(b"HTTP/1.1 200")
    access_line(proxied, "marker")
    assert not any(l["request_id"] == "bad" for l in proxied.access_lines())
    refused = wait_for(lambda: [e for e in ops_events(proxied) if e["event"] == "proxy protocol refused"],
                       what="a refusal logged")
    assert 1 <= len(refused) <= 2 and all(e["peer"] == "127.0.0.1" and e["reason"] for e in refused)
    # A header that never completes is not waited on forever (header_timeout = 1 s), and no request is served.
    t0 = time.monotonic()
    got = exchange(proxied.port, v1("203.0.113.7")[:10])
    assert time.monotonic() - t0 < 8 and b"200 OK" not in got
    # The listener still serves a good connection afterwards.
    assert exchange(proxied.port, v2("203.0.113.8") + get("/healthz", "after")).startswith(b"HTTP/1.1 200")


def test_proxy_header_timeout_closes_without_an_http_response(proxied):
    # Half a v1 header, half a v2 one, nothing at all (a bare TCP check): all waiting at once, then silence.
    socks = [socket.create_connection(("127.0.0.1", proxied.port), timeout=10) for _ in range(3)]
    socks[0].sendall(v1("203.0.113.7")[:10])
    socks[1].sendall(v2("203.0.113.7")[:20])
    for s in socks:
        with s:
            try:
                assert s.recv(65536) == b""
            except ConnectionResetError:
                pass
    # No request was ever made up: the next one is the first line of the access log.
    assert exchange(proxied.port, v2("203.0.113.9") + get("/healthz", "marker")).startswith(b"HTTP/1.1 200")
    access_line(proxied, "marker")
    assert [l["request_id"] for l in proxied.access_lines()] == ["marker"]


def test_proxy_header_from_an_untrusted_peer_is_never_believed(mock, start_gateway):
    gw = start_gateway(model_config(mock.url, extra='[server]\nproxy_protocol = "required"\n'
                                                    'trusted_proxies = ["10.0.0.0/8"]\n'))
    def refused():
        return [e for e in ops_events(gw) if e["event"] == "proxy protocol refused"]

    before = len(wait_for(refused, what="the start-up probe refused"))    # wait_port's probe was one
    for header in (v1("203.0.113.7"), v2("203.0.113.7"), v2_local(), b""):
        assert exchange(gw.port, header + get("/healthz", "untrusted")) == b""
    # No connection can make a request here: stop the gateway, which flushes its logs, then read them.
    assert gw.stop() == 0
    # Logged at most once per 10 s and worker (a client could flood the log): the probe's line stands for all.
    assert before == len(refused()) >= 1
    assert {e["reason"] for e in refused()} == {"untrusted peer"}
    assert not any(l["request_id"] == "untrusted" for l in gw.access_lines())


def test_proxy_off_treats_a_header_as_http(mock, start_gateway):
    """Without proxy_protocol the client address is the TCP peer, and a PROXY line is not believed."""
    gw = start_gateway(model_config(mock.url))
    got = exchange(gw.port, v1("203.0.113.7") + get("/healthz", "off"))
    assert got.startswith(b"HTTP/1.1 400") or got.startswith(b"HTTP/1.1 501")
    assert exchange(gw.port, get("/healthz", "plain")).startswith(b"HTTP/1.1 200")
    assert access_line(gw, "plain")["client"] == "127.0.0.1"
    assert all(l["client"] == "127.0.0.1" for l in gw.access_lines())


def test_rate_limit_per_client_address_behind_one_balancer(proxied):
    """Two clients behind one NLB (same TCP peer, 127.0.0.1) get separate buckets keyed on the PROXY address."""
    alice, bob = "198.51.100.1", "2001:db8::b0b"
    for i in range(2):
        assert exchange(proxied.port, v2(alice) + chat(f"a{i}")).startswith(b"HTTP/1.1 200")
    got = exchange(proxied.port, v1(alice) + chat("a2"))      # v1 or v2: the same client, the same bucket
    assert got.startswith(b"HTTP/1.1 429") and b"rate_limit_exceeded" in got
    for i in range(2):
        assert exchange(proxied.port, v2(bob) + chat(f"b{i}")).startswith(b"HTTP/1.1 200")
    assert exchange(proxied.port, v2(bob) + chat("b2")).startswith(b"HTTP/1.1 429")
    # The balancer's own (LOCAL) connections are keyed on the peer: a third bucket, still full.
    assert exchange(proxied.port, v2_local() + chat("l0")).startswith(b"HTTP/1.1 200")
    lines = {rid: access_line(proxied, rid) for rid in ("a0", "a1", "a2", "b0", "b2", "l0")}
    assert [lines[r]["client"] for r in ("a0", "a2", "b0", "l0")] == [alice, alice, bob, "127.0.0.1"]
    assert [lines[r]["status"] for r in ("a1", "a2", "b2")] == [200, 429, 429]


def test_tcp_keepalive_and_idle_timeout_for_the_nlb(mock, start_gateway):
    """Accepted sockets probe after tcp_keepalive_idle (under the NLB's 350 s), and fastgw closes an idle
    keep-alive connection itself after idle_timeout, so the NLB never silently forgets a flow."""
    ss = require_tool("ss")
    gw = start_gateway(model_config(mock.url, extra="[server]\ntcp_keepalive_idle = 42\nidle_timeout = 1.0\n"))
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        out = subprocess.run([ss, "-tnoH", "state", "established", f"( sport = :{gw.port} )"],
                             capture_output=True, text=True, timeout=10).stdout
        # The server side of this connection: "timer:(keepalive,41sec,0)" or so (counting down from 42 s).
        timers = re.findall(r"timer:\(keepalive,(\d+)(?:sec|min)", out)
        assert timers and all(0 < int(t) <= 42 for t in timers), out
        t0 = time.monotonic()
        assert s.recv(65536) == b""                          # idle: closed by the gateway, no response
        assert 0.5 < time.monotonic() - t0 < 5


# ---- drain, restarts ----

def admin_get(port: int, path: str, method: str = "GET") -> httpx.Response:
    return httpx.request(method, f"http://127.0.0.1:{port}{path}", timeout=10)


def test_sigterm_admin_readyz_turns_503_while_the_stream_completes(mock, start_gateway):
    admin = free_port()
    gw = start_gateway(model_config(mock.url, extra=f"[server]\nshutdown_delay = 2.0\ndrain_timeout = 10\n"
                                                    f"admin_port = {admin}\n"))
    wait_port(admin, gw.proc)
    assert admin_get(admin, "/readyz").status_code == 200
    body = orjson.dumps({**CHAT, "stream": True})
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n"
              f"x-mock-chunks: 10\r\nx-mock-chunk-delay-ms: 300\r\n\r\n".encode() + body)
    got = s.recv(65536)
    gw.signal(signal.SIGTERM)
    # Within shutdown_delay both listeners still answer, and both say "not ready".
    wait_for(lambda: admin_get(admin, "/readyz").status_code == 503, timeout=1.5, what="admin /readyz 503")
    assert httpx.get(gw.base + "/readyz", timeout=5).status_code == 503
    assert admin_get(admin, "/healthz").status_code == 200            # alive, just draining
    while not got.endswith(b"0\r\n\r\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    s.close()
    assert got.count(b"data: {") >= 10 and got.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")   # not cut
    assert gw.proc.wait(20) == 0
    events = [e["event"] for e in ops_events(gw)]
    assert "draining" in events and "drained" in events and events[-1] == "supervisor stopped"


def test_killed_worker_is_restarted_and_serves(mock, start_gateway):
    admin = free_port()
    gw = start_gateway(model_config(mock.url, extra=f"[server]\nadmin_port = {admin}\n"), workers=2)
    wait_port(admin, gw.proc)
    status = wait_for(lambda: (st := admin_get(admin, "/status").json()) and len(st["workers"]) == 2 and st,
                      what="two workers in /status")
    pids = {w["worker"]: w["pid"] for w in status["workers"]}
    os.kill(pids["1"], signal.SIGKILL)
    died = wait_for(lambda: [e for e in ops_events(gw) if e["event"] == "worker died"], what="'worker died'")
    assert died[0]["worker"] == 1 and died[0]["pid"] == pids["1"] and died[0]["signal"] == "SIGKILL"
    started = wait_for(lambda: [e for e in ops_events(gw) if e["event"] == "worker started" and e["worker"] == 1
                                and e["pid"] != pids["1"]], what="a new worker 1")
    new_pid = started[0]["pid"]
    wait_for(lambda: {w["worker"]: w["pid"] for w in admin_get(admin, "/status").json()["workers"]}
             == {"0": pids["0"], "1": new_pid}, what="the new worker in /status")
    served_by = set()
    for _ in range(40):                # new connections: the kernel spreads them over both workers again
        r = httpx.post(gw.base + "/v1/chat/completions", json=CHAT, headers={"connection": "close"}, timeout=10)
        assert r.status_code == 200
        served_by.add(r.headers["x-request-id"].split("-")[2])
    assert served_by == {"0", "1"}
    assert gw.proc.poll() is None


# ---- the admin port ----

def test_admin_status_reload_and_isolation(mock, start_gateway):
    admin = free_port()
    extra = f"[server]\nadmin_port = {admin}\n"
    gw = start_gateway(model_config(mock.url, extra=extra), workers=2)
    wait_port(admin, gw.proc)
    st = wait_for(lambda: (s := admin_get(admin, "/status").json()) and len(s["workers"]) == 2 and s,
                  what="two workers in /status")
    from fastgw import __version__

    assert st["version"] == __version__
    assert sorted(w["worker"] for w in st["workers"]) == ["0", "1"]
    assert all(w["pid"] > 0 and not w["draining"] and w["config_source"] == str(gw.config_path)
               and w["upstreams"] for w in st["workers"])
    (before,) = st["config_versions"]
    # A new config on SIGHUP: every worker reports the new version.
    gw.config_path.write_text(model_config(mock.url, extra=extra) + model_config(mock.url, name="new-model"))
    gw.signal(signal.SIGHUP)
    st = wait_for(lambda: (s := admin_get(admin, "/status").json()) and len(s["workers"]) == 2
                  and all(w["reloads"] == 1 for w in s["workers"]) and s, what="both workers reloaded")
    (after,) = st["config_versions"]
    assert after != before
    # A refused reload leaves the version alone.
    gw.config_path.write_text("[server]\nport = 'x'\n")
    gw.signal(signal.SIGHUP)
    wait_for(lambda: "config reload refused" in gw.ops_log(), what="reload refused")
    refused_at = time.time()
    st = wait_for(lambda: (s := admin_get(admin, "/status").json()) and len(s["workers"]) == 2
                  and all(w["updated_at"] > refused_at for w in s["workers"]) and s,
                  what="status snapshots taken after the refusal")
    assert st["config_versions"] == [after]
    # Never on the public listener; read-only on the admin one.
    r = httpx.get(gw.base + "/status", timeout=5)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        r = admin_get(admin, "/status", method)
        assert r.status_code == 405, method
    assert admin_get(admin, "/v1/chat/completions").status_code == 404    # the admin port proxies nothing
    assert admin_get(admin, "/status").status_code == 200


def test_reload_a_worker_would_refuse_is_refused_by_the_supervisor(mock, start_gateway):
    """A deployment whose key_env names an unset variable: the supervisor refuses the reload itself, naming the
    field, and a worker restarted afterwards starts with the config still in force (not a crash loop)."""
    unset = "FASTGW_TEST_NEVER_SET_KEY"
    assert unset not in os.environ
    admin = free_port()
    extra = f"[server]\nadmin_port = {admin}\n"
    gw = start_gateway(model_config(mock.url, extra=extra), workers=2)
    wait_port(admin, gw.proc)
    st = wait_for(lambda: (s := admin_get(admin, "/status").json()) and len(s["workers"]) == 2 and s,
                  what="two workers in /status")
    (in_force,) = st["config_versions"]
    pids = {w["worker"]: w["pid"] for w in st["workers"]}
    gw.config_path.write_text(model_config(mock.url, extra=extra)
                              + model_config(mock.url, name="new-model", key_env=unset))
    gw.signal(signal.SIGHUP)
    # Refused by the supervisor (its lines carry no "worker"), before any worker saw the config.
    (refused,) = wait_for(lambda: [e for e in ops_events(gw) if e["event"] == "config reload refused"
                                   and "worker" not in e], what="the supervisor to refuse the reload")
    assert "models[1] ('new-model').deployments[0].key_env" in refused["error"] and unset in refused["error"]
    assert "config validated, reloading workers" not in [e["event"] for e in ops_events(gw)]
    # A worker that dies now comes back with the config in force, and serves.
    os.kill(pids["1"], signal.SIGKILL)
    st = wait_for(lambda: (s := admin_get(admin, "/status").json()) and len(s["workers"]) == 2
                  and {w["worker"]: w["pid"] for w in s["workers"]}["1"] != pids["1"] and s,
                  what="worker 1 restarted")
    assert st["config_versions"] == [in_force]
    served_by = set()
    for _ in range(40):                # new connections: the kernel spreads them over both workers
        r = httpx.post(gw.base + "/v1/chat/completions", json=CHAT, headers={"connection": "close"}, timeout=10)
        assert r.status_code == 200
        served_by.add(r.headers["x-request-id"].split("-")[2])
    assert served_by == {"0", "1"}
    assert [m["id"] for m in httpx.get(gw.base + "/v1/models", timeout=5).json()["data"]] == ["gpt-4o-mini"]
    events = ops_events(gw)
    assert [e["worker"] for e in events if e["event"] == "worker died"] == [1]   # one death, no crash loop
    assert not any(e["event"] in ("worker crashed", "config reloaded") for e in events)


# ---- the command line ----

def fastgw(*args, env=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastgw", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_version():
    from fastgw import __version__

    r = fastgw("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"fastgw {__version__}"


def test_check_config_good_and_bad(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text(model_config("http://127.0.0.1:9/v1") + model_config("http://127.0.0.1:9/v1", name="b"))
    r = fastgw("check-config", str(good))
    assert r.returncode == 0 and "ok (2 models)" in r.stdout, r.stderr
    pdir = rate_limit_policies(tmp_path, '[[rules]]\nper = ["nope"]\nrequests = 1\n')
    # (file text, what the one-line message must name besides "fastgw:"); "{path}" is the bad file itself.
    bad = [
        ("[server]\nport = 'eighty'\n", ["{path}", "$.server.port"]),
        ("[server]\nport = 70000\n", ["{path}", "server.port: 70000"]),
        ("[server]\nproxy_protocol = 'sometimes'\n", ["{path}", "server.proxy_protocol"]),
        ("[server]\ncolour = 'blue'\n", ["{path}", "unknown field `colour` - at `$.server`"]),
        ("[server\n", ["{path}", "not valid TOML"]),
        (model_config("ftp://x/v1", name="m"), ["{path}", "models[0] ('m').deployments[0].url"]),
        (model_config("http://127.0.0.1:9/v1", key_env="NO_SUCH_KEY_VAR"),
         ["{path}", "models[0] ('gpt-4o-mini').deployments[0].key_env", "NO_SUCH_KEY_VAR", "is not set"]),
        (f'policies_dir = "{pdir}"\n' + model_config("http://127.0.0.1:9/v1"),
         [str(tmp_path / "policies" / "20-rate.toml"), "rules[0].per[0]", "'nope'"]),
    ]
    for i, (text, names) in enumerate(bad):
        path = tmp_path / f"bad{i}.toml"
        path.write_text(text)
        r = fastgw("check-config", str(path))
        assert r.returncode == 2 and r.stdout == "", (text, r.stdout, r.stderr)
        assert r.stderr.startswith("fastgw: ") and r.stderr.count("\n") == 1, r.stderr
        for name in names:
            assert name.replace("{path}", str(path)) in r.stderr, (name, r.stderr)
    r = fastgw("check-config", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "cannot read" in r.stderr
    # `serve` refuses the same way before starting anything.
    r = fastgw("serve", "--config", str(tmp_path / "bad0.toml"))
    assert r.returncode == 2 and "server.port" in r.stderr


def test_check_config_refuses_a_bad_trusted_network(tmp_path):
    path = tmp_path / "fastgw.toml"
    path.write_text(model_config("http://127.0.0.1:9/v1", extra='[server]\nproxy_protocol = "required"\n'
                                                               'trusted_proxies = ["10.0.0.1/8"]\n'))
    r = fastgw("check-config", str(path))
    assert r.returncode == 2 and "server.trusted_proxies" in r.stderr and "10.0.0.1/8" in r.stderr


def test_env_overrides_in_a_real_start(tmp_path, mock):
    """FASTGW_* variables over the file (as the container sets them), command-line flags over both."""
    conf = tmp_path / "fastgw.toml"
    conf.write_text(model_config(mock.url, extra='[server]\nport = 1\nworkers = 1\ntrusted_proxies = ["127.0.0.1"]\n'))
    port, admin = free_port(), free_port()
    log = tmp_path / "access.jsonl"
    env = {**os.environ, "FASTGW_CONFIG": str(conf), "FASTGW_HOST": "127.0.0.1", "FASTGW_PORT": str(port),
           "FASTGW_WORKERS": "2", "FASTGW_ADMIN_PORT": str(admin), "FASTGW_ACCESS_LOG": str(log),
           "FASTGW_PROXY_PROTOCOL": "required", "FASTGW_SHUTDOWN_DELAY": "0", "FASTGW_DRAIN_TIMEOUT": "5"}
    err = open(tmp_path / "ops.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "fastgw", "serve"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_port(port, proc)
        wait_port(admin, proc)
        assert exchange(port, get("/healthz", "no-header")) == b""              # FASTGW_PROXY_PROTOCOL
        assert exchange(port, v1("203.0.113.5") + chat("env-1")).startswith(b"HTTP/1.1 200")
        wait_for(lambda: len(admin_get(admin, "/status").json()["workers"]) == 2, what="FASTGW_WORKERS=2")
        line = wait_for(lambda: log.exists() and [orjson.loads(l) for l in log.read_bytes().splitlines()],
                        what="the access log file")
        assert line[0]["request_id"] == "env-1" and line[0]["client"] == "203.0.113.5"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err.close()
    # A bad value stops the start and names the variable.
    r = fastgw("serve", env={"FASTGW_CONFIG": str(conf), "FASTGW_PORT": "http"})
    assert r.returncode == 2 and "$FASTGW_PORT" in r.stderr
