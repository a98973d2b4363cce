"""`python -m perf.ttft`: the time to first token fastgw adds to streams, at a light and at a heavy load.

Issue 16 item 5 (the stream half; perf.latency measures whole JSON responses). A Python asyncio client (on the
load CPU, with the built-in mock) keeps N streams open back to back on N keep-alive connections; each stream is
the mock's paced chat stream (x-mock-paced: one SSE event per write, 20 events 20 ms apart: 0.4 s a stream, as
providers send tokens) and its TTFT is the time from writing the request to reading the first `data:` event.
At each level the mock alone (`direct`) and fastgw in front of it (the `paced-stream` gateway: access log and
metrics on, one pinned worker) get the same load one after the other; the added TTFT is the difference of their
percentiles. The gateway's and the load CPU's busy fractions are reported beside each level: the heavy level
is as many open streams as the load CPU can drive. On two cores that CPU, not the gateway, saturates first, and
every extra hop through it (client -> gateway -> mock and back) queues behind the others: read the heavy level's
added TTFT as an upper bound.

Writes perf/results/ttft-<date>-<commit>.{json,md} and ttft-latest.{json,md}.
"""
import asyncio
import os
import shutil
import sys
import time

from perf import report
from perf.mocks import WORK_ROOT, start_mock
from perf.procs import free_port, tree_cpu_seconds, wait_port
from perf.run import HOST, RESULTS, Cpu, start_gateway
from perf.scenarios import SCENARIOS

LEVELS = (32, 400)        # open streams
SECONDS = 10
EVENTS, GAP_MS = 20, 20
BODY = (b'{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},'
        b'"messages":[{"role":"user","content":"Say hello"}]}')


def _request(port):
    return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: %s:%d\r\ncontent-type: application/json\r\n"
            b"x-mock-paced: 1\r\nx-mock-chunks: %d\r\nx-mock-chunk-delay-ms: %d\r\ncontent-length: %d\r\n\r\n%s"
            % (HOST.encode(), port, EVENTS, GAP_MS, len(BODY), BODY))


async def _one_connection(port, until, ttfts, errors):
    reader, writer = await asyncio.open_connection(HOST, port)
    req = _request(port)
    try:
        while time.monotonic() < until:
            t0 = time.perf_counter()
            writer.write(req)
            first = None
            buf = b""
            while True:                      # chunked SSE body: the stream ends with the last chunk
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("closed mid-stream")
                if first is None and b"data:" in data:
                    first = time.perf_counter() - t0
                buf = (buf + data)[-16:]
                if buf.endswith(b"0\r\n\r\n"):
                    break
            ttfts.append(first)
    except (OSError, ConnectionError):
        errors.append(1)
    finally:
        writer.close()


async def _load(port, streams, seconds):
    ttfts, errors = [], []
    until = time.monotonic() + seconds
    await asyncio.gather(*[_one_connection(port, until, ttfts, errors) for _ in range(streams)])
    ttfts.sort()
    pick = lambda q: ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] * 1e3 if ttfts else None  # noqa: E731
    return {"streams": len(ttfts), "errors": len(errors), "p50_ms": pick(0.5), "p99_ms": pick(0.99),
            "max_ms": ttfts[-1] * 1e3 if ttfts else None}


def measure(port, streams, seconds, mock_proc, gw_proc=None):
    """One level; also how busy the gateway's CPU and the load CPU (this client + the mock) were."""
    cpu0, t0 = (tree_cpu_seconds(gw_proc.pid) if gw_proc else 0.0), time.monotonic()
    load0 = tree_cpu_seconds(mock_proc.pid) + time.process_time()
    out = asyncio.run(_load(port, streams, seconds))
    wall = time.monotonic() - t0
    out["load_cpu_busy"] = (tree_cpu_seconds(mock_proc.pid) + time.process_time() - load0) / wall
    if gw_proc:
        out["gateway_cpu_busy"] = (tree_cpu_seconds(gw_proc.pid) - cpu0) / wall
    return out


def markdown(result):
    m = result["meta"]
    lines = [f"# fastgw added time to first token — {result['date']}", "",
             f"Commit `{m['git_commit'][:10]}`; {m['cpu_model']}, {m['cpus_usable']} CPUs usable. "
             f"Command: `{result['command']}`. {result['setup']}", "",
             "| open streams | direct TTFT p50 / p99 ms | fastgw TTFT p50 / p99 ms | added p50 ms | added p99 ms | "
             "fastgw max ms | streams (direct / fastgw) | errors | gateway CPU busy | load CPU busy (direct / "
             "fastgw) |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["levels"]:
        d, g = r["direct"], r["proxy"]
        lines.append(f"| {r['streams']} | {d['p50_ms']:.2f} / {d['p99_ms']:.2f} | {g['p50_ms']:.2f} / "
                     f"{g['p99_ms']:.2f} | {g['p50_ms'] - d['p50_ms']:.2f} | {g['p99_ms'] - d['p99_ms']:.2f} | "
                     f"{g['max_ms']:.1f} | {d['streams']:,} / {g['streams']:,} | {d['errors'] + g['errors']} | "
                     f"{g['gateway_cpu_busy']:.0%} | {d['load_cpu_busy']:.0%} / {g['load_cpu_busy']:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    levels = [int(a) for a in argv] or list(LEVELS)
    cpu = Cpu()
    meta = report.machine()                          # before this process is pinned to the load CPU
    work = os.path.join(WORK_ROOT, f"ttft-{int(time.time())}")
    os.makedirs(work, exist_ok=True)
    mock_port, port = free_port(), free_port()
    mock, desc = start_mock("fastgw", work, HOST, mock_port, cpu.load)
    gw = start_gateway(SCENARIOS["paced-streams-2000"], work, port, mock_port, cpu.gateway)
    if cpu.load is not None:
        os.sched_setaffinity(0, {cpu.load})          # the client shares the load CPU with the mock
    results = []
    try:
        wait_port(HOST, port, gw, 30)
        for n in levels:
            print(f"{n} open streams", file=sys.stderr, flush=True)
            measure(port, n, 2, mock)                # warm-up: the gateway's n upstream connections are open
            results.append({"streams": n, "direct": measure(mock_port, n, SECONDS, mock),
                            "proxy": measure(port, n, SECONDS, mock, gw)})
    finally:
        gw.stop()
        mock.stop()
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "meta": meta,
              "command": "python -m perf.ttft " + " ".join(argv), "levels": results,
              "setup": f"{cpu.note}; mock: {desc}; an asyncio client on the load CPU, {SECONDS} s per measurement, "
                       f"streams of {EVENTS} events {GAP_MS} ms apart back to back on each connection; the gateway "
                       "as in `paced-streams-2000` (room for 4,096 upstream connections)."}
    report.save(RESULTS, "ttft", result, markdown(result))
    print(markdown(result))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
