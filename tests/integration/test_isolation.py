"""Isolation (issue 13 item 3): an answer never reaches the wrong client.

A gateway with 2 workers in front of the built-in mock (its own process), its upstream connections pooled and
kept alive (the default). Clients tag every request and judge every answer (perf/tagged_load.py: the tag in
x-request-id, in x-isolation-tag, in the model name and in the prompt; the mock echoes the headers it received
into the content, streams included): raw sockets pipelining batches of requests on keep-alive connections,
httpx and the openai SDK concurrently; streams and non-streams mixed; on a fraction of the requests a fault
upstream (x-mock-delay-ms, x-mock-chunk-delay-ms, x-mock-close, x-mock-status 500, x-mock-reset-after). Tens of
thousands of requests; one answer carrying another request's tag fails the test, as does any answer without
its own tag or with an outcome its fault does not explain.

Also: bytes an upstream sends after a response's end (a second, unsolicited response in the same read) never
become the next client's answer.
"""
from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import orjson
import pytest

from perf.tagged_load import FAULT_WEIGHTS, FAULTS, LOST, OK, TAG_HEADER, Answer, Jobs, Tally, judge, pipelined
from tests.conftest import free_port
from tests.integration.conftest import ROOT, wait_for, wait_port

pytestmark = pytest.mark.timeout(240)

RAW_CONNECTIONS = 48        # concurrent raw keep-alive connections, each pipelining batches of 1-8 requests
RAW_REQUESTS = 36_000
HTTPX_REQUESTS, HTTPX_CONCURRENCY = 2_000, 24
SDK_REQUESTS, SDK_CONCURRENCY = 1_000, 12


class MockProcess:
    """`fastgw mock` in its own process: the clients in this process do not share its CPU or its GIL."""

    def __init__(self, tmp_path):
        self.port = free_port()
        self.log = open(tmp_path / "mock.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "fastgw", "mock", "--host", "127.0.0.1", "--port",
                                      str(self.port)], cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port, self.proc)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


def admin_status(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/status", timeout=5).json()


def gateway_config(upstream_url: str, admin_port: int) -> str:
    return f"""[server]
admin_port = {admin_port}
[[models]]
name = "*"
[[models.deployments]]
url = "{upstream_url}"
"""


@pytest.fixture
def two_workers(tmp_path, start_gateway):
    mock = MockProcess(tmp_path)
    admin = free_port()
    gw = start_gateway(gateway_config(mock.url, admin), workers=2)
    wait_port(admin, gw.proc)
    gw.admin = admin
    wait_for(lambda: len(admin_status(admin)["workers"]) == 2, what="two workers in /status")
    yield gw
    mock.stop()


# -- the clients ----------------------------------------------------------------------------------------

async def raw_clients(port: int, jobs: Jobs, total: int, tally: Tally) -> None:
    """RAW_CONNECTIONS at a time, each a keep-alive connection sending 3-12 pipelined batches of 1-8 requests,
    then a new connection, until `total` requests are sent."""
    left = [total]

    def batches():              # made as they are sent: a connection broken off takes no more
        for _ in range(jobs.rng.randint(3, 12)):
            depth = min(jobs.rng.randint(1, 8), left[0])
            if depth <= 0:
                return
            left[0] -= depth
            yield [jobs.next() for _ in range(depth)]

    async def client():
        while left[0] > 0:
            await pipelined("127.0.0.1", port, batches(), tally)

    await asyncio.gather(*(client() for _ in range(RAW_CONNECTIONS)))


async def httpx_clients(base: str, jobs: Jobs, total: int, tally: Tally) -> None:
    """One pooled httpx client (keep-alive), HTTPX_CONCURRENCY requests at a time."""
    gate = asyncio.Semaphore(HTTPX_CONCURRENCY)
    limits = httpx.Limits(max_connections=HTTPX_CONCURRENCY, max_keepalive_connections=HTTPX_CONCURRENCY)

    async def one(client, job):
        async with gate:
            body, status, headers, complete = b"", None, {}, False
            try:
                async with client.stream("POST", "/v1/chat/completions", content=job.body(),
                                         headers={"content-type": "application/json", **job.headers()}) as r:
                    status, headers = r.status_code, {k.lower(): v for k, v in r.headers.items()}
                    async for part in r.aiter_raw():
                        body += part
                complete = True
            except (httpx.RemoteProtocolError, httpx.ReadError):
                pass                        # broken off mid-answer: judged as such
            tally.add(job, judge(job, Answer(status, headers, body, complete) if status is not None else None))

    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        await asyncio.gather(*(one(client, jobs.next()) for _ in range(total)))


async def sdk_clients(base: str, jobs: Jobs, total: int, tally: Tally) -> None:
    """The openai SDK (its own httpx pool), SDK_CONCURRENCY requests at a time; raw responses, so the head's
    x-request-id is judged too. A stream is judged as the SSE of the chunks the SDK parsed."""
    gate = asyncio.Semaphore(SDK_CONCURRENCY)
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="sk-isolation", max_retries=0, timeout=30)

    async def one(job):
        async with gate:
            status, headers, body, complete = None, {}, b"", False
            messages = orjson.loads(job.body())["messages"]
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model=job.tag, messages=messages, stream=job.stream, extra_headers=job.headers())
                status, headers = raw.status_code, {k.lower(): v for k, v in raw.headers.items()}
                if job.stream:
                    headers["content-type"] = "text/event-stream"
                    async for chunk in raw.parse():
                        body += b"data: " + chunk.model_dump_json().encode() + b"\n\n"
                else:
                    body = raw.http_response.content
                complete = True
            except openai.APIStatusError as err:    # the 500s: their head and body, whole
                status, headers = err.status_code, {k.lower(): v for k, v in err.response.headers.items()}
                body, complete = err.response.content, True
            except (openai.APIError, httpx.HTTPError):
                pass                                # broken off mid-stream
            tally.add(job, judge(job, Answer(status, headers, body, complete) if status is not None else None))

    async with client:
        await asyncio.gather(*(one(jobs.next()) for _ in range(total)))


async def all_clients(gw) -> dict[str, Tally]:
    tallies = {"raw": Tally(), "httpx": Tally(), "sdk": Tally()}
    await asyncio.gather(raw_clients(gw.port, Jobs(seed=1), RAW_REQUESTS, tallies["raw"]),
                         httpx_clients(gw.base, Jobs(seed=2), HTTPX_REQUESTS, tallies["httpx"]),
                         sdk_clients(gw.base, Jobs(seed=3), SDK_REQUESTS, tallies["sdk"]))
    return tallies


def test_no_answer_reaches_another_client(two_workers):
    gw = two_workers
    idle = admin_status(gw.admin)["workers"]
    started = time.monotonic()
    tallies = asyncio.run(all_clients(gw))
    elapsed = time.monotonic() - started
    total = Tally()
    for t in tallies.values():
        total.merge(t)
    summary = total.summary()
    print(f"\n{summary['answered']} answers in {elapsed:.1f} s:\n{orjson.dumps(summary).decode()}")

    # Not one answer with another's tag, without its own, or with an outcome its fault does not explain.
    assert not total.problems, total.examples
    # Volume and variety: tens of thousands of answers from every kind of client, pipelined ones among them,
    # streams and non-streams, and every fault seen often, each with its expected outcome.
    assert total.answered() >= 30_000
    assert tallies["raw"].pipelined >= 10_000
    assert tallies["httpx"].answered() >= HTTPX_REQUESTS * 0.9 and tallies["sdk"].answered() >= SDK_REQUESTS * 0.9
    assert total.streams >= 8_000 and total.plain >= 15_000
    for name in FAULT_WEIGHTS:
        assert total.outcomes[(name, FAULTS[name].expect)] >= 200, (name, summary["outcomes"])
    assert sum(n for (_, o), n in total.outcomes.items() if o == LOST) > 0   # pipelined behind a break-off
    # Both workers served, on kept-alive upstream connections (far fewer connects than requests).
    status = wait_for(lambda: (s := admin_status(gw.admin)) and all(w["connections"] == 0 for w in s["workers"])
                      and s, what="every client connection closed")
    ups = [w["upstreams"][0] for w in status["workers"]]
    assert all(u["connects"] > 0 for u in ups), ups
    assert sum(u["connects"] for u in ups) < total.answered() / 5, ups
    # Nothing left behind: no busy upstream connection, no task beyond the idle worker's.
    time.sleep(1.5)                                     # the next status snapshot
    status = admin_status(gw.admin)
    for w in status["workers"]:
        u = w["upstreams"][0]
        assert u["open_connections"] == u["idle_connections"], w
        before = next(i for i in idle if i["pid"] == w["pid"])
        assert w["asyncio_tasks"] <= before["asyncio_tasks"], (before, w)
    metrics = httpx.get(gw.base + "/metrics", timeout=5).text
    assert "\nfastgw_asyncio_tasks " in metrics


# -- bytes after a response's end --------------------------------------------------------------------------

class GluingUpstream:
    """A raw upstream that answers each request with its echoed tag, and glues a second, unsolicited answer
    with the same tag to it in the same write (a desynchronised or buggy upstream)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    @staticmethod
    def _answer(tag: str, note: str) -> bytes:
        content = orjson.dumps({"x-request-id": tag, TAG_HEADER: tag, "note": note}).decode()
        body = orjson.dumps({"id": "c", "object": "chat.completion", "model": tag, "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]})
        return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
            len(body), body)

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn):
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
                n = int(fields[b"content-length"])
                while len(buf) < n:
                    buf += conn.recv(65536)
                buf = buf[n:]
                tag = fields[b"x-request-id"].decode()
                conn.sendall(self._answer(tag, "answer") + self._answer(tag, "unsolicited"))

    def close(self):
        self.sock.close()


def test_bytes_after_a_response_are_never_the_next_clients_answer(tmp_path, start_gateway):
    up = GluingUpstream()
    try:
        gw = start_gateway(gateway_config(f"http://127.0.0.1:{up.port}/v1", 0))
        jobs, tally = Jobs(seed=4, fault_share=0), Tally()
        with httpx.Client(base_url=gw.base, timeout=10) as client:
            for _ in range(20):                         # one after the other: each finds the last one's connection
                job = jobs.next(stream=False)
                r = client.post("/v1/chat/completions", content=job.body(), headers=job.headers())
                tally.add(job, judge(job, Answer(r.status_code, dict(r.headers), r.content, True)))
        assert not tally.problems, tally.examples
        assert tally.outcomes[("none", OK)] == 20
        assert up.accepted == 20                        # each connection was dropped, never reused
    finally:
        up.close()
