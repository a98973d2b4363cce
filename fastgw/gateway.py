"""One worker's state shared by its client connections: routes, policies, pools, metrics, access log.

`reload` swaps the router and the pipeline in one step; requests in flight keep the objects they started with.
"""
from __future__ import annotations

import os
from time import time

from fastgw.pipeline import Pipeline, load_pipeline
from fastgw.policy import PolicyContext
from fastgw.proxyproto import parse_networks
from fastgw.router import Router
from fastgw.connection import Pools


class Gateway:
    def __init__(self, loop, cfg, *, log, stats, access_log, run_dir: str, worker_id: str, mock_url: str | None):
        self.loop = loop
        self.log = log
        self.stats = stats
        self.access_log = access_log
        self.run_dir = run_dir
        self.worker_id = worker_id
        self.mock_url = mock_url
        self.connections: set = set()
        self.draining = False
        self.pools = Pools(loop, cfg.upstream)
        # Request ids: unique per worker start without a syscall per request.
        self._id_prefix = f"req-{os.urandom(4).hex()}-{worker_id}-"
        self._id_next = 0
        self.pipeline = Pipeline([])
        self.apply(cfg)

    def apply(self, cfg) -> None:
        """Build everything a config decides, then swap it in (raises before swapping if the config is bad)."""
        s, u = cfg.server, cfg.upstream
        router = Router(cfg, mock_url=self.mock_url)
        ctx = PolicyContext(self.log, self.stats, self.run_dir, self.worker_id, cfg)
        pipeline = load_pipeline(cfg, ctx)
        old = self.pipeline
        self.cfg = cfg
        self.router = router
        self.pipeline = pipeline
        self.limits = (s.max_header_bytes, s.max_headers, s.max_body_bytes)
        # Indexed by what a connection waits for (protocol.IDLE ... WRITING).
        self.timeouts = (s.idle_timeout, s.header_timeout, s.body_timeout, u.first_byte_timeout,
                         u.stream_gap_timeout, u.stream_gap_timeout)
        self.stream_gap_timeout = u.stream_gap_timeout
        self.keepalive_interval = s.stream_keepalive_interval
        self.tcp_keepalive_idle = s.tcp_keepalive_idle
        self.proxy_protocol = s.proxy_protocol == "required"
        self.trusted_proxies = parse_networks(s.trusted_proxies)
        self.pools.cfg = u
        old.close()

    def next_request_id(self) -> str:
        self._id_next += 1
        return f"{self._id_prefix}{self._id_next:x}"

    def record(self, ex, pipe: Pipeline) -> None:
        """Metrics and the access-log line of a finished request (off the client's critical path: the response
        bytes are already written)."""
        latency = ex.t_end - ex.t_start
        ttft = ex.t_first_byte - ex.t_sent if ex.t_first_byte and ex.t_sent else None
        overhead = ex.overhead
        route = ex.route
        if route is not None or ex.model:
            # Labels come from the config (route name, deployment address), never from the client.
            self.stats.request(route.name if route is not None else "", ex.upstream_name, ex.consumer, ex.status,
                               latency, ttft, overhead, max(ex.prompt_tokens, 0), max(ex.completion_tokens, 0),
                               ex.cost)
        al = self.access_log
        if al.enabled:
            rec = {
                "ts": time(), "request_id": ex.request_id, "client": ex.client_addr,
                "method": ex.method.decode("latin-1"), "path": ex.path, "model": ex.model,
                "consumer": ex.consumer, "upstream": ex.upstream_name, "status": ex.status,
                "stream": ex.stream, "latency_ms": round(latency * 1e3, 3),
                "ttfb_ms": round(ttft * 1e3, 3) if ttft is not None else None,
                "overhead_us": int(overhead * 1e6), "prompt_tokens": ex.prompt_tokens,
                "completion_tokens": ex.completion_tokens, "cost_usd": ex.cost,
                "bytes_in": ex.bytes_in, "bytes_out": ex.bytes_out, "error": ex.error or None,
            }
            for hook in pipe.log:
                try:
                    hook(ex, rec)
                except Exception:
                    self.log.exception("policy failed", phase="log", request_id=ex.request_id)
            al.write(rec)

    def close(self) -> None:
        self.pipeline.close()
        self.pools.close()
