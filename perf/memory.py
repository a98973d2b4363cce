"""`python -m perf.memory [N]`: what one open connection and one open stream cost a gateway worker in memory.

One worker (the paced-streams-2000 scenario's config: access log, metrics, room for 4,096 upstream connections,
so every client gets its own upstream connection), pinned like the other scenarios, in front of the built-in mock
(it alone can hold a stream open). For each case the gateway and the mock are started fresh, warmed up with a
few requests on one connection, and the worker's resident set (VmRSS of the worker, not the supervisor) is read
idle, then with N (default 2,000) client connections open at once, from this process (a small asyncio client on
plain sockets):

  connected    the clients connected and sent nothing: what a client connection alone costs
  keep-alive   each client made one small chat request, read the whole reply and keeps its connection open:
               N idle client connections, and the upstream connections their burst opened, idle in the pool
  streams      each client's stream is held mid-stream: the mock wrote the head and the first event, and waits
               10 minutes before the next one (x-mock-paced, x-mock-chunk-delay-ms)

bytes each = (RSS with N - RSS idle) / N: a client connection, with its upstream connection but in the first case.
The mock's RSS is reported apart (it holds the N upstream connections' other ends), and the open
descriptors of both, which show how many connections each really held.

Writes perf/results/memory-<date>-<commit>.{json,md} and memory-latest.{json,md}.
"""
import asyncio
import json
import os
import shutil
import sys
import time

from perf import report
from perf.mocks import WORK_ROOT, start_mock
from perf.procs import free_port, leaf_pids, open_fds, status_kb, wait_port
from perf.run import HOST, RESULTS, Cpu, start_gateway
from perf.scenarios import SCENARIOS

CONFIG_OF = SCENARIOS["paced-streams-2000"]     # streams.toml: 4,096 upstream connections allowed
SETTLE_S = 1.0          # after the last reply, before reading RSS: deferred work (access log flush) done
CONNECT_AT_ONCE = 256   # connects in flight at a time (the listen backlogs are 2,048)
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}
# The mock writes the head and the first event at once, then waits 10 minutes: the stream stays open mid-way.
HOLD_HEADERS = (("x-mock-paced", "1"), ("x-mock-chunk-delay-ms", "600000"), ("x-mock-chunks", "4"))


def request(body, headers=()):
    data = json.dumps(body).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


async def read_reply(reader):
    """One whole reply (Content-Length or chunked); raises on a status other than 200."""
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"reply: {head[:200]!r}")
    fields = head.lower()
    if b"transfer-encoding: chunked" in fields:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                return
    length = int(fields.split(b"content-length:")[1].split(b"\r\n")[0])
    await reader.readexactly(length)


async def read_first_event(reader):
    """The head of a streamed reply and its first SSE event; the rest is left unread (the stream stays open)."""
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200") or b"text/event-stream" not in head:
        raise RuntimeError(f"stream reply: {head[:200]!r}")
    got = b""
    while b"data: " not in got:
        data = await reader.read(65536)
        if not data:
            raise RuntimeError("the stream ended before its first event")
        got += data


async def open_clients(port, n, req, read):
    """n connections, each sends `req` (if any) once all are open and `read`s its reply; returns them."""
    gate = asyncio.Semaphore(CONNECT_AT_ONCE)

    async def connect():
        async with gate:
            return await asyncio.open_connection(HOST, port)

    conns = await asyncio.gather(*(connect() for _ in range(n)))
    if req:
        for _, writer in conns:
            writer.write(req)
        await asyncio.wait_for(asyncio.gather(*(read(reader) for reader, _ in conns)), 120)
    return conns


def close_clients(conns):
    for _, writer in conns:
        writer.transport.abort()


def snapshot(gateway_worker, mock_pid):
    return {"worker_rss_kb": status_kb(gateway_worker, "VmRSS"), "worker_fds": open_fds(gateway_worker),
            "mock_rss_kb": status_kb(mock_pid, "VmRSS"), "mock_fds": open_fds(mock_pid)}


async def measure_case(case, n, cpu, work):
    """Fresh mock and gateway; their RSS idle (after a warm-up) and with n clients held open as `case` says."""
    mock_port, port = free_port(), free_port()
    mock, _ = start_mock("fastgw", work, HOST, mock_port, cpu.load)
    gw = None
    try:
        gw = start_gateway(CONFIG_OF, work, port, mock_port, cpu.gateway)
        wait_port(HOST, port, gw, 60)
        worker, mock_pid = leaf_pids(gw.pid)[0], leaf_pids(mock.pid)[0]
        # Warm-up on one connection: imports, caches and first-use allocations are in the idle figure.
        reader, writer = await asyncio.open_connection(HOST, port)
        for _ in range(20):
            writer.write(request(CHAT))
            await read_reply(reader)
            writer.write(request(STREAM))
            await read_reply(reader)
        writer.transport.abort()
        await asyncio.sleep(SETTLE_S)
        idle = snapshot(worker, mock_pid)
        if case == "connected":
            conns = await open_clients(port, n, None, None)
        elif case == "keep-alive":
            conns = await open_clients(port, n, request(CHAT), read_reply)
        else:
            conns = await open_clients(port, n, request(STREAM, HOLD_HEADERS), read_first_event)
        await asyncio.sleep(SETTLE_S)
        loaded = snapshot(worker, mock_pid)
        close_clients(conns)
        if not gw.alive():
            raise RuntimeError(f"the gateway died:\n{gw.log_tail()}")
    finally:
        if gw:
            gw.stop()
        mock.stop()
    return {"case": case, "clients": n, "idle": idle, "loaded": loaded,
            "worker_idle_mb": idle["worker_rss_kb"] / 1024, "worker_loaded_mb": loaded["worker_rss_kb"] / 1024,
            "worker_bytes_each": (loaded["worker_rss_kb"] - idle["worker_rss_kb"]) * 1024 / n,
            "worker_sockets_added": loaded["worker_fds"] - idle["worker_fds"],
            "mock_idle_mb": idle["mock_rss_kb"] / 1024, "mock_loaded_mb": loaded["mock_rss_kb"] / 1024,
            "mock_bytes_each": (loaded["mock_rss_kb"] - idle["mock_rss_kb"]) * 1024 / n,
            "mock_sockets_added": loaded["mock_fds"] - idle["mock_fds"]}


CASES = {"connected": "client connection that has sent nothing yet (no upstream connection)",
         "keep-alive": "idle keep-alive client connection (it made one chat request) + its idle upstream connection",
         "streams": "open stream held mid-stream (client connection + busy upstream connection)"}


def markdown(result):
    m = result["meta"]
    lines = [f"# fastgw memory per connection — {result['date']}", "",
             f"Commit `{m['git_commit'][:10]}`{' (uncommitted changes)' if m['git_dirty'] else ''}; "
             f"{m['cpu_model']}, {m['cpus_usable']} CPUs usable; Python {m['python']}.", "",
             f"Command: `{result['command']}`. {result['setup']}", "",
             "| case | N | worker RSS idle / with N MB | **worker bytes each** | worker sockets added | "
             "mock RSS idle / with N MB | mock bytes each |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        lines.append(f"| {r['case']} | {r['clients']:,} | {r['worker_idle_mb']:.1f} / {r['worker_loaded_mb']:.1f} | "
                     f"**{r['worker_bytes_each']:,.0f}** | {r['worker_sockets_added']:,} | "
                     f"{r['mock_idle_mb']:.1f} / {r['mock_loaded_mb']:.1f} | {r['mock_bytes_each']:,.0f} |")
    lines += ["", "Cases:"] + [f"- `{k}`: one {v}." for k, v in CASES.items()]
    lines += ["", "bytes each = (worker VmRSS with N open - VmRSS idle) / N, the idle figure taken after a warm-up "
              "on one connection; sockets added = the worker's open descriptors with N minus idle (2 N when each "
              "client holds an upstream connection). The kernel's socket buffers are not in RSS. The clients' "
              "requests arrive at once, so the gateway opens the upstream connections in one burst: what the "
              "connect machinery allocates meanwhile (tasks, futures) is freed, but part of its pages stay resident "
              "and are counted."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    n = int(argv[0]) if argv else 2000
    cpu = Cpu()
    meta = report.machine()         # before the pinning below: it records the CPUs this machine offers
    if cpu.load is not None:        # the clients share the mock's CPU, as wrk does in the other scenarios
        os.sched_setaffinity(0, {cpu.load})
    work = os.path.join(WORK_ROOT, f"memory-{int(time.time())}")
    os.makedirs(work, exist_ok=True)
    runs = []
    for case in CASES:
        print(f"{case}: {n} clients ...", file=sys.stderr, flush=True)
        runs.append(asyncio.run(measure_case(case, n, cpu, work)))
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "meta": meta,
              "command": "python -m perf.memory " + " ".join(argv), "runs": runs,
              "setup": f"{cpu.note}; the clients (this process) on the mock's CPU; mock: the built-in one; fastgw "
                       f"with perf/configs/{CONFIG_OF.config}, one worker; gateway and mock started fresh per case."}
    report.save(RESULTS, "memory", result, markdown(result))
    print(markdown(result))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
