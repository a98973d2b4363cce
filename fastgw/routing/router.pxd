# Routing state read on every proxied request (see router.pyx). cdef classes, so the connection code reads a
# deployment's fields as struct loads and picks with a C call (cimport Router, Route, Deployment).

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


cdef class Route:
    cdef readonly str name
    cdef readonly list deployments
    cdef list _cycle
    cdef Py_ssize_t _i, _n

    cpdef Deployment pick(self)


cdef class Router:
    cdef readonly dict routes
    cdef readonly Route wildcard
    cdef readonly bytes models_body

    cpdef Route resolve(self, model)
