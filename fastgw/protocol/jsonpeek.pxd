# Declarations of fastgw.protocol.jsonpeek for other Cython modules (cimport). See jsonpeek.pyx for the docs.
cimport cython

# Top-level members whose spans peek_request keeps (the response cache's key reads them, not the body again).
cdef enum:
    KEPT_MEMBERS = 16


@cython.final
cdef class RequestFields:
    cdef readonly object model           # str | None: "model" when it is a string (escapes decoded)
    cdef readonly Py_ssize_t model_start  # span of the "model" value, quotes included; -1 if absent
    cdef readonly Py_ssize_t model_end
    cdef readonly bint stream            # "stream" is literally true
    cdef readonly Py_ssize_t stream_options_start  # span of the "stream_options" value; -1 if absent
    cdef readonly Py_ssize_t stream_options_end
    cdef readonly bint include_usage     # "stream_options" is an object whose "include_usage" is true
    cdef readonly Py_ssize_t object_end  # offset of the top-level closing brace
    cdef readonly bint has_n             # a top-level "n" member is present (any value)
    cdef readonly long long n            # "n" as a non-negative integer, else -1
    cdef readonly long long max_tokens   # max_completion_tokens, else max_tokens, else max_output_tokens; -1
    cdef readonly object user            # str | None: "user" when it is a string
    # The top-level members in body order: the offsets of each name's opening quote, its value's start and end
    # (the first KEPT_MEMBERS of them); `members` counts them all.
    cdef readonly int members
    cdef Py_ssize_t member_name[KEPT_MEMBERS]
    cdef Py_ssize_t member_value[KEPT_MEMBERS]
    cdef Py_ssize_t member_end[KEPT_MEMBERS]
