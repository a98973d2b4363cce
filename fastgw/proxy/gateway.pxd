# One worker's state shared by its client connections (see gateway.pyx). C fields, so the per-request reads
# of the connection code are struct loads, not attribute lookups.

cdef class Gateway:
    cdef readonly object loop, log, stats, access_log, pools, router, pipeline, cfg, trusted_proxies, mock_url
    cdef readonly str run_dir, worker_id
    cdef readonly set connections
    cdef public bint draining
    # From the pipeline, per phase: the hooks that policies really implement.
    cdef readonly tuple access_hooks, request_hooks, response_hooks, complete_hooks, log_hooks
    cdef readonly bint needs_usage, proxy_protocol
    cdef readonly double keepalive_interval, stream_gap_timeout, total_timeout
    cdef readonly int tcp_keepalive_idle
    cdef readonly Py_ssize_t max_head, max_headers, max_body
    # Indexed by what a connection waits for (connection.C_IDLE ... C_WRITING).
    cdef double timeouts[6]
    cdef bytes _id_prefix
    cdef unsigned long long _id_next

    cdef str next_request_id(self)
