"""Instructions per request under valgrind's callgrind: a regression signal that a noisy, shared machine
does not move (a count, not a time).

`perf stat -e instructions` would be cheaper, but hardware counters are not exposed in this VM
("<not supported> instructions"), and `callgrind_control` (vgdb) cannot reach a process asleep in epoll
without ptrace rights, so the count is differential: the proxy runs twice under callgrind from start to exit,
once serving `warm` requests and once `warm + n`; startup, import and shutdown cancel out and
(I_b - I_a) / n is the cost of one request in the proxy's whole process tree (every process writes its own
callgrind file, all are summed). PYTHONHASHSEED is fixed so both runs hash alike.
"""
import glob
import http.client
import os
import shutil

from perf.procs import free_port, wait_port
from perf.scenarios import PAYLOADS

HOST = "127.0.0.1"


def _send(scenario, port, count):
    payload = PAYLOADS[scenario.payload]
    with open(payload.body, "rb") as f:
        body = f.read()
    from perf.run import request_headers  # late: run imports this module lazily too
    headers = {"Content-Type": "application/json", **request_headers(scenario)}
    conn = http.client.HTTPConnection(HOST, port, timeout=120)
    for _ in range(count):
        conn.request("POST", payload.path, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{scenario.name}: HTTP {resp.status} under callgrind")
    conn.close()


def _total(out_dir):
    """Sum of the Ir totals of every callgrind output file in `out_dir`."""
    total = 0
    for path in glob.glob(os.path.join(out_dir, "callgrind.*")):
        with open(path) as f:
            for line in f:
                if line.startswith("summary:") or line.startswith("totals:"):
                    total += int(line.split()[1])
                    break
    return total


def _one(scenario, work, mock_port, requests, opts, tag):
    from perf.run import start_gateway  # late: run imports this module lazily too
    out_dir = os.path.join(work, f"callgrind-{scenario.name}-{tag}")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    os.chmod(out_dir, 0o777)  # nginx started as root writes from workers running as `nobody`
    port = free_port()
    vg = ["valgrind", "--tool=callgrind", "--trace-children=yes", "--quiet",
          f"--callgrind-out-file={out_dir}/callgrind.%p"]
    env = dict(opts["env"], PYTHONHASHSEED="0")
    proc = start_gateway(scenario, work, port, mock_port, None, opts["python_opts"], env, wrap=vg)
    try:
        wait_port(HOST, port, proc, 300)
        _send(scenario, port, requests)
    finally:
        proc.stop(timeout=120)
    total = _total(out_dir)
    if not total:
        raise RuntimeError(f"no callgrind totals in {out_dir}")
    return total


def instructions_per_request(scenario, work, mock_port, n, opts, warm=50):
    """(Ir with warm+n requests - Ir with warm requests) / n for the scenario's proxy."""
    a = _one(scenario, work, mock_port, warm, opts, "a")
    b = _one(scenario, work, mock_port, warm + n, opts, "b")
    return (b - a) / n
