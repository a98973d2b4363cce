# Declarations of fastgw.protocol.http for other Cython modules (cimport). See http.pyx for the docs.

cdef class _Message:
    # Bytes fed but not consumed yet: [buf+pos, buf+end). buf points into `held`, the bytes object fed last,
    # while every unconsumed byte is in it (a message per read: no copy, no buffer), else into `own`, our
    # buffer, allocated the first time a read ends mid-message and kept while it stays small (a message that
    # made it grow past 16 KB frees it when it ends).
    cdef char* buf
    cdef Py_ssize_t pos, end
    cdef object held
    cdef char* own
    cdef Py_ssize_t cap
    # The head of the current message, copied out of buf when complete (so body reading can consume
    # buf freely while header()/forward_head still work). Header i is at hdr[5i..5i+4] =
    # (name offset, name length, value offset, value length) into hbuf, and its name kind (http.pyx).
    # Both are allocated for the first head and grow as needed (hdr up to max_headers slots).
    cdef char* hbuf
    cdef Py_ssize_t hlen, hcap
    cdef Py_ssize_t* hdr
    cdef int nhdr
    cdef Py_ssize_t hdr_cap
    # Connection-header tokens (offset, length) into hbuf: names to drop when forwarding.
    cdef Py_ssize_t conn_tok[64]
    cdef int nconn
    # De-chunked body bytes waiting to be handed out (allocated for the first chunked body).
    cdef char* bbuf
    cdef Py_ssize_t blen, bcap
    cdef Py_ssize_t max_head, max_hdrs
    cdef int state
    # Head search progress, relative to rpos: a slow client costs O(n) in total, not O(n^2).
    cdef Py_ssize_t scan, line_start
    # Chunked decoder state.
    cdef int ck_state
    cdef long long ck_rem
    cdef Py_ssize_t ck_scan, ck_trailer_bytes
    cdef bint lenient
    # Facts from the head.
    cdef readonly int http_version
    cdef readonly bint keep_alive
    cdef readonly long long content_length
    cdef readonly bint chunked
    cdef readonly int error_status
    cdef readonly str error_message
    cdef bint conn_close, conn_keepalive
    cdef int host_count, te_count
    # bit 1: an Expect other than 100-continue (417); bit 2: an unknown transfer coding (501)
    cdef int flags
    cdef bint expect_100

    cdef int _grow(self, char** p, Py_ssize_t* cap, Py_ssize_t need) except -1
    cdef int _alloc_headers(self, Py_ssize_t max_head, Py_ssize_t max_hdrs) except -1
    cdef int _more_headers(self) except -1
    cdef int _take(self, bytes data) except -1
    cdef int _append(self, const char* data, Py_ssize_t n) except -1
    cdef int _fail(self, int status, str message)
    cdef void _reset_head(self)
    cdef int _scan_head(self, bint skip_leading_crlf)
    cdef int _take_head(self) except -1
    cdef int _parse_fields(self, Py_ssize_t pos)
    cdef int _special(self, Py_ssize_t ns, Py_ssize_t nl, Py_ssize_t vs, Py_ssize_t vl)
    cdef int _framing(self)
    cdef int _dechunk(self, long long limit, long long done) except -2
    cdef bint _conn_listed(self, const unsigned char* n, Py_ssize_t l)
    cpdef object header(self, bytes name)


cdef class RequestParser(_Message):
    cdef Py_ssize_t max_body
    # A streamed body (stream_body()): handed out in BODY events, at most max_stream bytes in all.
    cdef long long max_stream, streamed, body_left
    cdef readonly bint streaming
    cdef bint announced
    cdef Py_ssize_t method_len, target_off, target_len
    cdef readonly bint expect_continue
    cdef readonly object body
    cdef void _reset_head(self)
    cdef int _parse_request_line(self)
    cpdef void feed(self, data)
    cpdef int next_event(self)
    cpdef void start_next(self)
    cpdef void stream_body(self) except *
    cdef int _next_piece(self)
    cpdef bytes take_body(self)


cdef class ResponseParser(_Message):
    cdef bint head_request, announced, eof
    cdef object pending
    cdef long long remaining
    cdef int framing
    cdef readonly int status
    cdef Py_ssize_t reason_off, reason_len
    cdef void _reset_head(self)
    cdef int _parse_status_line(self)
    cdef int _upstream_fail(self)
    cpdef void feed(self, data)
    cpdef int next_event(self)
