from fastgw.proxy.deadlines cimport WAIT_KINDS

# One worker's state shared by its client connections (see gateway.pyx). C fields, so the per-request reads
# of the connection code are struct loads, not attribute lookups.

cdef class Gateway:
    cdef readonly object loop, log, stats, access_log, pools, router, pipeline, policy_ctx, cfg, trusted_proxies
    cdef readonly object mock_url, proxy_warnings
    cdef readonly object health            # fastgw.routing.health.HealthChecks (run by worker "0" only)
    cdef readonly object passthrough       # the other /v1 endpoints' routing (fastgw.proxy.passthrough.Passthrough)
    cdef readonly object cache             # fastgw.cache.cache.ResponseCache, or None when [cache] is off
    cdef readonly object catalog           # what GET /v1/models answers (fastgw.routing.catalog.ModelCatalog)
    cdef readonly str run_dir, worker_id
    cdef readonly set connections
    cdef public bint draining
    # From the pipeline, per phase: the hooks that policies really implement.
    cdef readonly tuple access_hooks, request_hooks, response_hooks, stream_event_hooks, complete_hooks, log_hooks
    cdef readonly bint needs_usage, proxy_protocol
    cdef readonly double keepalive_interval, stream_gap_timeout, total_timeout, realtime_idle_timeout
    cdef readonly int tcp_keepalive_idle
    cdef readonly Py_ssize_t max_head, max_headers, max_body
    cdef readonly long long max_upload
    # Indexed by what a connection waits for (deadlines.Wait).
    cdef double timeouts[WAIT_KINDS]
    cdef bytes _id_prefix
    cdef unsigned long long _id_next

    cdef str next_request_id(self)
