# cython: language_level=3
"""key-auth's per-request path, compiled: the lookups of keys already checked and of model rights.

KeyAuth (auth.py) stays the readable policy: it parses the config, hashes and confirms new keys (_check),
decides model rights (_model_allowed) and words refusals. On every request only dict lookups remain, and
those run here, one C call per hook instead of a Python frame. KeyAuth.access and KeyAuth.request are the
reference: tests/unit/test_policies_auth.py runs both on the same requests.
"""
from cpython.dict cimport PyDict_GetItemWithError
from cpython.object cimport PyObject_Hash
from cpython.ref cimport PyObject

from fastgw.protocol.http cimport _Message
from fastgw.proxy.exchange cimport Exchange


cdef class KeyLookup:
    """access(ex) and request(ex) hooks of a KeyAuth (it installs them); they share its dicts."""

    cdef dict seen, seen_api_key, restricted, allowed
    cdef object check, model_allowed, refuse_model

    def __init__(self, policy):
        self.seen = policy._seen
        self.seen_api_key = policy._seen_api_key
        self.restricted = policy._restricted
        self.allowed = policy._allowed
        self.check = policy._check
        self.model_allowed = policy._model_allowed
        self.refuse_model = policy._refuse_model

    def access(self, Exchange ex):
        cdef _Message p = ex._parser
        cdef PyObject* found = NULL
        cdef object v = p.header(b"authorization") if p is not None else None
        # The caches are keyed by hash(header value), never by the value (it holds the key): see auth.policy.
        if v is not None:
            found = PyDict_GetItemWithError(self.seen, PyObject_Hash(v))
        elif p is not None:
            key = p.header(b"api-key")
            if key is None:
                key = p.header(b"x-api-key")     # Anthropic's clients
            if key is not None:
                found = PyDict_GetItemWithError(self.seen_api_key, PyObject_Hash(key))
        cdef tuple entry = <tuple>found if found != NULL else self.check(ex, v)
        ex.consumer = entry[0]
        ex.group = entry[1]

    def request(self, Exchange ex):
        cdef PyObject* rules = PyDict_GetItemWithError(self.restricted, ex.consumer)
        if rules == NULL:
            return None
        key = (ex.consumer, ex.model)
        cdef PyObject* found = PyDict_GetItemWithError(self.allowed, key)
        ok = <object>found if found != NULL else self.model_allowed(key, <object>rules)
        if not ok:
            self.refuse_model(ex)
        return None
