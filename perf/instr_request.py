"""Instructions per proxied request of the gateway's own code, counted by callgrind (repeatable to ~0.1%).

Runs the whole request path between stand-in transports (perf/micro/test_request_path_bench.py) N times;
two runs with different N give the per-request count without start-up:

    python -m perf.instr_request            # prints instructions per request for the chat and stream paths
"""
import asyncio
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def drive(n: int, stream: bool, policies: bool = False) -> None:
    sys.path.insert(0, os.path.join(HERE, "micro"))
    import uvloop
    import test_request_path_bench as b

    from fastgw.runtime import config
    from fastgw.observability.accesslog import AccessLog
    from fastgw.proxy.gateway import Gateway
    from fastgw.observability.logs import Logger
    from fastgw.observability.metrics import Stats

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    d = tempfile.mkdtemp()
    al = AccessLog(os.devnull)
    cfg = config.single_upstream("http://127.0.0.1:9/v1")
    if policies:   # the `policies` perf scenario's files: key auth + a token rate limit that never refuses
        cfg.policies_dir = os.path.join(HERE, "configs", "policies")
    gw = Gateway(loop, cfg, log=Logger(), stats=Stats(d, "0"), access_log=al, run_dir=d, worker_id="0",
                 mock_url=None)
    run, _, _ = b.one_exchange(gw, stream=stream, chunks=16 if stream else 1,
                               api_key="sk-perf-0001" if policies else "sk-test")
    for i in range(n):
        run()
        if i % 500 == 0:
            al.flush()


def count(n: int, stream: bool, policies: bool = False) -> int:
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
                          "-m", "perf.instr_request", "--drive", str(n), "1" if stream else "0",
                          "1" if policies else "0"],
                         capture_output=True, text=True, cwd=os.path.dirname(HERE))
    m = re.search(r"Collected : (\d+)", out.stderr)
    if not m:
        raise RuntimeError(out.stderr[-2000:])
    return int(m.group(1))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--drive":
        drive(int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1")
        return
    for name, stream, policies in (("chat", False, False), ("stream (14 events)", True, False),
                                   ("chat with policies", False, True)):
        per = (count(3000, stream, policies) - count(1000, stream, policies)) / 2000
        print(f"{name:20s} {per:10,.0f} instructions per request")


if __name__ == "__main__":
    main()
