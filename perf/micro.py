"""`python -m perf micro [PYTEST ARGS]`: run the pytest-benchmark micro-benchmarks in perf/micro/ (one file per
compiled module, each against its plain-Python or library reference) and record a summary in
perf/results/micro.json and micro.md; the next `python -m perf run` summary includes it."""
import json
import os
import subprocess
import sys
import time

from perf.mocks import WORK_ROOT
from perf.report import machine

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def summarize(raw):
    out = []
    for b in raw["benchmarks"]:
        st = b["stats"]
        out.append({
            "name": b["fullname"].split("perf/micro/")[-1],
            "group": b.get("group"),
            "median_us": st["median"] * 1e6,
            "mean_us": st["mean"] * 1e6,
            "stddev_us": st["stddev"] * 1e6,
            "ops": st["ops"],
            "rounds": st["rounds"],
        })
    return out


def markdown(micro):
    lines = [f"# fastgw micro-benchmarks — {micro['date']}", "",
             f"Commit `{micro['git_commit'][:10]}`, {micro['cpu_model']}, Python {micro['python']}.", "",
             "| benchmark | group | median µs | mean µs ± sd | ops/s |", "|---|---|---:|---:|---:|"]
    for b in micro["benchmarks"]:
        lines.append(f"| {b['name']} | {b['group'] or ''} | {b['median_us']:.3f} "
                     f"| {b['mean_us']:.3f} ± {b['stddev_us']:.3f} | {b['ops']:,.0f} |")
    return "\n".join(lines) + "\n"


def main(pytest_args=(), results_dir=RESULTS):
    os.makedirs(WORK_ROOT, exist_ok=True)
    raw_path = os.path.join(WORK_ROOT, "micro-raw.json")
    if os.path.exists(raw_path):
        os.remove(raw_path)
    cmd = [sys.executable, "-m", "pytest", os.path.join(HERE, "micro"), "-q", "-p", "no:cacheprovider",
           "--benchmark-enable", f"--benchmark-json={raw_path}", "--benchmark-columns=median,mean,stddev,ops",
           *pytest_args]
    rc = subprocess.call(cmd, cwd=os.path.dirname(HERE))
    if not os.path.exists(raw_path):
        print("no benchmark JSON was written", file=sys.stderr)
        return rc or 1
    with open(raw_path) as f:
        raw = json.load(f)
    m = machine()
    micro = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git_commit": m["git_commit"],
             "cpu_model": m["cpu_model"], "python": m["python"], "benchmarks": summarize(raw)}
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, "micro.json"), "w") as f:
        json.dump(micro, f, indent=1)
    with open(os.path.join(results_dir, "micro.md"), "w") as f:
        f.write(markdown(micro))
    print(f"written: {os.path.join(results_dir, 'micro.json')} and micro.md ({len(micro['benchmarks'])} benchmarks)")
    return rc
