# A client connection (see client.pyx): transport, PROXY header, the request loop, local endpoints, deadlines.
from fastgw.protocol.http cimport RequestParser
from fastgw.proxy.exchange cimport Exchange
from fastgw.proxy.relay cimport ClientSide, Relay


cdef class ClientConnection(ClientSide):
    cdef readonly RequestParser parser
    cdef readonly str client_addr, peer_addr
    cdef Relay relay                  # the relay of the exchange in flight, when it is proxied
    cdef bint read_paused, advancing
    cdef object proxy_buf             # bytes of a PROXY header still incomplete; None once read (or when off)

    cdef object _proxy_header(self, data)
    cdef void _internal_error(self, str what)
    cdef void _advance(self) except *
    cdef void _on_head(self) except *
    cdef void _on_request(self) except *
    cdef void _begin_upload(self, Exchange ex, str path) except *
    cdef void _local(self, Exchange ex, str path) except *
    cdef void _models(self, Exchange ex, str path) except *
    cdef void _respond(self, int status, bytes body, bytes content_type, bytes extra) except *
    cdef void _answer(self, object answer, bint close) except *
    cdef void _drop_relay(self) except *
