"""The long variant of the hostile-client, upstream-fault and secrets batteries (issue 13 items 1, 2, 6).

    python -m perf.battery [--scale N]     # default 10; writes perf/results/battery-<date>-<commit>.txt

The test command runs them at scale 1 (about 40 s). Here every upstream fault is gone through N times, N copies of
the hung upstream waits run at once, and the slow-client and pipelining cases carry N times the load (50 N
slowloris connections beside the served clients, pipelines of 400 N requests, 20 N MB read from an endless
stream after it was held back). The result file holds the command, the machine, each test's duration and the
verdict.
"""
import argparse
import datetime
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TESTS = ["tests/integration/test_hostile_clients.py", "tests/integration/test_upstream_faults.py",
         "tests/integration/test_secrets.py"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.battery", description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=int, default=10, help="load multiplier (default 10; the test command uses 1)")
    ap.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0", "--timeout=3600",
           *TESTS]
    env = {**os.environ, "FASTGW_BATTERY_SCALE": str(args.scale), "PYTHONPATH": ROOT}
    load = os.getloadavg()
    t0 = time.monotonic()
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    took = time.monotonic() - t0
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    report = "\n".join([
        f"# python -m perf.battery --scale {args.scale}   (commit {commit}, {stamp})",
        f"# {os.cpu_count()} CPUs, load average before the run: {' '.join(f'{x:.2f}' for x in load)}",
        f"# exit code {run.returncode}, {took:.0f} s",
        "", run.stdout.strip(), run.stderr.strip(), ""])
    os.makedirs(args.results_dir, exist_ok=True)
    path = os.path.join(args.results_dir, f"battery-{stamp}-{commit}.txt")
    with open(path, "w") as f:
        f.write(report)
    print(run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:])
    print(f"written {os.path.relpath(path, ROOT)}")
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
