"""`python -m perf fairness`: thousands of keep-alive clients on one worker, beside nginx in the same run.

Issue 16's case, as a new user tried it: one gateway worker pinned to one CPU, the nginx mock and wrk on the
other, a small chat request, `wrk -t2 -c N --timeout 15s`, each proxy started fresh (the first burst on a
fresh gateway is the one that used to starve). Reports p50/p90/p99/max latency, timeouts and errors, RPS and
CPU per request for fastgw and nginx `proxy_pass` at each N. nginx is given enough worker_connections for N
clients plus as many upstream connections.

Writes perf/results/fairness-<date>-<commit>.{json,md} and fairness-latest.{json,md}.
"""
import json
import os
import shutil
import subprocess
import sys
import time

from perf import report
from perf.mocks import WORK_ROOT, fastgw_cmd, nginx_cmd, start_mock
from perf.procs import (Proc, free_port, leaf_pids, pinned, status_kb, tree_cpu_seconds, tree_peak_rss_bytes,
                        wait_port)
from perf.run import HOST, RESULTS, Cpu
from perf.scenarios import CONFIGS, WRK_SCRIPT

SMALL_CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
TARGET_P99_RATIO = 2.0          # issue 16: p99 within 2x nginx's in the same run, no timeouts


def start_proxy(kind, work, port, upstream_port, cpu, clients):
    if kind == "nginx":
        # The perf suite's nginx config, with room for every client and as many upstream connections.
        with open(os.path.join(CONFIGS, "nginx-proxy.conf")) as f:
            room = min(max(8192, 2 * clients + 1024), 19000)          # (this machine's descriptor limit: 20,000)
            conf = f.read().replace("worker_connections 8192;", f"worker_connections {room};")
        template = os.path.join(work, "nginx-proxy-fair.conf")
        with open(template, "w") as f:
            f.write(conf)
        cmd = nginx_cmd("fair-nginx", template, work, HOST=HOST, PORT=port, UPSTREAM_HOST=HOST,
                        UPSTREAM_PORT=upstream_port)
    else:
        conf = os.path.join(work, "fair-fastgw.toml")
        with open(conf, "w") as f:
            f.write(f'[server]\naccess_log = "{os.path.join(work, "access.log")}"\n'
                    f'[[models]]\nname = "*"\n[[models.deployments]]\nurl = "http://{HOST}:{upstream_port}/v1"\n')
        cmd = fastgw_cmd("serve", "--workers", "1", "--host", HOST, "--port", str(port), "--config", conf)
    proc = Proc(f"fair-{kind}", pinned(cmd, cpu.gateway), os.path.join(work, f"fair-{kind}.log"))
    wait_port(HOST, port, proc, 30)
    return proc


def load(port, clients, seconds, cpu, body_path):
    env = dict(os.environ, PERF_BODY=body_path, PERF_PATH="/v1/chat/completions", PERF_STREAM="0", PERF_KEY="")
    cmd = pinned(["wrk", "-t", "2", "-c", str(clients), "-d", f"{seconds}s", "--timeout", "15s", "-s", WRK_SCRIPT,
                  f"http://{HOST}:{port}"], cpu.load)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 120)
    for line in out.stdout.splitlines():
        if line.startswith("PERF_JSON "):
            return json.loads(line[len("PERF_JSON "):])
    raise RuntimeError(f"wrk printed no PERF_JSON line:\n{out.stdout}\n{out.stderr}")


def measure(kind, clients, seconds, cpu, work, upstream_port, body_path):
    port = free_port()
    proc = start_proxy(kind, work, port, upstream_port, cpu, clients)
    try:
        # The worker (fastgw's, or nginx's) apart from the supervisor/master: idle RSS, then its peak.
        worker = leaf_pids(proc.pid)[0]
        idle_kb = status_kb(worker, "VmRSS")
        c0 = tree_cpu_seconds(proc.pid)
        w = load(port, clients, seconds, cpu, body_path)
        used = tree_cpu_seconds(proc.pid) - c0
        rss = tree_peak_rss_bytes(proc.pid)
        peak_kb = status_kb(worker, "VmHWM")
        if not proc.alive():
            raise RuntimeError(f"{kind} died:\n{proc.log_tail()}")
    finally:
        proc.stop()
    lat = w["latency_us"]
    n = w["requests"]
    return {"proxy": kind, "clients": clients, "requests": n, "rps": n / (w["duration_us"] / 1e6),
            "p50_ms": lat["p50"] / 1e3, "p90_ms": lat["p90"] / 1e3, "p99_ms": lat["p99"] / 1e3,
            "max_ms": lat["max"] / 1e3, "timeouts": w["errors"]["timeout"],
            "errors": sum(v for k, v in w["errors"].items() if k != "timeout"),
            "cpu_us_per_req": used * 1e6 / n if n else None, "peak_rss_mb": rss / 2**20,
            "worker_idle_rss_mb": idle_kb / 1024, "worker_peak_rss_mb": peak_kb / 1024,
            "worker_bytes_per_client": (peak_kb - idle_kb) * 1024 / clients}


def markdown(result):
    m = result["meta"]
    lines = [f"# fastgw fairness: thousands of clients on one worker — {result['date']}", "",
             f"Commit `{m['git_commit'][:10]}`{' (uncommitted changes)' if m['git_dirty'] else ''}; "
             f"{m['cpu_model']}, {m['cpus_usable']} CPUs usable; nginx {m['versions']['nginx']}.",
             "", f"Command: `{result['command']}`. {result['setup']}", "",
             "| clients | proxy | RPS | p50 ms | p90 ms | p99 ms | max ms | timeouts | errors | CPU µs/req | "
             "worker RSS idle / peak MB | worker bytes per client | all processes' peak RSS MB |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        lines.append(f"| {r['clients']:,} | {r['proxy']} | {r['rps']:,.0f} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {r['max_ms']:.0f} | {r['timeouts']} | {r['errors']} | "
                     f"{r['cpu_us_per_req']:.1f} | {r['worker_idle_rss_mb']:.0f} / {r['worker_peak_rss_mb']:.0f} | "
                     f"{r['worker_bytes_per_client']:,.0f} | {r['peak_rss_mb']:.0f} |")
    lines.append("")
    for n, ratio in result["p99_ratio"].items():
        lines.append(f"- {int(n):,} clients: fastgw p99 = **{ratio:.2f}x** nginx's "
                     f"(target ≤ {TARGET_P99_RATIO:g}x, no timeouts).")
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    clients = [int(a) for a in argv if a.isdigit()] or [2000, 10000]
    seconds = 15
    cpu = Cpu()
    work = os.path.join(WORK_ROOT, f"fairness-{int(time.time())}")
    os.makedirs(work, exist_ok=True)
    body_path = os.path.join(work, "small-chat.json")
    with open(body_path, "w") as f:
        json.dump(SMALL_CHAT, f)
    mock_port = free_port()
    mock, desc = start_mock("nginx", work, HOST, mock_port, cpu.load)
    runs = []
    try:
        for n in clients:
            for kind in ("nginx", "fastgw"):
                print(f"{kind}: {n} clients, {seconds} s ...", file=sys.stderr, flush=True)
                runs.append(measure(kind, n, seconds, cpu, work, mock_port, body_path))
    finally:
        mock.stop()
    ratio = {}
    for n in clients:
        by = {r["proxy"]: r for r in runs if r["clients"] == n}
        ratio[str(n)] = by["fastgw"]["p99_ms"] / by["nginx"]["p99_ms"]
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "meta": report.machine(),
              "command": "python -m perf.fairness " + " ".join(argv), "runs": runs, "p99_ratio": ratio,
              "setup": f"{cpu.note}; mock: {desc}; wrk -t2 --timeout 15s, {seconds} s per run, each proxy started "
                       "fresh for its run, small chat request."}
    report.save(RESULTS, "fairness", result, markdown(result))
    print(markdown(result))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
