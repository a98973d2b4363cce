# The access log's line buffer (see linebuf.pyx). The connection code may cimport LineBuffer and call
# write_line as a C call.

cdef class LineBuffer:
    cdef public bint enabled, _closed
    cdef public Py_ssize_t max_queued_bytes, _pending_bytes, dropped
    cdef public list _pending

    cpdef write_line(self, bytes line)
