"""`python -m perf.soak --minutes N`: steady load for N minutes, and whether anything in a worker grows without
bound (issue 13 item 5).

A gateway with 2 workers (admin port on, access log written to /dev/null by its writer thread, metrics on) in
front of the built-in mock (its own process). The load comes from this process (an asyncio client on raw
sockets, perf/tagged_load.py), paced to --rate requests a second by --users clients: keep-alive connections,
each sending 3-12 pipelined batches of 1-4 requests then closing; streams and non-streams; on a fraction of the
requests a fault upstream (a delay, a paced or slow stream, Connection: close, a 500, a reset mid-stream); and
clients that leave (mid-stream, or before the answer's head). Every answer is judged as in the isolation test:
one carrying another request's tag fails the run.

Every --interval seconds each worker is sampled: RSS (/proc), open file descriptors (/proc), upstream
connections, client connections and asyncio tasks (the worker's admin /status, written by its one-second timer).
Before the load and after it (once it has stopped and settled) the idle workers are sampled too.

Verdicts: a series grows without bound when its least-squares slope over the second half of the run is above
its limit (SERIES: per hour); the counts must also come back to their idle values once the load stops (tasks
and client connections exactly; upstream connections all idle). Writes perf/results/soak-<date>-<commit>.
{json,md,svg} and soak-latest.*; exits 1 when a verdict fails.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import time

import orjson

from perf import report
from perf.mocks import WORK_ROOT, fastgw_cmd, start_mock
from perf.procs import Proc, free_port, open_fds, status_kb, wait_port
from perf.run import HOST, RESULTS
from perf.svgplot import Line, Panel, panels
from perf.tagged_load import (Jobs, Tally, abort_before_head, abort_mid_stream, pipelined)

# (key, title, unit, limit of the second half's slope per hour). RSS: 4 MB/h is ~3 bytes per request at the
# default rate; the counts move with the requests in flight, so their limits leave room for that noise.
SERIES = (
    ("rss_mb", "worker RSS", "MB", 4.0),
    ("fds", "open file descriptors", "count", 20.0),
    ("upstream_connections", "upstream connections (open)", "count", 20.0),
    ("client_connections", "client connections", "count", 20.0),
    ("asyncio_tasks", "asyncio tasks", "count", 20.0),
)
# The judged requests' faults (perf/tagged_load.py FAULTS), by weight: "slow" streams stay open ~1.2 s.
SOAK_FAULTS = {"none": 66, "delay": 6, "paced": 6, "close": 5, "status500": 5, "reset": 5, "slow": 7}
ABORT_SHARE = 0.04      # of the connections a client opens: leave mid-stream or before the head (half each)
SETTLE_S = 3.0          # after the load, before the idle sample: status snapshots (1 s) and flushes catch up

CONFIG = """[server]
host = "{host}"
port = {port}
workers = 2
admin_port = {admin}
access_log = "/dev/null"
metrics = true

[[models]]
name = "*"
[[models.deployments]]
url = "http://{host}:{mock_port}/v1"
"""


class Pacer:
    """Spaces requests at `rate` a second over all clients (a virtual schedule: a late client does not burst)."""

    def __init__(self, rate: float):
        self.rate = rate
        self.next_at = 0.0

    async def take(self, n: int) -> None:
        now = asyncio.get_running_loop().time()
        start = max(self.next_at, now)
        self.next_at = start + n / self.rate
        if start > now:
            await asyncio.sleep(start - now)


# -- sampling ---------------------------------------------------------------------------------------------

async def admin_status(port: int) -> dict:
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(b"GET /status HTTP/1.1\r\nhost: admin\r\n\r\n")
    data = await asyncio.wait_for(reader.read(-1), 10)   # the admin listener closes after answering
    writer.close()
    return orjson.loads(data.split(b"\r\n\r\n", 1)[1])


async def sample(admin: int) -> dict:
    """Each live worker's figures now, by worker index."""
    out = {}
    for w in (await admin_status(admin))["workers"]:
        pid = w["pid"]
        try:
            rss, fds = status_kb(pid, "VmRSS") / 1024, open_fds(pid)
        except OSError:
            continue                # exited since its last status snapshot
        ups = w["upstreams"]
        out[w["worker"]] = {"pid": pid, "rss_mb": round(rss, 2), "fds": fds,
                            "upstream_connections": sum(u["open_connections"] for u in ups),
                            "upstream_idle": sum(u["idle_connections"] for u in ups),
                            "client_connections": w["connections"], "asyncio_tasks": w["asyncio_tasks"]}
    return out


# -- load -------------------------------------------------------------------------------------------------

class Load:
    def __init__(self, port: int, rate: float, users: int, seed: int):
        self.port, self.users = port, users
        self.pacer = Pacer(rate)
        self.jobs = Jobs(seed=seed, stream_share=0.4, fault_weights=SOAK_FAULTS)
        self.rng = random.Random(seed)
        self.tally = Tally()
        self.client_errors = 0
        self.stopping = False

    def _batches(self):
        for _ in range(self.rng.randint(3, 12)):
            if self.stopping:
                return
            yield [self.jobs.next() for _ in range(self.rng.randint(1, 4))]

    async def _user(self) -> None:
        while not self.stopping:
            r = self.rng.random()
            try:
                if r < ABORT_SHARE / 2:
                    await self.pacer.take(1)
                    await abort_mid_stream(HOST, self.port, self.jobs.next(stream=True, fault="slow"), self.tally)
                elif r < ABORT_SHARE:
                    await self.pacer.take(1)
                    await abort_before_head(HOST, self.port, self.jobs.next(stream=False, fault="late"), self.tally,
                                            wait=0.05)
                else:
                    await pipelined(HOST, self.port, self._batches(), self.tally, pace=self.pacer.take)
            except (OSError, asyncio.IncompleteReadError):
                self.client_errors += 1     # reported; the judged answers are what decide isolation
                await asyncio.sleep(0.1)

    async def run_until(self, stop: asyncio.Event) -> None:
        users = [asyncio.create_task(self._user()) for _ in range(self.users)]
        await stop.wait()
        self.stopping = True
        done, pending = await asyncio.wait(users, timeout=10)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


# -- analysis ---------------------------------------------------------------------------------------------

def slope(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares slope of (t, v) points per second, and its standard error (0, 0 with fewer than 3)."""
    n = len(points)
    if n < 3:
        return 0.0, 0.0
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if not var:
        return 0.0, 0.0
    b = sum((t - mt) * (v - mv) for t, v in points) / var
    residual = sum((v - mv - b * (t - mt)) ** 2 for t, v in points) / (n - 2)
    return b, (residual / var) ** 0.5


def grows(slope_per_s: float, stderr_per_s: float, limit_per_hour: float) -> bool:
    """Above the limit, and not by chance: the counts wander with the requests in flight, and a short run's
    slope is mostly that noise (more than 3 standard errors above 0)."""
    return slope_per_s * 3600 > limit_per_hour and slope_per_s > 3 * stderr_per_s


def analyse(samples: list[dict], key: str, limit_per_hour: float) -> dict:
    """Per worker: start, min, max, end, the second half's slope per hour (± 3 standard errors), and whether it
    grows (grows())."""
    out = {}
    if not samples:
        return out
    half = samples[-1]["t"] / 2
    for worker in sorted({w for s in samples for w in s["workers"]}):
        pts = [(s["t"], s["workers"][worker][key]) for s in samples if worker in s["workers"]]
        values = [v for _, v in pts]
        b, se = slope([p for p in pts if p[0] >= half])
        out[worker] = {"start": values[0], "min": min(values), "max": max(values), "end": values[-1],
                       "slope_per_hour_second_half": round(b * 3600, 3), "three_se_per_hour": round(3 * se * 3600, 3),
                       "limit_per_hour": limit_per_hour, "bounded": not grows(b, se, limit_per_hour)}
    return out


def idle_checks(before: dict, after: dict) -> dict:
    """Per worker: once the load stopped, do the counts come back? Tasks and client connections to their
    idle values, every upstream connection idle, no descriptor beyond the idle upstream connections added."""
    out = {}
    for worker, b in before.items():
        a = after.get(worker)
        if a is None or a["pid"] != b["pid"]:
            out[worker] = {"ok": False, "why": "the worker exited or was replaced during the run"}
            continue
        why = []
        if a["asyncio_tasks"] > b["asyncio_tasks"]:
            why.append(f"asyncio tasks {b['asyncio_tasks']} -> {a['asyncio_tasks']}")
        if a["client_connections"] != 0:
            why.append(f"{a['client_connections']} client connections left")
        if a["upstream_connections"] != a["upstream_idle"]:
            why.append(f"{a['upstream_connections'] - a['upstream_idle']} upstream connections still busy")
        extra_fds = (a["fds"] - b["fds"]) - (a["upstream_idle"] - b["upstream_idle"])
        if extra_fds > 0:
            why.append(f"{extra_fds} descriptors beyond the idle upstream connections")
        out[worker] = {"ok": not why, "why": "; ".join(why)}
    return out


# -- the run ----------------------------------------------------------------------------------------------

async def soak(minutes: float, rate: float, users: int, interval: float, work: str, seed: int, log) -> dict:
    mock_port, port, admin = free_port(), free_port(), free_port()
    mock, mock_desc = start_mock("fastgw", work, HOST, mock_port, None)
    conf = os.path.join(work, "soak.toml")
    with open(conf, "w") as f:
        f.write(CONFIG.format(host=HOST, port=port, admin=admin, mock_port=mock_port))
    gw = Proc("gateway", fastgw_cmd("serve", "--config", conf), os.path.join(work, "gateway.log"))
    try:
        wait_port(HOST, port, gw, 60)
        wait_port(HOST, admin, gw, 60)
        # Warm-up (imports, caches, first allocations), then the idle workers.
        warm = Load(port, 500, 8, seed + 1)
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(2, stop.set)
        await warm.run_until(stop)
        await asyncio.sleep(SETTLE_S)
        before = await sample(admin)
        while len(before) < 2:
            await asyncio.sleep(0.5)
            before = await sample(admin)
        log(f"idle before: {before}")

        load = Load(port, rate, users, seed)
        stop = asyncio.Event()
        runner = asyncio.create_task(load.run_until(stop))
        t0 = time.monotonic()
        duration = minutes * 60
        samples = []
        while True:
            t = time.monotonic() - t0
            samples.append({"t": round(t, 2), "answered": load.tally.answered(), "workers": await sample(admin)})
            if len(samples) % max(1, int(60 / interval)) == 0:
                s = samples[-1]
                log(f"{t / 60:5.1f} min  {s['answered']:,} answered  "
                    + "  ".join(f"w{k}: {v['rss_mb']:.1f} MB {v['fds']} fds {v['upstream_connections']} up "
                                f"{v['asyncio_tasks']} tasks" for k, v in sorted(s["workers"].items())))
            if t >= duration or not gw.alive():
                break
            await asyncio.sleep(min(interval, max(0.0, duration - t)) or interval)
        stop.set()
        await runner
        elapsed = time.monotonic() - t0
        await asyncio.sleep(SETTLE_S)
        after = await sample(admin)
        if not gw.alive():
            raise RuntimeError(f"the gateway died:\n{gw.log_tail()}")
    finally:
        gw.stop()
        mock.stop()
    summary = load.tally.summary()
    return {"duration_s": round(elapsed, 1), "mock": mock_desc, "samples": samples, "idle_before": before,
            "idle_after": after, "load": {**summary, "client_errors": load.client_errors,
                                          "rate_achieved": round(summary["answered"] / elapsed, 1)}}


def judge_run(run: dict) -> dict:
    series = {key: analyse(run["samples"], key, limit) for key, _, _, limit in SERIES}
    idle = idle_checks(run["idle_before"], run["idle_after"])
    problems = run["load"]["problems"]
    verdicts = []
    for key, title, unit, limit in SERIES:
        per = series[key]
        ok = all(w["bounded"] for w in per.values())
        worst = max((w["slope_per_hour_second_half"] for w in per.values()), default=0.0)
        verdicts.append({"series": key, "ok": ok,
                         "text": f"{title}: " + ("bounded" if ok else "**grows**") + f" (the second half's slope is at "
                                 f"most {worst:+.2f} {unit}/h over {len(per)} workers; limit {limit:g})"})
    idle_ok = all(v["ok"] for v in idle.values())
    verdicts.append({"series": "idle", "ok": idle_ok, "text": "after the load: " + (
        "every worker back to idle (tasks, client connections, no busy upstream connection, no extra descriptor)"
        if idle_ok else "**not back to idle**: " + "; ".join(f"worker {k}: {v['why']}" for k, v in idle.items()
                                                            if not v["ok"]))})
    verdicts.append({"series": "isolation", "ok": not problems, "text": "isolation: " + (
        f"every one of {run['load']['answered']:,} answers carried its own tag and no other" if not problems
        else f"**{sum(problems.values())} problems**: {problems}")})
    return {"series": series, "idle": idle, "verdicts": verdicts, "ok": all(v["ok"] for v in verdicts)}


def plot(run: dict, title: str) -> str:
    samples = run["samples"]
    half = samples[-1]["t"] / 2 if samples else None
    workers = sorted({w for s in samples for w in s["workers"]})
    items = [Panel(t, unit, [Line(f"worker {w}", [(s["t"], s["workers"][w][key]) for s in samples
                                                  if w in s["workers"]]) for w in workers], half)
             for key, t, unit, _ in SERIES]
    rate = [(b["t"], (b["answered"] - a["answered"]) / (b["t"] - a["t"])) for a, b in zip(samples, samples[1:])
            if b["t"] > a["t"]]
    items.append(Panel("load: answers per second", "req/s", [Line("all clients", rate)], half))
    return panels(items, columns=2, title=title)


def markdown(result: dict, svg_name: str) -> str:
    m, run, j = result["meta"], result["run"], result["judgement"]
    load = run["load"]
    lines = [f"# fastgw soak — {result['date']}", "",
             f"Commit `{m['git_commit'][:10]}`{' (uncommitted changes)' if m['git_dirty'] else ''}; "
             f"{m['cpu_model']}, {m['cpus_usable']} CPUs usable; Python {m['python']}.", "",
             f"Command: `{result['command']}` ({run['duration_s'] / 60:.1f} minutes of load). {result['setup']}", "",
             f"Load: {load['answered']:,} answers ({load['rate_achieved']:,} a second): {load['streams']:,} streams, "
             f"{load['non_streams']:,} non-streams, {load['pipelined']:,} of them pipelined behind another request; "
             f"{sum(n for k, n in load['outcomes'].items() if k.endswith('/aborted')):,} clients left on purpose; "
             f"{load['client_errors']} client-side connection errors.", "",
             "Outcomes (fault/outcome: count): " + ", ".join(f"{k} {n:,}" for k, n in load["outcomes"].items()), "",
             "Verdict:", ""] + [f"- {v['text']}" for v in j["verdicts"]] + [
             "", f"![each series over time]({svg_name})", "",
             "| series | worker | start | min | max | end | slope, 2nd half (/h) | ± 3 s.e. | limit (/h) | |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for key, title, unit, _ in SERIES:
        for w, s in j["series"][key].items():
            lines.append(f"| {title} ({unit}) | {w} | {s['start']:g} | {s['min']:g} | {s['max']:g} | {s['end']:g} | "
                         f"{s['slope_per_hour_second_half']:+.2f} | {s['three_se_per_hour']:.2f} | "
                         f"{s['limit_per_hour']:g} | {'bounded' if s['bounded'] else '**grows**'} |")
    lines += ["", "Idle workers, before the load / after it (settled):", "",
              "| worker | RSS MB | fds | upstream open (idle) | client connections | asyncio tasks | |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for w, b in sorted(run["idle_before"].items()):
        a = run["idle_after"].get(w, {})
        ok = j["idle"].get(w, {})
        lines.append(f"| {w} | {b['rss_mb']:.1f} / {a.get('rss_mb', 0):.1f} | {b['fds']} / {a.get('fds', '–')} | "
                     f"{b['upstream_connections']} ({b['upstream_idle']}) / {a.get('upstream_connections', '–')} "
                     f"({a.get('upstream_idle', '–')}) | {b['client_connections']} / "
                     f"{a.get('client_connections', '–')} | {b['asyncio_tasks']} / {a.get('asyncio_tasks', '–')} | "
                     f"{'ok' if ok.get('ok') else ok.get('why', '')} |")
    lines += ["", "How it is judged: a series grows without bound when the least-squares slope of its second half "
              "(right of the dashed line in the plot) is above its limit and more than 3 standard errors above 0 "
              "(not the wandering of the requests in flight); the first half holds the warm-up of caches, pools and "
              "allocator arenas. The counts must also come back to their idle values once the load stops."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m perf.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=60, help="minutes of load (default 60)")
    p.add_argument("--rate", type=float, default=400, help="requests a second, all clients together (default 400)")
    p.add_argument("--users", type=int, default=48, help="concurrent clients (default 48)")
    p.add_argument("--interval", type=float, default=5, help="seconds between samples (default 5)")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--results-dir", default=RESULTS)
    p.add_argument("--no-save", action="store_true", help="print only")
    args = p.parse_args(argv)
    result = run(args.minutes, args.rate, args.users, args.interval, args.seed, args.results_dir,
                 save=not args.no_save, argv=argv)
    print(result["markdown"])
    return 0 if result["judgement"]["ok"] else 1


def run(minutes: float, rate: float = 400, users: int = 48, interval: float = 5, seed: int = 13,
        results_dir: str = RESULTS, save: bool = True, argv=(), log=None) -> dict:
    """The soak, judged; written to results_dir unless save is False. Returns the result with its Markdown."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    import uvloop

    meta = report.machine()
    work = os.path.join(WORK_ROOT, f"soak-{int(time.time())}")
    os.makedirs(work, exist_ok=True)
    try:
        soaked = uvloop.run(soak(minutes, rate, users, interval, work, seed, log))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stem = f"soak-{stamp}-{meta['git_commit'][:7]}"
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "meta": meta,
              "command": " ".join(["python -m perf.soak", *argv]).strip(),
              "settings": {"minutes": minutes, "rate": rate, "users": users, "interval_s": interval, "seed": seed,
                           "faults": SOAK_FAULTS, "abort_share": ABORT_SHARE},
              "setup": (f"fastgw with 2 workers (admin port, access log to /dev/null, metrics) in front of the "
                        f"{soaked['mock']}, not pinned; the load from the command's own process ({users} clients "
                        f"paced to {rate:g} requests a second); samples every {interval:g} s."),
              "run": soaked}
    result["judgement"] = judge_run(soaked)
    result["markdown"] = markdown(result, stem + ".svg")
    svg = plot(soaked, f"fastgw soak {result['date'][:16]}, {minutes:g} min, commit {meta['git_commit'][:7]}")
    if save:
        os.makedirs(results_dir, exist_ok=True)
        report.save(results_dir, "soak", {k: v for k, v in result.items() if k != "markdown"},
                    result["markdown"], stamp)
        for name in (stem, "soak-latest"):
            with open(os.path.join(results_dir, name + ".svg"), "w") as f:
                f.write(svg)
        result["files"] = os.path.join(results_dir, stem)
        log(f"written: {result['files']}.{{json,md,svg}} and soak-latest.*")
    return result


if __name__ == "__main__":
    sys.exit(main())
