from fastgw.observability.linebuf cimport LineBuffer
from fastgw.observability.stats cimport RequestStats
from fastgw.proxy.exchange cimport Exchange

cdef void record(RequestStats stats, LineBuffer access_log, tuple log_hooks, object log, Exchange ex) except *
