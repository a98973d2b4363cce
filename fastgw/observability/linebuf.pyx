# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The event-loop side of the access log's batching, compiled: keeping one line is a C call.

`write_line` runs once per request; as interpreted Python its three attribute checks, the append and the byte
count cost about as much as formatting the line. fastgw.observability.accesslog.AccessLog subclasses LineBuffer and adds
the flushing, the writer thread and the drop warnings.
"""


cdef class LineBuffer:
    """Lines kept for the next flush (`_pending`, `_pending_bytes`), dropped past `max_queued_bytes`."""

    def __init__(self, bint enabled, Py_ssize_t max_queued_bytes):
        self.enabled = enabled
        self.max_queued_bytes = max_queued_bytes
        self._pending = []
        self._pending_bytes = 0
        self._closed = False
        self.dropped = 0

    cpdef write_line(self, bytes line):
        """Keep an already serialised JSON line (ending in a newline) for the next flush. Never blocks;
        drops (and counts in `dropped`) when more than max_queued_bytes are waiting."""
        if self._closed or not self.enabled:
            return
        if self._pending_bytes > self.max_queued_bytes:
            self.dropped += 1
            return
        self._pending.append(line)
        self._pending_bytes += len(line)
