"""Describe the machine and render a run's result as a Markdown summary a newcomer can read."""
import json
import os
import platform
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _cmd(*args):
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=10, cwd=REPO)
        return (out.stdout or out.stderr).strip()
    except (OSError, subprocess.TimeoutExpired):
        return None


def _module_version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


def machine():
    """CPU, cores, kernel, tool versions and the git commit: what a reader needs to compare two results."""
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_kb = None
    try:
        with open("/proc/meminfo") as f:
            mem_kb = int(f.readline().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    dirty = _cmd("git", "status", "--porcelain", "--untracked-files=no")
    return {
        "cpu_model": model,
        "cpus_online": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "mem_gb": round(mem_kb / 2**20, 1) if mem_kb else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": {
            "nginx": (_cmd("nginx", "-v") or "").split("/")[-1],
            "wrk": (_cmd("wrk", "-v") or "").split()[1] if _cmd("wrk", "-v") else None,
            "fastgw": _module_version("fastgw"),
            "uvloop": _module_version("uvloop"),
            "cython": _module_version("cython"),
            "orjson": _module_version("orjson"),
        },
        "git_commit": _cmd("git", "rev-parse", "HEAD") or "nocommit",
        "git_dirty": bool(dirty),
    }


def save(results_dir, tag, result, text, stamp=None):
    """Write `result` (JSON) and `text` (Markdown) as <tag>-<date>-<commit> and <tag>-latest in results_dir."""
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    commit = (result["meta"].get("git_commit") or "nocommit")[:7]
    os.makedirs(results_dir, exist_ok=True)
    for stem in (f"{tag}-{stamp}-{commit}", f"{tag}-latest"):
        with open(os.path.join(results_dir, stem + ".json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(results_dir, stem + ".md"), "w") as f:
            f.write(text)


def _f(value, fmt="{:,.0f}", none="–"):
    return none if value is None else fmt.format(value)


def markdown(result):
    m = result["meta"]
    sc = result["scenarios"]
    lines = [
        f"# fastgw benchmark — {m['date']}",
        "",
        f"Commit `{m['git_commit'][:10]}`{' (uncommitted changes)' if m['git_dirty'] else ''}, "
        f"variant **{m['variant']}**" + (f" (python {' '.join(m['python_opts'])}, env {m['gateway_env']})"
                                         if m["variant"] != "normal" else "") + ".",
        f"Machine: {m['cpu_model']}, {m['cpus_online']} CPUs online ({m['cpus_usable']} usable), "
        f"{m['mem_gb']} GB, Linux {m['kernel']}, Python {m['python']}, nginx {m['versions']['nginx']}, "
        f"wrk {m['versions']['wrk']}, uvloop {m['versions']['uvloop']}, Cython {m['versions']['cython']}.",
        f"Load: wrk, {m['wrk_threads']} thread, {m['connections']} keep-alive connections, {m['warmup_s']:g} s warm-up, "
        f"{m['duration_s']:g} s measured, {m['repeats']} repeat(s) (figures are medians). "
        f"Mock: {m['mock_description']}.",
        f"Pinning: {m['pinning']}. Load average before/after: "
        f"{m['loadavg_before'][0]:.2f} / {m['loadavg_after'][0]:.2f} (a shared machine: trust ratios more "
        "than absolute RPS).",
        "",
        "| scenario | what | RPS | vs direct | p50 ms | p99 ms | errors | gateway CPU µs/req | vs nginx "
        "| gateway CPU busy | peak RSS MB | instr/req | 12-CPU projection |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, e in sc.items():
        s = e["summary"]
        noise = s["noise"].get("cpu_us_per_req")
        cpu = _f(s.get("cpu_us_per_req"), "{:.1f}")
        if noise is not None and s.get("cpu_us_per_req") is not None:
            cpu += f" ±{noise * 100:.0f}%"
        proj = e.get("projected_rps_12cpu")
        proj_txt = "–" if proj is None else f"{proj:,.0f} ({'≥' if e['saturates_baseline'] else '<'} 29k)"
        lines.append(
            f"| {name} | {e['what']} | {_f(s['rps'])} | {_f(s.get('rps_vs_direct'), '{:.2f}')} "
            f"| {_f(s['p50_ms'], '{:.2f}')} | {_f(s['p99_ms'], '{:.2f}')} | {s['errors_total']} | {cpu} "
            f"| {_f(s.get('cpu_vs_nginx'), '{:.2f}×')} | {_f(s.get('cpu_util'), '{:.0%}')} "
            f"| {_f(s.get('peak_rss_mb'), '{:.1f}')} | {_f(s.get('instructions_per_req'), '{:,.0f}')} | {proj_txt} |")
    lines += ["", "How to read it:",
              "- **RPS / vs direct**: throughput, and the fraction of the mock's own ceiling (`direct`, same payload, "
              "same run) the proxy reaches. The mock and wrk share one CPU, so `direct` is the ceiling here.",
              "- **gateway CPU µs/req**: utime+stime of the proxy's whole process tree (/proc) over the measured "
              "interval, divided by requests; ± is the relative standard deviation over repeats. The cost that "
              "decides how many CPUs a deployment needs; steadier than RPS on a shared machine.",
              "- **vs nginx**: fastgw's CPU per request as a multiple of nginx proxy_pass's for the same payload "
              "(target ≤ 1.2× for `proxy`).",
              "- **gateway CPU busy**: CPU seconds / wall seconds; near 100% means the gateway, not the mock, was "
              "the bottleneck.",
              f"- **12-CPU projection**: {m['projection_cpus']} × 10⁶ / CPU µs per request, assuming workers scale "
              f"linearly; compared with the seed's {m['baseline_rps']:,.0f} RPS baseline mock (WireMock, 16 vCPU, "
              "p99 30 ms, k6 with 400 clients, 1,000-token chat): ≥ 29k means fastgw on 12 CPUs would saturate it.",
              "- **instr/req**: instructions per request under callgrind (when measured with `--instructions`): "
              "a regression signal that does not move with machine noise."]
    verdicts = _verdicts(sc)
    if verdicts:
        lines += ["", "Verdict:"] + [f"- {v}" for v in verdicts]
    if any(e["payload"] == "stream" for e in sc.values()) and m["mock"] == "nginx":
        lines += ["", "Stream caveat: the nginx mock sends the 29 KB SSE reply at once (a static file), so the "
                  "relays see a few large reads rather than 100 paced events; per-event costs of a drip-fed "
                  "stream are what the `protocol.sse` micro-benchmarks measure. nginx relays with "
                  "`proxy_buffering off` (the usual SSE setting), i.e. in pieces of its 4-8 KB proxy buffer."]
    if m.get("skipped"):
        lines += ["", "Not run: " + "; ".join(f"`{k}` ({v})" for k, v in m["skipped"].items())]
    micro = _micro_section()
    if micro:
        lines += ["", *micro]
    return "\n".join(lines) + "\n"


def _verdicts(sc):
    out = []
    for name, e in sc.items():
        s = e["summary"]
        if e["via"] != "direct" and s.get("cpu_util") is not None and s["cpu_util"] < 0.8:
            out.append(f"`{name}`: the proxy was busy only {s['cpu_util']:.0%} of the time, so its RPS is set by "
                       "the mock + wrk CPU (and the machine's other load), not by the proxy: judge it by CPU per "
                       "request, not RPS.")
        if e["via"] != "fastgw":
            continue
        ratio = s.get("cpu_vs_nginx")
        if ratio is not None:
            target = " (target ≤ 1.2×: met)" if ratio <= 1.2 else " (target ≤ 1.2×: **missed**)"
            out.append(f"`{name}`: fastgw spends {ratio:.2f}× nginx's CPU per request"
                       + (target if name == "proxy" else "") + ".")
        ratio = s.get("cpu_vs_base")
        if ratio is not None:   # what the features cost (issue #4's bar for policies: <= 1.3x proxy)
            target = " (target ≤ 1.3×: met)" if ratio <= 1.3 else " (target ≤ 1.3×: **missed**)"
            out.append(f"`{name}`: {ratio:.2f}× `{e['base']}`'s CPU per request (median of the per-repeat ratios, "
                       "each from neighbouring runs)" + (target if name == "policies" else "") + ".")
        if e.get("projected_rps_12cpu") is not None:
            out.append(f"`{name}`: 12 CPUs of fastgw would serve ~{e['projected_rps_12cpu']:,.0f} RPS: "
                       + ("enough to saturate" if e["saturates_baseline"] else "**not enough** to saturate")
                       + " the 29k RPS baseline mock.")
        if s["errors_total"]:
            out.append(f"`{name}`: **{s['errors_total']} errors** during the run.")
    return out


def _micro_section():
    """The latest micro-benchmark figures (`python -m perf micro`), if any were recorded."""
    path = os.path.join(HERE, "results", "micro.json")
    try:
        with open(path) as f:
            micro = json.load(f)
    except (OSError, ValueError):
        return None
    lines = [f"Micro-benchmarks (`python -m perf micro`, {micro['date']}, commit `{micro['git_commit'][:10]}`):", "",
             "| benchmark | median µs | ops/s |", "|---|---:|---:|"]
    for b in micro["benchmarks"]:
        lines.append(f"| {b['name']} | {b['median_us']:.3f} | {b['ops']:,.0f} |")
    return lines
