"""`python -m perf run`: start the mock and each scenario's gateway, drive load with wrk, and record what the
gateway costs.

Per measured interval (after a warm-up) it records wrk's RPS, latency percentiles and errors (socket errors +
HTTP status >= 400), the gateway's CPU seconds from /proc for its whole process tree (utime+stime before and
after the interval) divided by requests, and the tree's peak RSS. Scenarios are run round-robin for each
repeat, so slow drift of a shared machine hits all of them alike; the ratios that matter (gateway RPS /
direct RPS, fastgw CPU / nginx CPU) are taken per repeat, within minutes of each other.

Pinning: with 2 or more CPUs, the gateway runs on the second CPU of this process's affinity set and the mock
and wrk share the first, so the gateway's CPU is its own and the RPS ceiling is the mock+wrk core.
"""
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

from perf import report
from perf.mocks import WORK_ROOT, fastgw_cmd, nginx_cmd, render, start_mock
from perf.procs import (Proc, cpus, free_port, leaf_pids, pinned, tree_cpu_seconds, tree_peak_rss_bytes,
                        wait_port)
from perf.scenarios import CONFIGS, PACED, PAYLOADS, TRANSLATE, SCENARIOS, WRK_SCRIPT, reference, with_references

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
HOST = "127.0.0.1"
BASELINE_RPS = 29005.51   # the seed: WireMock on 16 vCPU, k6 with 400 clients, 1,000-token chat, p99 30.35 ms
PROJECTION_CPUS = 12

# Deliberately slowed gateway, to show `compare` catches a regression: tracemalloc records a 5-frame
# traceback for every allocation and CPython's debug allocator checks every block (measured: ~4x the CPU per
# request; PYTHONMALLOC=debug alone costs little, since the hot path allocates little). The product is unchanged.
SLOWED_PYTHON_OPTS = ["-X", "tracemalloc=5"]
SLOWED_ENV = {"PYTHONMALLOC": "debug"}


class Cpu:
    """Who runs where: gateway alone on one CPU, mock + wrk on another (when there are two)."""

    def __init__(self):
        available = cpus()
        if len(available) >= 2:
            self.load, self.gateway = available[0], available[1]
            self.note = (f"gateway pinned to CPU {self.gateway}; mock and wrk pinned to CPU {self.load} "
                         f"(taskset; {len(available)} CPUs available)")
        else:
            self.load = self.gateway = None
            self.note = "not pinned: only one CPU available, gateway, mock and wrk share it"


def gateway_cmd(scenario, work, port, upstream_port, python_opts=()):
    """The command line of the scenario's proxy (None for `direct`)."""
    if scenario.via == "direct":
        return None
    if scenario.via == "nginx":
        return nginx_cmd("proxy-nginx", os.path.join(CONFIGS, "nginx-proxy.conf"), work,
                         HOST=HOST, PORT=port, UPSTREAM_HOST=HOST, UPSTREAM_PORT=upstream_port)
    if scenario.config:
        conf = render(os.path.join(CONFIGS, scenario.config), os.path.join(work, scenario.config),
                      HOST=HOST, PORT=port, UPSTREAM=f"http://{HOST}:{upstream_port}/v1", WORK=work,
                      CONFIGS=CONFIGS)
        args = ["serve", "--config", conf, "--workers", "1", "--host", HOST, "--port", str(port)]
    else:
        # The seed's test with the gateway's own features on, as in production: a JSON access-log line per
        # request written to a file, and metrics (the yardstick nginx logs nothing).
        args = ["serve", "--workers", "1", "--host", HOST, "--port", str(port),
                "--access-log", os.path.join(work, "access.log"), "--upstream", f"http://{HOST}:{upstream_port}/v1"]
    cmd = fastgw_cmd(*args)
    cmd[1:1] = list(python_opts)
    return cmd


def start_gateway(scenario, work, port, upstream_port, cpu, python_opts=(), env_extra=None, wrap=()):
    """Start the scenario's proxy (None for `direct`), optionally under a wrapper such as valgrind."""
    cmd = gateway_cmd(scenario, work, port, upstream_port, python_opts)
    if cmd is None:
        return None
    # PERF_PROVIDER_KEY: the key the translated providers' configs name (the mock takes any).
    env = dict(os.environ, PERF_PROVIDER_KEY="perf-mock-key", **(env_extra or {}))
    return Proc(f"gateway-{scenario.name}", [*wrap, *pinned(cmd, cpu)],
                os.path.join(work, f"gateway-{scenario.name}.log"), env=env)


class Mocks:
    """The run's mock, and the mocks some payloads need whatever the run's (the paced streams: the built-in
    one), each started on first use on the load CPU."""

    def __init__(self, default_kind, work, cpu):
        self.default_kind, self.work, self.cpu = default_kind, work, cpu
        self.started = {}   # kind -> {"proc", "port", "description"}

    def kind_for(self, scenario):
        return PAYLOADS[scenario.payload].mock or self.default_kind

    def for_scenario(self, scenario):
        kind = self.kind_for(scenario)
        if kind not in self.started:
            port = free_port()
            proc, desc = start_mock(kind, self.work, HOST, port, self.cpu.load)
            self.started[kind] = {"proc": proc, "port": port, "description": desc}
        return self.started[kind]

    def description(self):
        """The mocks used, each naming the payloads it served when it is not the run's own."""
        out = []
        for kind, m in self.started.items():
            served = sorted(p for p, pay in PAYLOADS.items() if pay.mock == kind)
            out.append(m["description"] + ("" if kind == self.default_kind else f" (for {', '.join(served)})"))
        return "; ".join(out)

    def stop(self):
        for m in self.started.values():
            m["proc"].stop()


def request_headers(scenario):
    """The headers wrk and the check requests send for the scenario (besides Content-Type)."""
    payload = PAYLOADS[scenario.payload]
    headers = dict(payload.headers)
    if payload.stream:
        headers["x-mock-stream"] = "1"
    if scenario.api_key:
        headers["Authorization"] = f"Bearer {scenario.api_key}"
    return headers


def whole_reply_bytes(scenario, port):
    """Bytes of one whole reply as wrk counts them (head, chunk framing, body): a raw keep-alive request, as
    wrk's (a `Connection: close` would change the head), read to the end of its chunked body."""
    payload = PAYLOADS[scenario.payload]
    with open(payload.body, "rb") as f:
        body = f.read()
    head = "".join(f"{k}: {v}\r\n" for k, v in request_headers(scenario).items())
    req = (f"POST {payload.path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n{head}"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    reply = b""
    with socket.create_connection((HOST, port), timeout=60) as sock:
        sock.sendall(req)
        while not reply.endswith(b"\r\n0\r\n\r\n"):
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    if b"transfer-encoding: chunked" not in reply.split(b"\r\n\r\n", 1)[0].lower():
        raise RuntimeError(f"{scenario.name}: a long reply must be chunked, got {reply[:300]!r}")
    return len(reply)


def check_reply(scenario, port):
    """One request before the load, so a broken setup fails with a message instead of a table of errors."""
    payload = PAYLOADS[scenario.payload]
    with open(payload.body, "rb") as f:
        body = f.read()
    headers = {"Content-Type": "application/json", **request_headers(scenario)}
    req = urllib.request.Request(f"http://{HOST}:{port}{payload.path}", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            data = resp.read()
            ctype = resp.headers.get("Content-Type", "")
    except Exception as e:
        detail = e.read()[:300] if hasattr(e, "read") else b""
        raise RuntimeError(f"{scenario.name}: check request failed: {e} {detail!r}") from None
    if payload.stream:
        if "text/event-stream" not in ctype or not data.rstrip().endswith(b"data: [DONE]"):
            raise RuntimeError(f"{scenario.name}: expected an SSE reply ending in [DONE], got {ctype} {data[-200:]!r}")
    elif b'"usage"' not in data:
        raise RuntimeError(f"{scenario.name}: expected a chat completion with usage, got {data[:200]!r}")


def wrk(scenario, port, seconds, connections, threads, cpu, timeout_s=None):
    payload = PAYLOADS[scenario.payload]
    connections = scenario.connections or connections
    timeout_s = timeout_s or (30 if payload.long else 10)   # a paced stream lasts seconds
    extra = "\n".join(f"{k}: {v}" for k, v in payload.headers)
    env = dict(os.environ, PERF_BODY=payload.body, PERF_PATH=payload.path, PERF_HEADERS=extra,
               PERF_STREAM="1" if payload.stream else "0", PERF_KEY=scenario.api_key or "")
    seconds = max(1, round(seconds))  # wrk takes whole seconds
    cmd = pinned(["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s",
                  "--timeout", f"{timeout_s}s", "-s", WRK_SCRIPT, f"http://{HOST}:{port}"], cpu)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 60)
    for line in out.stdout.splitlines():
        if line.startswith("PERF_JSON "):
            return json.loads(line[len("PERF_JSON "):])
    raise RuntimeError(f"wrk printed no PERF_JSON line:\n{out.stdout}\n{out.stderr}")


def profile(scenario, gw, opts, work):
    """py-spy on the worker (the leaf of the gateway's tree) for the measured interval; --native shows the
    C and Cython frames by name (build with FASTGW_PROFILE=1 for complete native stacks)."""
    out = os.path.join(RESULTS, f"flamegraph-{scenario.name}.svg")
    pid = leaf_pids(gw.pid)[0]
    cmd = ["py-spy", "record", "--native", "--format", "flamegraph", "--rate", "200", "-o", out,
           "--pid", str(pid), "--duration", str(max(1, round(opts["duration"])))]
    print(f"profiling pid {pid} -> {out}", file=sys.stderr)
    return Proc(f"py-spy-{scenario.name}", cmd, os.path.join(work, f"py-spy-{scenario.name}.log")), out


def finish_profile(spy):
    proc, out = spy
    rc = proc.popen.wait(60)
    proc.stop()
    if rc != 0 or not os.path.exists(out):
        print(f"py-spy failed ({rc}):\n{proc.log_tail()}", file=sys.stderr)
    else:
        print(f"flamegraph written: {out}", file=sys.stderr)


def measure(scenario, opts, work, mock, cpu):
    """One warm-up + one measured interval of one scenario; returns the sample dict. `mock`: {"proc", "port"}."""
    gw_port = free_port()
    gw = start_gateway(scenario, work, gw_port, mock["port"], cpu.gateway, opts["python_opts"], opts["env"])
    port = gw_port if gw else mock["port"]
    reply_bytes = None
    try:
        if gw:
            wait_port(HOST, gw_port, gw, 60)
        check_reply(scenario, port)
        if PAYLOADS[scenario.payload].long:
            reply_bytes = whole_reply_bytes(scenario, port)
        if opts["warmup"] > 0:
            wrk(scenario, port, opts["warmup"], opts["connections"], opts["threads"], cpu.load)
        gw_cpu0 = tree_cpu_seconds(gw.pid) if gw else 0.0
        mock_cpu0 = tree_cpu_seconds(mock["proc"].pid)
        spy = profile(scenario, gw, opts, work) if opts.get("profile") and gw else None
        t0 = time.monotonic()
        w = wrk(scenario, port, opts["duration"], opts["connections"], opts["threads"], cpu.load)
        wall = time.monotonic() - t0
        if spy:
            finish_profile(spy)
        gw_cpu = tree_cpu_seconds(gw.pid) - gw_cpu0 if gw else None
        mock_cpu = tree_cpu_seconds(mock["proc"].pid) - mock_cpu0
        rss = tree_peak_rss_bytes(gw.pid) if gw else None
        if gw and not gw.alive():
            raise RuntimeError(f"{gw.name} died during the run:\n{gw.log_tail()}")
    finally:
        if gw:
            gw.stop()
    n = w["requests"]
    if reply_bytes:   # long replies: streams cut in flight at wrk's end count as the fraction received
        n = w["bytes"] / reply_bytes
    errors = sum(w["errors"].values())
    lat = w["latency_us"]
    return {
        "requests": n,
        "whole_reply_bytes": reply_bytes, "completed_requests": w["requests"],
        "rps": n / (w["duration_us"] / 1e6),
        "p50_ms": lat["p50"] / 1000, "p95_ms": lat["p95"] / 1000, "p99_ms": lat["p99"] / 1000,
        "max_ms": lat["max"] / 1000, "mean_ms": lat["mean"] / 1000,
        "errors": errors, "error_detail": w["errors"],
        "bytes_per_req": w["bytes"] / n if n else 0,
        "cpu_s": gw_cpu,
        "cpu_us_per_req": gw_cpu * 1e6 / n if gw and n else None,
        "cpu_util": gw_cpu / wall if gw else None,
        "peak_rss_mb": rss / 2**20 if rss is not None else None,
        "mock_cpu_us_per_req": mock_cpu * 1e6 / n if n else None,
    }


NUMERIC = ["rps", "p50_ms", "p95_ms", "p99_ms", "max_ms", "errors", "cpu_us_per_req", "cpu_util", "peak_rss_mb",
           "mock_cpu_us_per_req", "rps_vs_direct", "cpu_vs_nginx", "cpu_vs_base", "instructions_per_req"]


def summarize(samples):
    """Median of each metric over the repeats, and its noise: relative standard deviation (None for 1 run)."""
    out, noise = {}, {}
    for key in NUMERIC:
        values = [s[key] for s in samples if s.get(key) is not None]
        if not values:
            continue
        out[key] = statistics.median(values)
        mean = statistics.fmean(values)
        noise[key] = statistics.stdev(values) / mean if len(values) > 1 and mean else None
    if samples and "instructions_per_req" in out:
        noise["instructions_per_req"] = None   # measured once per run, not per repeat: noise unknown
    out["requests"] = sum(s["requests"] for s in samples)
    out["errors_total"] = sum(s["errors"] for s in samples)
    out["noise"] = noise
    return out


def add_ratios(per_scenario):
    """Per repeat: gateway RPS / direct RPS, fastgw CPU / nginx CPU (same payload, same repeat), and a
    scenario's CPU / its base scenario's (policies / proxy: what the features cost, measured side by side)."""
    for name, samples in per_scenario.items():
        s = SCENARIOS[name]
        direct = reference(s, "direct")
        nginx = reference(s, "nginx")
        for i, sample in enumerate(samples):
            if s.is_gateway and direct and direct.name in per_scenario:
                sample["rps_vs_direct"] = sample["rps"] / per_scenario[direct.name][i]["rps"]
            if s.via == "fastgw" and nginx and nginx.name in per_scenario:
                ref = per_scenario[nginx.name][i]["cpu_us_per_req"]
                if ref and sample["cpu_us_per_req"]:
                    sample["cpu_vs_nginx"] = sample["cpu_us_per_req"] / ref
            if s.base and s.base in per_scenario:
                ref = per_scenario[s.base][i]["cpu_us_per_req"]
                if ref and sample["cpu_us_per_req"]:
                    sample["cpu_vs_base"] = sample["cpu_us_per_req"] / ref


def run(names, duration=15.0, connections=64, threads=1, warmup=3.0, repeat=1, mock_kind="nginx",
        python_opts=(), env=None, variant="normal", instructions=0, results_dir=RESULTS, save=True,
        baseline=False, references=True, profile=False, argv=None):
    """Run the scenarios and return the result dict (also written under `results_dir` when `save`)."""
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    skipped = {n: SCENARIOS[n].unavailable for n in names if SCENARIOS[n].unavailable}
    runnable = [n for n in names if n not in skipped]
    scenarios = with_references(runnable) if references else [SCENARIOS[n] for n in runnable]
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", file=sys.stderr)
    cpu = Cpu()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = os.path.join(WORK_ROOT, "runs", stamp)
    os.makedirs(work, exist_ok=True)
    opts = dict(duration=duration, connections=connections, threads=threads, warmup=warmup,
                python_opts=list(python_opts), env=dict(env or {}), profile=profile)
    load_before = os.getloadavg()
    mocks = Mocks(mock_kind, work, cpu)
    per_scenario = {s.name: [] for s in scenarios}
    try:
        for s in scenarios:   # every mock up before the first measurement
            mocks.for_scenario(s)
        for r in range(repeat):
            for s in scenarios:
                print(f"[{r + 1}/{repeat}] {s.name}: {duration:g}s, {s.connections or connections} connections ...",
                      file=sys.stderr, flush=True)
                per_scenario[s.name].append(measure(s, opts, work, mocks.for_scenario(s), cpu))
        if instructions:
            from perf import instr
            for s in scenarios:
                if s.is_gateway:
                    print(f"instructions: {s.name}, {instructions} requests under callgrind ...", file=sys.stderr)
                    ipr = instr.instructions_per_request(s, work, mocks.for_scenario(s)["port"], instructions,
                                                         opts)
                    for sample in per_scenario[s.name]:
                        sample["instructions_per_req"] = ipr
    finally:
        mocks.stop()
    add_ratios(per_scenario)
    result = {
        "meta": report.machine() | {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": "python -m perf " + " ".join(argv) if argv else None,
            "variant": variant,
            "python_opts": list(python_opts), "gateway_env": dict(env or {}),
            "mock": mock_kind, "mock_description": mocks.description(),
            "pinning": cpu.note,
            "duration_s": duration, "warmup_s": warmup, "connections": connections, "wrk_threads": threads,
            "repeats": repeat, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "skipped": skipped, "baseline_rps": BASELINE_RPS, "projection_cpus": PROJECTION_CPUS,
        },
        "scenarios": {},
    }
    for s in scenarios:
        summary = summarize(per_scenario[s.name])
        entry = {"via": s.via, "payload": s.payload, "what": s.what, "summary": summary,
                 "samples": per_scenario[s.name], "mock": mocks.kind_for(s)}
        if s.connections:
            entry["connections"] = s.connections
        if s.base and s.base in per_scenario:
            entry["base"] = s.base
        cpr = summary.get("cpu_us_per_req")
        if cpr:
            entry["projected_rps_12cpu"] = PROJECTION_CPUS * 1e6 / cpr
            entry["saturates_baseline"] = entry["projected_rps_12cpu"] >= BASELINE_RPS
        result["scenarios"][s.name] = entry
    if not os.environ.get("PERF_KEEP_WORK"):  # set it to inspect configs and logs of a run
        shutil.rmtree(work, ignore_errors=True)
    if save:
        # a run of paced streams only, or of translations only, is filed apart, so latest.* stays the default
        # set's (what compare reads)
        prefix = ("paced-" if runnable and set(runnable) <= set(PACED) else
                  "translate-" if runnable and set(runnable) <= set(TRANSLATE) else "")
        write(result, results_dir, stamp, baseline, prefix)
    return result


def write(result, results_dir, stamp, baseline=False, prefix=""):
    os.makedirs(results_dir, exist_ok=True)
    commit = result["meta"].get("git_commit", "nocommit")[:7]
    base = os.path.join(results_dir, f"{prefix}{stamp}-{commit}")
    if result["meta"]["variant"] != "normal":
        base += "-" + result["meta"]["variant"]
    md = report.markdown(result)
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(md)
    result["files"] = {"json": base + ".json", "md": base + ".md"}
    if result["meta"]["variant"] == "normal":
        shutil.copyfile(base + ".json", os.path.join(results_dir, f"{prefix}latest.json"))
        shutil.copyfile(base + ".md", os.path.join(results_dir, f"{prefix}latest.md"))
    if baseline:
        shutil.copyfile(base + ".json", os.path.join(results_dir, f"{prefix}baseline.json"))
