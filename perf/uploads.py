"""`python -m perf.uploads [MIB]`: a large multipart upload and a large binary download through one gateway worker,
and what they cost it in memory (issue 15: "a 500 MB file upload uses a bounded buffer, with backpressure both
ways"; binary replies are streamed back).

One worker in front of the built-in mock (its own process, `fastgw mock`). The official openai SDK uploads a
file of MIB MiB (default 512) from disk with `files.create` (multipart/form-data, streamed by httpx), and
downloads a speech answer of MIB MiB (`audio.speech.with_streaming_response`, the mock told its size by
x-mock-speech-bytes), read in pieces. The worker's resident set (VmRSS) is sampled every 10 ms; the upload's
SHA-256 as the mock received it (x-mock-sha256) must be the file's, and the download's length the size asked.

Writes perf/results/uploads-<date>-<commit>.{json,md} and uploads-latest.{json,md}.
"""
import hashlib
import os
import sys
import tempfile
import threading
import time

import openai

from perf import report
from perf.procs import Proc, free_port, leaf_pids, status_kb, wait_port
from perf.run import HOST, RESULTS

PIECE = 1 << 20


class RssSampler:
    def __init__(self, pid):
        self.pid, self.peak, self.stop = pid, 0, False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, status_kb(self.pid, "VmRSS"))
            time.sleep(0.01)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv):
    mib = int(argv[0]) if argv else 512
    size = mib * PIECE
    work = tempfile.mkdtemp(prefix="fastgw-uploads-")
    mock_port, port = free_port(), free_port()
    mock = Proc("mock", [sys.executable, "-m", "fastgw", "mock", "--host", HOST, "--port", str(mock_port)],
                os.path.join(work, "mock.log"))
    config = os.path.join(work, "fastgw.toml")
    with open(config, "w") as f:
        f.write(f'[server]\naccess_log = "off"\n[[models]]\nname = "*"\n[[models.deployments]]\n'
                f'url = "http://{HOST}:{mock_port}/v1"\n[passthrough]\nmax_upload_bytes = {size + PIECE}\n')
    gw = Proc("gateway", [sys.executable, "-m", "fastgw", "serve", "--host", HOST, "--port", str(port),
                          "--workers", "1", "--config", config], os.path.join(work, "gateway.log"))
    path = os.path.join(work, "upload.bin")
    try:
        wait_port(HOST, mock_port, mock)
        wait_port(HOST, port, gw)
        worker = leaf_pids(gw.pid)[0]
        digest = hashlib.sha256()
        with open(path, "wb") as f:
            for i in range(mib):
                piece = os.urandom(PIECE)
                digest.update(piece)
                f.write(piece)
        client = openai.OpenAI(base_url=f"http://{HOST}:{port}/v1", api_key="none", max_retries=0, timeout=600)
        client.models.list()
        idle = status_kb(worker, "VmRSS")
        cpu0 = cpu_seconds(worker)
        with RssSampler(worker) as up, open(path, "rb") as f:
            t0 = time.perf_counter()
            raw = client.files.with_raw_response.create(file=("upload.bin", f), purpose="user_data")
            up_s = time.perf_counter() - t0
        assert raw.headers["x-mock-sha256"] == digest.hexdigest(), "the upload arrived changed"
        cpu1 = cpu_seconds(worker)
        got = 0
        with RssSampler(worker) as down:
            t0 = time.perf_counter()
            with client.audio.speech.with_streaming_response.create(
                    model="tts-1", voice="alloy", input="x", extra_headers={"x-mock-speech-bytes": str(size)}) as r:
                for piece in r.iter_bytes(PIECE):
                    got += len(piece)
            down_s = time.perf_counter() - t0
        assert got == size, f"downloaded {got} of {size} bytes"
        cpu2 = cpu_seconds(worker)
    finally:
        gw.stop()
        mock.stop()
        if os.path.exists(path):
            os.remove(path)
    result = {
        "meta": report.machine(), "mib": mib, "idle_rss_kb": idle,
        "upload": {"seconds": up_s, "peak_rss_kb": up.peak, "worker_cpu_s": cpu1 - cpu0},
        "download": {"seconds": down_s, "peak_rss_kb": down.peak, "worker_cpu_s": cpu2 - cpu1},
    }
    rows = [(name, r) for name, r in (("upload (files.create, multipart)", result["upload"]),
                                      ("download (audio.speech, chunked)", result["download"]))]
    text = (f"# A {mib} MiB upload and download through one worker\n\n`python -m perf.uploads {mib}`, commit "
            f"{result['meta']['git_commit'][:7]}. Worker RSS idle: {idle / 1024:.1f} MiB.\n\n"
            "| transfer | seconds | MiB/s | worker CPU s | worker CPU ms per MiB | peak worker RSS MiB | "
            "growth over idle MiB |\n|---|---|---|---|---|---|---|\n")
    for name, r in rows:
        text += (f"| {name} | {r['seconds']:.2f} | {mib / r['seconds']:,.0f} | {r['worker_cpu_s']:.2f} | "
                 f"{1000 * r['worker_cpu_s'] / mib:.2f} | {r['peak_rss_kb'] / 1024:.1f} | "
                 f"{(r['peak_rss_kb'] - idle) / 1024:.1f} |\n")
    text += ("\nThe upload's bytes arrived unchanged (the mock's SHA-256 of what it received is the file's), the "
             "download was read whole. Both are streamed: the worker holds at most a few reads of either.\n")
    report.save(RESULTS, "uploads", result, text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
