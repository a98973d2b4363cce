"""`python -m perf pair [SCENARIO] [--against OTHER]`: a scenario against its base (default: policies against
proxy), or against another proxy (`proxy --against nginx`), in short interleaved slices, for a ratio that the
machine's speed swings do not move.

On a shared VM whose speed swings from minute to minute, two 13-second runs taken one after the other can
land in different phases, and their ratio then says more about the neighbours than about fastgw (`perf run`'s
per-repeat policies/proxy ratios once spread from 1.15 to 1.81 in one run). Here both gateways stay up, warm,
on the gateway CPU, and are loaded in turn for a slice of a few seconds each (wrk and the mock on the load
CPU, as in `perf run`): only the gateway being measured is busy, so each slice is a solo run, and the two
slices of a pair are seconds apart. Pairs alternate their order (base first, then the scenario first) so a
drift within a pair cancels out over the pairs. The figure is the median of the per-pair ratios of CPU per
request (utime+stime of each gateway's process tree over its slice, divided by the requests it served).

Writes perf/results/pair-<scenario>-<other>-<date>-<commit>.{json,md} and pair-<scenario>-<other>-latest.{json,md}.
"""
import os
import shutil
import statistics
import sys
import time

from perf import report
from perf.mocks import WORK_ROOT
from perf.procs import free_port, tree_cpu_seconds, wait_port
from perf.run import HOST, RESULTS, Cpu, Mocks, check_reply, start_gateway, whole_reply_bytes, wrk
from perf.scenarios import PAYLOADS, SCENARIOS

# The bars: policies at most 1.3x proxy's CPU per request (issue 4), fastgw at most 1.2x nginx's (the data plane).
TARGETS = {("policies", "proxy"): 1.3, ("proxy", "nginx"): 1.2}


def _slice(s, port, gw, reply_bytes, seconds, connections, cpu):
    """Load one gateway for `seconds`; its sample. `reply_bytes`: long replies count as bytes / one reply's."""
    c0 = tree_cpu_seconds(gw.pid)
    t0 = time.monotonic()
    w = wrk(s, port, seconds, connections, 1, cpu.load)
    wall = time.monotonic() - t0
    used = tree_cpu_seconds(gw.pid) - c0
    if not gw.alive():
        raise RuntimeError(f"{gw.name} died during the run:\n{gw.log_tail()}")
    n = w["bytes"] / reply_bytes if reply_bytes else w["requests"]
    if not n:
        raise RuntimeError(f"{gw.name} served no request in a {seconds}-second slice:\n{gw.log_tail()}")
    return {"requests": n, "rps": n / (w["duration_us"] / 1e6), "errors": sum(w["errors"].values()),
            "cpu_us_per_req": used * 1e6 / n, "cpu_util": used / wall}


def run_pair(name, pairs=20, slice_s=2, warmup=3.0, connections=64, results_dir=RESULTS, save=True, argv=None,
             against=None):
    """`name` against `against` (default: its base scenario); both must be proxies (fastgw or nginx)."""
    scenario = SCENARIOS.get(name)
    against = against or (scenario.base if scenario else None)
    if scenario is None or against not in SCENARIOS:
        raise SystemExit(f"{name!r}: nothing to measure it against; give --against, or one of the scenarios with "
                         f"a base: {', '.join(s.name for s in SCENARIOS.values() if s.base)}")
    base = SCENARIOS[against]
    for s in (scenario, base):
        if s.unavailable:
            raise SystemExit(f"{s.name} is not available: {s.unavailable}")
        if s.via == "direct":
            raise SystemExit(f"{s.name} is no proxy: there is no gateway CPU to measure")
    cpu = Cpu()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = os.path.join(WORK_ROOT, "runs", "pair-" + stamp)
    os.makedirs(work, exist_ok=True)
    mocks = Mocks("nginx", work, cpu)   # the paced streams bring the built-in mock
    gws = {}
    rows = []
    try:
        for s in (base, scenario):
            port = free_port()
            gws[s.name] = (s, port, start_gateway(s, work, port, mocks.for_scenario(s)["port"], cpu.gateway))
        for name, (s, port, gw) in list(gws.items()):
            wait_port(HOST, port, gw, 60)
            check_reply(s, port)
            reply_bytes = whole_reply_bytes(s, port) if PAYLOADS[s.payload].long else None
            gws[name] = (s, port, gw, reply_bytes)
            wrk(s, port, warmup, connections, 1, cpu.load)
        for i in range(pairs):
            order = (base.name, scenario.name) if i % 2 == 0 else (scenario.name, base.name)
            print(f"[{i + 1}/{pairs}] {order[0]} then {order[1]}: {slice_s:g}s each ...", file=sys.stderr, flush=True)
            rows.append({n: _slice(*gws[n], slice_s, connections, cpu) for n in order})
    finally:
        for _, _, gw, *_ in gws.values():
            gw.stop()
        mocks.stop()
    ratios = [row[scenario.name]["cpu_us_per_req"] / row[base.name]["cpu_us_per_req"] for row in rows]
    result = {
        "meta": report.machine() | {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                    "command": "python -m perf " + " ".join(argv) if argv else None,
                                    "mock_description": mocks.description(), "pinning": cpu.note, "slice_s": slice_s,
                                    "warmup_s": warmup, "connections": scenario.connections or connections,
                                    "pairs": pairs},
        "base": base.name, "scenario": scenario.name, "samples": rows, "ratios": ratios,
        "median_ratio": statistics.median(ratios),
        "median_cpu_us_per_req": {n: statistics.median(row[n]["cpu_us_per_req"] for row in rows)
                                  for n in (base.name, scenario.name)},
    }
    shutil.rmtree(work, ignore_errors=True)
    if save:
        report.save(results_dir, f"pair-{scenario.name}-{base.name}", result, markdown(result), stamp)
    return result


def markdown(result):
    m, base, name = result["meta"], result["base"], result["scenario"]
    dirty = " (uncommitted changes)" if m.get("git_dirty") else ""
    ratios = sorted(result["ratios"])
    q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
    med = result["median_ratio"]
    target = TARGETS.get((name, base))
    verdict = f"; target ≤ {target}×: {'met' if med <= target else '**missed**'}" if target else ""
    lines = [f"# fastgw pair: `{name}` against `{base}`, interleaved — {m['date']}", "",
             f"Commit `{(m.get('git_commit') or '?')[:10]}`{dirty}. Machine: {m.get('cpu_model', '?')}. "
             f"{m['pinning']}. Both gateways up for the whole run, loaded in turn: {m['pairs']} pairs of "
             f"{m['slice_s']:g}-second slices (order alternating), wrk with {m['connections']} connections, "
             f"{m['warmup_s']:g} s warm-up each. Command: `{m.get('command') or '?'}`.", "",
             f"`{name}` costs **{med:.2f}×** `{base}`'s CPU per request: the median of the per-pair ratios "
             f"(quartiles {q1:.2f}-{q3:.2f}{verdict}). "
             f"Median CPU per request: {base} {result['median_cpu_us_per_req'][base]:.1f} µs, "
             f"{name} {result['median_cpu_us_per_req'][name]:.1f} µs.", "",
             f"| pair | {base} CPU µs/req | {name} CPU µs/req | ratio | {base} RPS | {name} RPS | CPU busy | errors |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, row in enumerate(result["samples"]):
        a, b = row[base], row[name]
        lines.append(f"| {i + 1} | {a['cpu_us_per_req']:.1f} | {b['cpu_us_per_req']:.1f} | "
                     f"{result['ratios'][i]:.2f} | {a['rps']:,.0f} | {b['rps']:,.0f} | "
                     f"{a['cpu_util']:.0%} / {b['cpu_util']:.0%} | {a['errors'] + b['errors']} |")
    return "\n".join(lines) + "\n"
