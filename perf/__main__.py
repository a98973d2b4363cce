"""python -m perf {run,pair,compare,micro,report,scenarios}: see perf/README.md."""
import argparse
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    from perf.scenarios import DEFAULT, SCENARIOS

    p = argparse.ArgumentParser(prog="python -m perf", description="fastgw benchmark suite")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run scenarios with wrk and record the results")
    r.add_argument("scenarios", nargs="*", default=DEFAULT, metavar="SCENARIO",
                   help=f"any of: {', '.join(SCENARIOS)} (default: {' '.join(DEFAULT)}); "
                        "direct/nginx references are added automatically")
    r.add_argument("--duration", type=float, default=15, help="measured seconds per scenario (default 15)")
    r.add_argument("--warmup", type=float, default=3, help="warm-up seconds before each measurement (default 3)")
    r.add_argument("--connections", type=int, default=64, help="wrk keep-alive connections (default 64)")
    r.add_argument("--threads", type=int, default=1, help="wrk threads (default 1: wrk has one CPU)")
    r.add_argument("--repeat", type=int, default=1, help="repeats, round-robin over scenarios (default 1)")
    r.add_argument("--mock", choices=["nginx", "fastgw", "wiremock"], default="nginx")
    r.add_argument("--instructions", type=int, default=0, metavar="N",
                   help="also count instructions per request under callgrind over N requests (slow)")
    r.add_argument("--slowed", action="store_true",
                   help="run fastgw deliberately slowed (PYTHONMALLOC=debug, -X tracemalloc=5) "
                        "to check that `compare` notices")
    r.add_argument("--no-references", action="store_true",
                   help="run only the named scenarios (no automatic direct/nginx references)")
    r.add_argument("--profile", action="store_true",
                   help="record a py-spy --native flamegraph of each gateway's worker during the measured run "
                        "(perf/results/flamegraph-<scenario>.svg); see perf/flamegraph.sh")
    r.add_argument("--baseline", action="store_true",
                   help="also save as perf/results/baseline.json (paced-/translate-baseline.json for those sets)")
    r.add_argument("--results-dir", default=None, help="where to write results (default perf/results)")
    r.add_argument("--no-save", action="store_true", help="print only")

    pr = sub.add_parser("pair", help="a scenario against its base in interleaved slices (a noise-proof ratio)")
    pr.add_argument("scenario", nargs="?", default="policies", help="a scenario with a base (default: policies)")
    pr.add_argument("--against", default=None, metavar="OTHER",
                    help="measure against this scenario instead of the base (e.g. proxy --against nginx)")
    pr.add_argument("--pairs", type=int, default=20, help="pairs of slices (default 20)")
    pr.add_argument("--slice", type=int, default=2, help="seconds of load per slice (default 2)")
    pr.add_argument("--warmup", type=float, default=3, help="warm-up seconds per gateway (default 3)")
    pr.add_argument("--connections", type=int, default=64, help="wrk keep-alive connections (default 64)")
    pr.add_argument("--results-dir", default=None, help="where to write results (default perf/results)")
    pr.add_argument("--no-save", action="store_true", help="print only")

    c = sub.add_parser("compare", help="compare a result with the baseline; exit 1 on a regression")
    c.add_argument("result", nargs="?", default=None, help="result JSON (default perf/results/latest.json)")
    c.add_argument("--baseline", default=None, help="baseline JSON (default perf/results/baseline.json)")

    m = sub.add_parser("micro", help="run the pytest-benchmark micro-benchmarks in perf/micro")
    m.add_argument("pytest_args", nargs=argparse.REMAINDER, help="extra pytest arguments (e.g. -k sse)")

    rp = sub.add_parser("report", help="re-render a result JSON as Markdown (stdout)")
    rp.add_argument("result", nargs="?", default=None, help="result JSON (default perf/results/latest.json)")

    sub.add_parser("scenarios", help="list the scenarios")

    args = p.parse_args(argv)
    if args.cmd == "run":
        from perf import report, run
        kwargs = {}
        if args.slowed:
            kwargs = dict(python_opts=run.SLOWED_PYTHON_OPTS, env=run.SLOWED_ENV, variant="slowed")
        result = run.run(args.scenarios, duration=args.duration, connections=args.connections,
                         threads=args.threads, warmup=args.warmup, repeat=args.repeat, mock_kind=args.mock,
                         instructions=args.instructions, results_dir=args.results_dir or run.RESULTS,
                         save=not args.no_save, baseline=args.baseline,
                         references=not args.no_references, profile=args.profile, argv=argv, **kwargs)
        print(report.markdown(result))
        if "files" in result:
            print(f"written: {result['files']['json']} and .md", file=sys.stderr)
        return 0
    if args.cmd == "pair":
        from perf import pair, run
        result = pair.run_pair(args.scenario, pairs=args.pairs, slice_s=args.slice, warmup=args.warmup,
                               connections=args.connections, results_dir=args.results_dir or run.RESULTS,
                               save=not args.no_save, argv=argv, against=args.against)
        print(pair.markdown(result), end="")
        return 0
    if args.cmd == "compare":
        from perf import compare
        return compare.main(args.result, args.baseline)
    if args.cmd == "micro":
        from perf import micro
        return micro.main(args.pytest_args)
    if args.cmd == "report":
        import json
        import os
        from perf import report, run
        with open(args.result or os.path.join(run.RESULTS, "latest.json")) as f:
            print(report.markdown(json.load(f)), end="")
        return 0
    if args.cmd == "scenarios":
        for s in SCENARIOS.values():
            print(f"{s.name:14} {s.via:7} {s.payload:7} {s.what}" + (f"  [not available: {s.unavailable}]"
                                                                     if s.unavailable else ""))
        return 0


if __name__ == "__main__":
    sys.exit(main())
