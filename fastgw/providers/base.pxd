# The provider interface (see base.pyx). The relay calls these as C methods of the deployment's provider.
from fastgw.protocol.sse cimport SSERelay
from fastgw.proxy.exchange cimport Exchange


cdef class Provider:
    cdef readonly str name
    cdef readonly bint translates      # False: the upstream speaks OpenAI; its response bytes go out as they are

    # cpdef: a provider may be a Python subclass (a C call still, when the class is a compiled one).
    cpdef bytes request_line(self, Exchange ex, dict request_lines)
    cpdef object request_body(self, Exchange ex, bytes model_json, bint add_usage)
    cpdef SSERelay open_stream(self, Exchange ex, bint strip_usage, bint keep_text)
    cpdef bytes response_body(self, Exchange ex, int status, bytes body)
