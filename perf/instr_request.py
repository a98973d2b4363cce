"""Instructions per proxied request of the gateway's own code, counted by callgrind (repeatable to ~0.1%).

Runs the whole request path between stand-in transports (perf/micro/test_request_path_bench.py) N times;
two runs with different N give the per-request count without start-up:

    python -m perf.instr_request   # instructions per request: chat, stream, chat with policies, paced stream,
                                   # and a chat answered from the response cache (a hit: no upstream I/O)
    python -m perf.instr_request chat "cache hit"      # only those lines

The stream line feeds the 14-event reply in 16 equal reads; the paced line one provider write per upstream
read (head, each event, [DONE], end: 17 reads), as a real stream arrives, so a per-read or per-event cost shows.
"""
import asyncio
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def drive(n: int, stream: bool, policies: bool = False, paced: bool = False, cached: bool = False) -> None:
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
    if cached:     # the `cache-hit` scenario: the memory store, every request after the first a hit
        cfg.cache.enabled = True
        cfg.cache.scope = "global"
        cfg.cache.allow_temperature = True     # the benchmark's request has "temperature": 0.2
    gw = Gateway(loop, cfg, log=Logger(), stats=Stats(d, "0"), access_log=al, run_dir=d, worker_id="0",
                 mock_url=None)
    run, client, _ = b.one_exchange(gw, stream=stream, chunks=16 if stream else 1,
                                    api_key="sk-perf-0001" if policies else "sk-test", paced=paced)
    if cached:
        run()      # the miss that stores the answer; from now on no upstream read
        req, out = b.request_bytes(stream), client.transport.out

        def run():
            client.data_received(req)
            assert b"x-fastgw-cache: hit" in out[-1]
            out.clear()
    for i in range(n):
        run()
        if i % 500 == 0:
            al.flush()


def count(n: int, stream: bool, policies: bool = False, paced: bool = False, cached: bool = False) -> int:
    flags = ["1" if x else "0" for x in (stream, policies, paced, cached)]
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
                          "-m", "perf.instr_request", "--drive", str(n), *flags],
                         capture_output=True, text=True, cwd=os.path.dirname(HERE))
    m = re.search(r"Collected : (\d+)", out.stderr)
    if not m:
        raise RuntimeError(out.stderr[-2000:])
    return int(m.group(1))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--drive":
        drive(int(sys.argv[2]), *(flag == "1" for flag in sys.argv[3:7]))
        return
    lines = (("chat", False, False, False, False), ("stream (14 events)", True, False, False, False),
             ("chat with policies", False, True, False, False), ("stream, 1 event/read", True, False, True, False),
             ("cache hit", False, False, False, True))
    only = sys.argv[1:]
    for name, *flags in lines:
        if only and name not in only:
            continue
        per = (count(3000, *flags) - count(1000, *flags)) / 2000
        print(f"{name:20s} {per:10,.0f} instructions per request")


if __name__ == "__main__":
    main()
