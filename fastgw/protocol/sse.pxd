# Server-sent-events relay of an upstream streaming body (see sse.pyx).

cdef struct Buf:
    unsigned char* data
    Py_ssize_t len
    Py_ssize_t cap


cdef class SSERelay:
    cdef readonly bint strip_usage_chunk
    cdef readonly bint collect_text
    cdef readonly Py_ssize_t events
    cdef readonly bint done
    cdef readonly bint usage_seen
    cdef readonly bint usage_promised  # an event had "usage": null: the upstream reports usage at the end
    cdef readonly Py_ssize_t text_skipped  # collect_text: bytes of text past the first MAX_TEXT, not kept
    cdef readonly long long prompt_tokens
    cdef readonly long long completion_tokens
    cdef readonly long long total_tokens

    cdef Buf line      # current line when it spans chunks
    cdef Buf ev        # data field values of the current event, joined by "\n"
    cdef Buf hold      # strip mode: raw bytes of the current incomplete event, from earlier chunks
    cdef Buf out       # strip mode: output being assembled for one feed()
    cdef Buf txt       # collect_text: raw JSON string bodies as `"s1","s2",`
    cdef int data_lines
    cdef bint ev_overflow
    cdef bint ev_passthrough
    cdef bint pending_cr
    cdef bint last_stripped

    cpdef object feed(self, object chunk)
    cpdef bytes finish(self)
    cdef int _line(self, const unsigned char* p, Py_ssize_t n) except -1
    cdef int _dispatch(self) except -1
    cdef int _parse_event(self, const unsigned char* d, Py_ssize_t n) except -1
    cdef int _keep_text(self, const unsigned char* p, Py_ssize_t n) except -1
    cdef void _usage(self, const unsigned char* d, Py_ssize_t s, Py_ssize_t e) noexcept
