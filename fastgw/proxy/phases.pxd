from fastgw.proxy.exchange cimport Exchange
from fastgw.proxy.gateway cimport Gateway

cdef object run_access(Gateway gw, Exchange ex)
cdef object run_request(Gateway gw, Exchange ex)
cdef void run_response_headers(Gateway gw, Exchange ex) except *
cdef void run_stream_event(Gateway gw, Exchange ex, bytes event) except *
cdef void run_complete(Gateway gw, Exchange ex) except *
cdef void refused(Gateway gw, Exchange ex, object err) except *
