# Routing state read on every proxied request (see router.pyx). cdef classes, so the connection code reads a
# deployment's fields as struct loads and picks with a C call (cimport Router, Route, Deployment).
from fastgw.proxy.exchange cimport Exchange
from fastgw.routing.breaker cimport Breaker
from fastgw.routing.retry cimport RetryPolicy

cdef class Deployment:
    cdef readonly str name, model
    cdef readonly object provider          # fastgw.providers.base.Provider
    cdef readonly object messages_provider # the Provider serving POST /v1/messages here (None: not available)
    cdef readonly object config            # its DeploymentConfig (provider settings: api_version, ...)
    cdef readonly object host, server_hostname, ssl
    cdef readonly int port
    cdef readonly bint tls
    cdef readonly tuple pool_key
    cdef readonly dict request_lines
    cdef readonly bytes header_lines, model_json
    # This deployment's connection pool, cached by the relay on first use (Pools.get(deployment)).
    cdef public object pool
    # Its circuit breaker (fastgw.routing.breaker), None when the model has none; set by resilience.attach.
    cdef public Breaker breaker

    cdef bint available(self)
    cdef bint admit(self)
    cdef void succeeded(self) except *
    cdef void failed(self, str kind) except *


cdef class Route:
    cdef readonly str name
    cdef readonly list deployments
    cdef list _cycle
    cdef Py_ssize_t _i, _n
    # What to do when an attempt fails, and the x-fastgw-model line of its answers (b"" for "*").
    cdef public RetryPolicy retry
    cdef public bytes served_line

    cpdef Deployment pick(self, Exchange ex, list exclude=*)


cdef class Router:
    cdef readonly dict routes
    cdef readonly Route wildcard
    cdef readonly bytes models_body

    cpdef Route resolve(self, model)
