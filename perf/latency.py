"""`python -m perf.latency`: the latency fastgw adds, at about half of its capacity and near it.

Issue 16 item 5. wrk has no rate option, so the load is paced: each connection waits 1 ms between its requests
(PERF_DELAY_MS in perf/scenarios/wrk.lua), and the number of connections sets the rate (a request takes about
1 ms more at these loads), from the gateway's capacity measured first (wrk flat out, 64 connections). The rate
reached is reported beside the target. At each level the mock alone (`direct`) and fastgw in front of it (`proxy`, access
log and metrics on) get the same paced load, one after the other; the added latency is the difference of
their percentiles. Non-streaming chat (the seed's 4.9 KB request) from the nginx mock, one pinned worker.

Writes perf/results/latency-<date>-<commit>.{json,md} and latency-latest.{json,md}.
"""
import json
import os
import shutil
import subprocess
import sys
import time

from perf import report
from perf.mocks import WORK_ROOT, start_mock
from perf.procs import free_port, pinned, wait_port
from perf.run import HOST, RESULTS, Cpu, start_gateway
from perf.scenarios import PAYLOADS, SCENARIOS, WRK_SCRIPT

CONNECTIONS = 64
LEVELS = (0.5, 0.9)


def wrk(port, seconds, cpu, delay_ms=None, connections=CONNECTIONS):
    payload = PAYLOADS["chat"]
    env = dict(os.environ, PERF_BODY=payload.body, PERF_PATH=payload.path, PERF_STREAM="0", PERF_KEY="")
    if delay_ms is not None:
        env["PERF_DELAY_MS"] = str(delay_ms)
    cmd = pinned(["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s", "--timeout", "10s", "-s",
                  WRK_SCRIPT, f"http://{HOST}:{port}"], cpu.load)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 60)
    for line in out.stdout.splitlines():
        if line.startswith("PERF_JSON "):
            j = json.loads(line[len("PERF_JSON "):])
            lat = j["latency_us"]
            return {"rps": j["requests"] / (j["duration_us"] / 1e6), "p50_ms": lat["p50"] / 1e3,
                    "p99_ms": lat["p99"] / 1e3, "max_ms": lat["max"] / 1e3,
                    "errors": sum(j["errors"].values())}
    raise RuntimeError(f"wrk printed no PERF_JSON line:\n{out.stdout}\n{out.stderr}")


def markdown(result):
    m = result["meta"]
    lines = [f"# fastgw added latency — {result['date']}", "",
             f"Commit `{m['git_commit'][:10]}`; {m['cpu_model']}, {m['cpus_usable']} CPUs usable. "
             f"Command: `{result['command']}`. {result['setup']}", "",
             f"Capacity (wrk flat out, {CONNECTIONS} connections): fastgw {result['capacity_rps']:,.0f} req/s.", "",
             "| target | connections | direct req/s | fastgw req/s (of capacity) | direct p50 / p99 ms | "
             "fastgw p50 / p99 ms | added p50 ms | added p99 ms |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["levels"]:
        d, g = r["direct"], r["proxy"]
        lines.append(f"| {r['level']:.0%} of capacity | {r['connections']} | {d['rps']:,.0f} | "
                     f"{g['rps']:,.0f} ({g['rps'] / result['capacity_rps']:.0%}) | "
                     f"{d['p50_ms']:.2f} / {d['p99_ms']:.2f} | {g['p50_ms']:.2f} / {g['p99_ms']:.2f} | "
                     f"{g['p50_ms'] - d['p50_ms']:.2f} | {g['p99_ms'] - d['p99_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    seconds = 10
    cpu = Cpu()
    work = os.path.join(WORK_ROOT, f"latency-{int(time.time())}")
    os.makedirs(work, exist_ok=True)
    mock_port = free_port()
    mock, desc = start_mock("nginx", work, HOST, mock_port, cpu.load)
    port = free_port()
    gw = start_gateway(SCENARIOS["proxy"], work, port, mock_port, cpu.gateway)
    try:
        wait_port(HOST, port, gw, 30)
        wrk(port, 3, cpu)                                   # warm-up
        capacity = wrk(port, 5, cpu)["rps"]
        levels = []
        for level in LEVELS:
            # Each connection: 1 ms of delay + ~1 ms per request, so ~500 requests a second per connection.
            conns = max(1, round(level * capacity * 0.002))
            print(f"{level:.0%} of {capacity:,.0f} req/s: {conns} connections", file=sys.stderr, flush=True)
            levels.append({"level": level, "connections": conns,
                           "direct": wrk(mock_port, seconds, cpu, 1, conns),
                           "proxy": wrk(port, seconds, cpu, 1, conns)})
    finally:
        gw.stop()
        mock.stop()
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "meta": report.machine(),
              "command": "python -m perf.latency " + " ".join(argv), "capacity_rps": capacity, "levels": levels,
              "setup": f"{cpu.note}; mock: {desc}; wrk 1 thread, {seconds} s per measurement, each connection "
                       "waiting 1 ms between its requests."}
    report.save(RESULTS, "latency", result, markdown(result))
    print(markdown(result))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
