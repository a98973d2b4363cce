# A stream whose events a provider translates (see stream.pyx).
from fastgw.protocol.sse cimport SSERelay


cdef class TranslatedStream(SSERelay):
    cdef object translator            # event(name, data) -> [blocks], finish() -> [blocks], usage, complete
    cdef bint passthrough             # forward the upstream's bytes unchanged; the translator only reads them
    cdef object tail                  # the bytes of a line not complete yet
    cdef list data                    # the data lines of the current event
    cdef object name                  # the current event's `event:` field (str) or None

    cdef list _lines(self, bytes buf)
    cdef void _take_usage(self) noexcept


cpdef TranslatedStream translated_stream(object translator, bint passthrough=*)
