"""Micro-benchmarks of the per-request runtime services: metrics update and access-log write.

Run: pytest perf/micro/test_bench_runtime.py --benchmark-enable
"""
from fastgw.observability.accesslog import AccessLog
from fastgw.observability.metrics import Stats


def test_stats_request(benchmark, tmp_path):
    s = Stats(str(tmp_path), "0")
    benchmark(s.request, "gpt-4o-mini", "openai", "team-a", 200, 0.42, 0.08, 18e-6, 120, 14, 0.00012)


def test_stats_request_no_ttft(benchmark, tmp_path):
    s = Stats(str(tmp_path), "0")
    benchmark(s.request, "gpt-4o-mini", "openai", "team-a", 200, 0.42, None, 18e-6, 120, 14, 0.00012)


def test_accesslog_write(benchmark, tmp_path):
    log = AccessLog(str(tmp_path / "a.log"))
    record = {"ts": 1732380000.123, "method": "POST", "path": "/v1/chat/completions", "status": 200,
              "model": "gpt-4o-mini", "upstream": "openai", "consumer": "team-a", "duration_ms": 420.1,
              "ttft_ms": 80.2, "prompt_tokens": 120, "completion_tokens": 14, "cost": 0.00012,
              "request_id": "3f2a9c1e5b7d4a60"}

    def write():
        log.write(record)
        if len(log._pending) > 10000:
            log.flush()

    benchmark(write)
    log.close()


def test_stats_render_8_workers(benchmark, tmp_path):
    workers = [Stats(str(tmp_path), str(i)) for i in range(8)]
    for i, s in enumerate(workers):
        for m in range(10):
            for c in range(10):
                s.request(f"model-{m}", "up", f"consumer-{c}", 200, 0.3, 0.1, 2e-5, 10, 5, 0.001)
        s.flush()
    benchmark(workers[0].render)


class _NullTransport:
    """Just enough transport for the mock's synchronous path (no socket: measures the Python work)."""

    def __init__(self):
        self.n = 0

    def write(self, data):
        self.n += len(data)

    def is_closing(self):
        return False

    def close(self):
        pass


def _mock_conn():
    from fastgw.devtools.mock.server import MockStats, _MockConnection

    conn = _MockConnection(MockStats(), {})
    conn.connection_made(_NullTransport())
    return conn


_CHAT = (b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello there, how are you?"}]}')
_STREAM = (b'{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},'
           b'"messages":[{"role":"user","content":"Hello there, how are you?"}]}')


def _req(body):
    return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: upstream\r\ncontent-type: application/json\r\n"
            b"authorization: Bearer sk-x\r\nuser-agent: fastgw\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))


def test_mock_chat_request(benchmark):
    conn, data = _mock_conn(), _req(_CHAT)
    benchmark(conn.data_received, data)
    assert conn.transport.n > 0


def test_mock_chat_stream_request(benchmark):
    conn, data = _mock_conn(), _req(_STREAM)
    benchmark(conn.data_received, data)
    assert conn.transport.n > 0
