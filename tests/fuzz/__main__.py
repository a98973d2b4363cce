"""python -m tests.fuzz run|replay|merge|seeds (see tests/fuzz/__init__.py)."""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import re
import shutil
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.fuzz import TARGETS, native

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
OUT = native.ROOT / "build" / "fuzz"

# libFuzzer options of every run: comparisons guide mutations; an input slower than `timeout` seconds (a
# quadratic path) is a finding too; inputs up to 8 KB (requests and streams bigger than one read).
OPTIONS = ["-use_value_profile=1", "-timeout=20", "-rss_limit_mb=4096", "-max_len=8192", "-print_final_stats=1"]


def fuzz(target: str, seconds: int, out: Path, build_dir: Path | None, extra=()) -> dict:
    """Fuzz one target for `seconds`: new inputs go to out/<target>/corpus (the committed corpus is only read),
    a crashing input to out/<target>/crashes/, libFuzzer's output to out/<target>/fuzz.log."""
    work = out / target
    corpus, crashes = work / "corpus", work / "crashes"
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "tests.fuzz.runner", target, f"-max_total_time={seconds}",
           f"-artifact_prefix={crashes}/", *OPTIONS, *extra, str(corpus), str(CORPUS / target)]
    started = time.monotonic()
    with open(work / "fuzz.log", "w") as log:
        done = subprocess.run(cmd, cwd=native.ROOT, env=native.child_env(build_dir), stdout=log,
                              stderr=subprocess.STDOUT)
    text = (work / "fuzz.log").read_text(errors="replace")
    stats = dict(re.findall(r"^stat::(\w+):\s+(\d+)", text, re.M))
    cov = re.findall(r" cov: (\d+) ft: (\d+)", text)
    return {"target": target, "ok": done.returncode == 0, "returncode": done.returncode,
            "seconds": round(time.monotonic() - started), "runs": int(stats.get("number_of_executed_units", 0)),
            "cov": int(cov[-1][0]) if cov else 0, "ft": int(cov[-1][1]) if cov else 0,
            "corpus": len(list(corpus.iterdir())), "crashes": sorted(str(p) for p in crashes.iterdir()),
            "log": str(work / "fuzz.log"), "instrumented": build_dir is not None}


def cmd_run(args) -> int:
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        raise SystemExit(f"unknown targets {sorted(unknown)}; the targets: {', '.join(TARGETS)}")
    build_dir = None if args.no_native else native.build()
    out = Path(args.out) if args.out else OUT / time.strftime("%Y%m%d-%H%M%S")
    targets = args.targets or TARGETS
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda t: fuzz(t, args.seconds, out, build_dir, args.libfuzzer), targets))
    lines = ["| target | result | seconds | runs | cov | ft | corpus |", "|---|---|---|---|---|---|---|"]
    for r in results:
        verdict = "ok" if r["ok"] else f"FINDING ({', '.join(r['crashes']) or 'exit ' + str(r['returncode'])})"
        lines.append(f"| {r['target']} | {verdict} | {r['seconds']} | {r['runs']} | {r['cov']} | {r['ft']} | "
                     f"{r['corpus']} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))
    print(f"logs, corpora and crash files: {out}")
    return 0 if all(r["ok"] for r in results) else 1


def replay(target: str, files) -> list[tuple[str, str]]:
    """Run inputs through a target's harness in this process; the (file, traceback) of each that fails."""
    harness = importlib.import_module(f"tests.fuzz.targets.{target}")
    failures = []
    for path in files:
        try:
            harness.one_input(Path(path).read_bytes())
        except Exception:
            failures.append((str(path), traceback.format_exc()))
    return failures


def cmd_replay(args) -> int:
    targets = [t for t in args.names if t in TARGETS] or TARGETS
    files = [f for f in args.names if f not in TARGETS]
    if files and len(targets) != 1:
        raise SystemExit("replaying files: name their one target first")
    if args.native:     # in the instrumented build, under AddressSanitizer: libFuzzer runs each file once
        bad = 0
        for target in targets:
            chosen = files or sorted(map(str, (CORPUS / target).iterdir()))
            cmd = [sys.executable, "-m", "tests.fuzz.runner", target, *chosen]
            bad |= subprocess.run(cmd, cwd=native.ROOT, env=native.child_env(native.build())).returncode
        return 1 if bad else 0
    bad = 0
    for target in targets:
        chosen = files or sorted((CORPUS / target).iterdir())
        failures = replay(target, chosen)
        print(f"{target}: {len(chosen) - len(failures)}/{len(chosen)} pass")
        for path, tb in failures:
            print(f"--- {path}\n{tb}")
        bad += len(failures)
    return 1 if bad else 0


def minimize(target: str, sources, build_dir: Path) -> int:
    """Make the committed corpus of `target` the smallest set of inputs of `sources` (and of itself) that keeps
    their edge coverage (libFuzzer's merge; value profiles off, or every new comparison value would be kept).
    The regress-* files (past findings) stay as they are. Returns the number of inputs kept besides them."""
    corpus = CORPUS / target
    corpus.mkdir(parents=True, exist_ok=True)
    merged = OUT / "merged" / target
    shutil.rmtree(merged, ignore_errors=True)
    merged.mkdir(parents=True)
    cmd = [sys.executable, "-m", "tests.fuzz.runner", target, "-merge=1", "-use_value_profile=0", "-timeout=20",
           "-rss_limit_mb=4096", "-max_len=8192", str(merged), str(corpus), *map(str, sources)]
    subprocess.run(cmd, cwd=native.ROOT, env=native.child_env(build_dir), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kept = set()
    for old in corpus.iterdir():
        if old.name.startswith("regress-"):
            kept.add(hashlib.sha1(old.read_bytes()).hexdigest())
        else:
            old.unlink()
    count = 0
    for new in merged.iterdir():          # libFuzzer names them by their SHA-1
        if new.name not in kept:
            shutil.copy(new, corpus / new.name)
            count += 1
    return count


def cmd_merge(args) -> int:
    """The committed corpus of a target, minimized together with every run's corpus under build/fuzz/."""
    runs = sorted(OUT.glob(f"*/{args.target}/corpus"))
    if not runs:
        raise SystemExit(f"no run of {args.target} under {OUT}")
    count = minimize(args.target, runs, native.build())
    print(f"{args.target}: {count} inputs (and the regress-* files)")
    return 0


def cmd_seeds(args) -> int:
    from tests.fuzz import seeds

    seeds.write_all()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="fuzz targets (all by default) for --seconds each")
    run.add_argument("targets", nargs="*", metavar="TARGET")
    run.add_argument("--seconds", type=int, default=600)
    run.add_argument("--jobs", type=int, default=1, help="targets fuzzed at once")
    run.add_argument("--out", help=f"results folder (default {OUT.relative_to(native.ROOT)}/<time>)")
    run.add_argument("--no-native", action="store_true", help="the normal build: no native coverage, no ASan")
    run.add_argument("--libfuzzer", action="append", default=[], help="one more libFuzzer option (repeatable)")
    run.set_defaults(func=cmd_run)
    rep = sub.add_parser("replay", help="run inputs through their harness: TARGETs (their corpus), or one "
                                        "TARGET and FILEs")
    rep.add_argument("names", nargs="*")
    rep.add_argument("--native", action="store_true", help="in the instrumented build, under AddressSanitizer")
    rep.set_defaults(func=cmd_replay)
    merge = sub.add_parser("merge", help="minimize the committed corpus with the runs' corpora (their coverage)")
    merge.add_argument("target", choices=TARGETS)
    merge.set_defaults(func=cmd_merge)
    sub.add_parser("seeds", help="remake the seed corpus from the tests' cases").set_defaults(func=cmd_seeds)
    args = parser.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
