# cython: language_level=3
"""One worker's state shared by its client connections: routes, policies, pools, metrics, access log.

`apply` builds everything a config decides and then swaps it in; requests in flight keep the route and
deployment they started with.
"""
import os

from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.string cimport memcpy

from fastgw.proxy.deadlines cimport BODY_WAIT, HEAD_WAIT, IDLE, STREAMING, UPSTREAM_WAIT, WRITING

from fastgw.policies.pipeline import Pipeline, load_pipeline
from fastgw.policies.api import PolicyContext
from fastgw.protocol.proxyproto import parse_networks
from fastgw.observability.logs import LogThrottle
from fastgw.routing.catalog import ModelCatalog
from fastgw.routing.health import HealthChecks
from fastgw.proxy.passthrough import Passthrough
from fastgw.routing.resilience import attach
from fastgw.routing.router import Router


cdef class Gateway:
    def __init__(self, loop, cfg, *, log, stats, access_log, str run_dir, str worker_id, mock_url):
        self.loop = loop
        self.log = log
        self.stats = stats
        self.access_log = access_log
        self.run_dir = run_dir
        self.worker_id = worker_id
        self.mock_url = mock_url
        self.connections = set()
        from fastgw.proxy.upstream import Pools

        self.proxy_warnings = LogThrottle(log, 10.0)
        self.pools = Pools(loop, cfg.upstream)
        # Request ids: unique per worker start without a syscall per request.
        self._id_prefix = f"req-{os.urandom(4).hex()}-{worker_id}-".encode()
        self.pipeline = Pipeline([])
        self.health = HealthChecks(loop, log)
        self.apply(cfg)

    def apply(self, cfg):
        """Swap in a new config (raises before swapping anything if it cannot be used)."""
        s, u = cfg.server, cfg.upstream
        ctx = PolicyContext(self.log, self.stats, self.run_dir, self.worker_id, cfg)
        router, pipeline = build(cfg, ctx, self.mock_url)
        trusted = parse_networks(s.trusted_proxies)
        passthrough = Passthrough(cfg, router, self.run_dir, self.log, self.stats)
        catalog = ModelCatalog(self.loop, router, u.models_cache_s, self.log, pipeline.model_visible)
        cache = make_cache(cfg.cache, self.run_dir, self.log, self.stats, self.cache, router, self.loop)
        old, old_catalog, old_cache = self.pipeline, self.catalog, self.cache
        old_passthrough = getattr(self, "passthrough", None)
        self.cache = cache
        self.cfg = cfg
        self.router = router
        self.catalog = catalog
        self.passthrough = passthrough
        self.pipeline = pipeline
        self.policy_ctx = ctx
        self.access_hooks = pipeline.access
        self.request_hooks = pipeline.request
        self.response_hooks = pipeline.response_headers
        self.stream_event_hooks = pipeline.stream_event
        self.complete_hooks = pipeline.complete
        self.log_hooks = pipeline.log
        self.needs_usage = pipeline.needs_usage
        self.max_head, self.max_headers, self.max_body = s.max_header_bytes, s.max_headers, s.max_body_bytes
        # The largest body a head may announce to be streamed (an upload); 0: none is.
        self.max_upload = max([passthrough.max_upload] + [r[2] for r in passthrough.rules]) if passthrough.enabled else 0
        self.timeouts[IDLE] = s.idle_timeout
        self.timeouts[HEAD_WAIT] = s.header_timeout
        self.timeouts[BODY_WAIT] = s.body_timeout
        self.timeouts[UPSTREAM_WAIT] = u.first_byte_timeout
        self.timeouts[STREAMING] = u.stream_gap_timeout
        self.timeouts[WRITING] = u.stream_gap_timeout
        self.stream_gap_timeout = u.stream_gap_timeout
        self.total_timeout = u.total_timeout
        self.keepalive_interval = s.stream_keepalive_interval
        self.realtime_idle_timeout = s.realtime_idle_timeout
        self.tcp_keepalive_idle = s.tcp_keepalive_idle
        self.proxy_protocol = s.proxy_protocol == "required"
        self.trusted_proxies = trusted
        self.pools.cfg = u
        old.close()
        if old_cache is not None and old_cache is not cache and old_cache.backend is not cache_backend(cache):
            old_cache.backend.close()
        if old_cache is not None and old_cache.semantic is not None:
            old_cache.semantic.close()
        if old_catalog is not None:
            old_catalog.close()
        if old_passthrough is not None:
            old_passthrough.close()
        if self.worker_id == "0":           # one worker checks for all: the breakers it opens are shared
            self.health.apply(cfg, router)

    cdef str next_request_id(self):
        self._id_next += 1
        return _request_id(self._id_prefix, self._id_next)

    def close(self):
        if self.cache is not None:
            self.cache.backend.close()
            if self.cache.semantic is not None:
                self.cache.semantic.close()
        self.catalog.close()
        self.passthrough.close()
        self.health.close()
        self.pipeline.close()
        self.pools.close()


def make_cache(c, str run_dir, log, stats, old, router, loop):
    """The ResponseCache of a [cache] section (None when off). A reload keeps the memory store of the same size
    (its entries too) and makes a new one otherwise; the Redis backend is made anew. The semantic cache (when a
    model opted in) is made anew, its indexes refilled from the shared log (what it still holds)."""
    if not c.enabled:
        return None
    from fastgw.cache.cache import ResponseCache
    if c.backend == "redis":
        from fastgw.cache.redis_store import RedisStore
        backend = RedisStore(c.redis, log, stats)
    else:
        from fastgw.cache.store import SharedStore
        prev = cache_backend(old)
        if prev is not None and not hasattr(prev, "is_remote") and prev.file_bytes == store_bytes(c.size_bytes):
            backend = prev
        else:
            backend = SharedStore(os.path.join(run_dir, f"fastgw-cache-{c.size_bytes}.shm"), c.size_bytes)
    semantic = None
    if c.semantic.models:
        from fastgw.cache.semantic import SemanticCache    # imports usearch: only when a model opted in
        semantic = SemanticCache(c, router, run_dir, loop, log, stats)
    return ResponseCache(c, backend, stats, semantic)


def cache_backend(cache):
    return cache.backend if cache is not None else None


def store_bytes(long long size):
    from fastgw.cache.store import layout
    capacity, nsets = layout(size)
    return 64 + nsets * 4 * 16 + capacity


def build(cfg, ctx, mock_url):
    """What a config decides, built: (router, pipeline). Raises ConfigError (naming the field), OSError or
    ValueError when the config cannot be used. Gateway.apply swaps in its result; the supervisor's preflight
    (fastgw.runtime.preflight) calls it too, so a config it accepts is one every worker accepts."""
    router = Router(cfg, mock_url=mock_url)
    attach(router, cfg, ctx.run_dir, ctx.stats)
    return router, load_pipeline(cfg, ctx)


cdef str _request_id(bytes prefix, unsigned long long v):
    """prefix + v in lowercase hex, written by hand: snprintf's format parsing cost ~1k instructions per
    request, more than the rest of this."""
    cdef char buf[64]
    cdef char digits[16]
    cdef Py_ssize_t n = len(prefix), k = 0, i
    if n > 48:                      # a very long worker id: no room in buf
        return prefix.decode() + format(v, "x")
    while True:
        digits[k] = b"0123456789abcdef"[v & 15]
        k += 1
        v >>= 4
        if v == 0:
            break
    memcpy(buf, <const char*>prefix, n)
    for i in range(k):
        buf[n + i] = digits[k - 1 - i]
    return PyUnicode_DecodeASCII(buf, n + k, NULL)


def request_id(bytes prefix, unsigned long long v):
    """_request_id for tests."""
    return _request_id(prefix, v)
