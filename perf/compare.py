"""`python -m perf compare [RESULT] [--baseline FILE]`: is fastgw slower than the baseline, beyond noise?

With no arguments every set that has both files is judged: latest.json against baseline.json (the default
scenarios), and the sets filed apart, paced-latest.json against paced-baseline.json (the paced streams) and
translate-latest.json against translate-baseline.json (the provider translations).

Judged, for every fastgw scenario present in both files (lower is better unless noted):
  cpu_us_per_req        CPU per request of the gateway's process tree
  cpu_vs_nginx          the same as a multiple of nginx's, measured in the same run (cancels machine drift)
  cpu_vs_base           a feature scenario's CPU as a multiple of its base's (policies / proxy), same run
  rps_vs_direct         higher is better: fraction of the mock's ceiling reached in the same run
  instructions_per_req  callgrind count, when both files have it (nearly noise-free)

Tolerance per metric = max(floor, K × combined noise), where noise is the relative standard deviation over
the repeats stored in each file (`summary.noise`, learned from `run --repeat N`) and combined as
sqrt(baseline² + result²). A worse change beyond the tolerance is a regression: exit status 1.
Absolute RPS and latency are shown but not judged: on a shared machine they move with the neighbours.
The references (direct, nginx) are shown too: if nginx itself got 20% dearer, the machine changed.
"""
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
K = 3.0
JUDGED = {  # metric: (better, floor)
    "cpu_us_per_req": ("lower", 0.10),
    "cpu_vs_nginx": ("lower", 0.10),
    "cpu_vs_base": ("lower", 0.10),
    "rps_vs_direct": ("higher", 0.10),
    "instructions_per_req": ("lower", 0.02),
}
SHOWN = ["rps", "p99_ms"]


def load(path):
    with open(path) as f:
        return json.load(f)


def tolerance(metric, base_summary, cand_summary):
    floor = JUDGED[metric][1]
    nb = (base_summary.get("noise") or {}).get(metric) or 0.0
    nc = (cand_summary.get("noise") or {}).get(metric) or 0.0
    return max(floor, K * math.hypot(nb, nc))


def compare(result, baseline):
    """Return (rows, regressions). A row: scenario, metric, baseline, result, change, tolerance, verdict."""
    rows, regressions = [], []
    for name, b in baseline["scenarios"].items():
        c = result["scenarios"].get(name)
        if c is None:
            continue
        bs, cs = b["summary"], c["summary"]
        judged = b["via"] == "fastgw"
        for metric in [*JUDGED, *SHOWN]:
            bv, cv = bs.get(metric), cs.get(metric)
            if bv is None or cv is None or bv == 0:
                continue
            change = (cv - bv) / bv
            if judged and metric in JUDGED:
                tol = tolerance(metric, bs, cs)
                worse = change > tol if JUDGED[metric][0] == "lower" else change < -tol
                verdict = "REGRESSION" if worse else ("better" if abs(change) > tol else "ok")
                if worse:
                    regressions.append((name, metric, change, tol))
            else:
                tol, verdict = None, "info"
            rows.append((name, metric, bv, cv, change, tol, verdict))
    return rows, regressions


SETS = ("", "paced-", "translate-")   # result-file prefixes: the default set and the sets filed apart


def main(result_path=None, baseline_path=None):
    if result_path is None and baseline_path is None:
        statuses = []
        for prefix in SETS:
            r, b = (os.path.join(RESULTS, f"{prefix}{kind}.json") for kind in ("latest", "baseline"))
            if os.path.exists(r) and os.path.exists(b):
                statuses.append(judge(r, b))
                print()
        return 1 if 1 in statuses else 0 if 0 in statuses else 2   # any regression; else judged; else nothing
    return judge(result_path or os.path.join(RESULTS, "latest.json"),
                 baseline_path or os.path.join(RESULTS, "baseline.json"))


def judge(result_path, baseline_path):
    result, baseline = load(result_path), load(baseline_path)
    rows, regressions = compare(result, baseline)
    rm, bm = result["meta"], baseline["meta"]
    print(f"result   {result_path}: commit {rm['git_commit'][:10]} {rm['date']} variant={rm['variant']} "
          f"repeats={rm['repeats']} mock={rm['mock']}")
    print(f"baseline {baseline_path}: commit {bm['git_commit'][:10]} {bm['date']} variant={bm['variant']} "
          f"repeats={bm['repeats']} mock={bm['mock']}")
    for key in ("mock", "connections", "cpu_model", "pinning"):
        if rm.get(key) != bm.get(key):
            print(f"warning: {key} differs ({bm.get(key)!r} -> {rm.get(key)!r}); the comparison is weaker")
    if not any(r[6] != "info" for r in rows):
        print("nothing to judge: no fastgw scenario is in both files", file=sys.stderr)
        return 2
    print(f"\n{'scenario':14} {'metric':22} {'baseline':>12} {'result':>12} {'change':>8} {'tolerance':>9}  verdict")
    for name, metric, bv, cv, change, tol, verdict in rows:
        tol_txt = "" if tol is None else f"±{tol * 100:.0f}%"
        print(f"{name:14} {metric:22} {bv:12,.2f} {cv:12,.2f} {change * 100:+7.1f}% {tol_txt:>9}  {verdict}")
    if regressions:
        print(f"\n{len(regressions)} regression(s) beyond noise:")
        for name, metric, change, tol in regressions:
            print(f"  {name}: {metric} {change * 100:+.1f}% (tolerance ±{tol * 100:.0f}%)")
        return 1
    print("\nno regression beyond noise")
    return 0
