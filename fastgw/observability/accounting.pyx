# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The one owner of a finished request's accounting: metrics, rejections, upstream errors and the access log.

Every request that got an Exchange is recorded here once, by `record`, after its last byte was written: a
success, a refusal (by a policy or by the gateway) and an upstream failure alike. Nothing else counts requests.

The access-log line has one field list, FIELDS: the dictionary that log hooks see is built from it, the
compiled writer (the common case: one C buffer, no dict, no orjson) is checked against it when this module
loads, and the tests compare the two on random exchanges. Times: latency from the request head to the last byte; ttft (streams only) from the request head to
the first event relayed to the client; overhead = latency minus the time spent waiting on the upstream.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_Clear
from cpython.unicode cimport PyUnicode_GET_LENGTH, PyUnicode_READ_CHAR
from libc.stdio cimport snprintf
from libc.string cimport memcpy, strlen
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec

from fastgw.observability.linebuf cimport LineBuffer
from fastgw.observability.stats cimport RequestStats
from fastgw.proxy.exchange cimport Exchange, new_exchange
from fastgw.routing.router cimport Route


cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) noexcept

# The access-log record, in order.
# `model` is the client's; `served_model` the fallback model that answered instead, null when `model` did (so
# the common line does not repeat the name); `attempts` the requests sent upstream (0: none, a refusal).
FIELDS = ("ts", "request_id", "client", "method", "path", "model", "consumer", "upstream", "served_model",
          "attempts", "status", "stream", "latency_ms", "ttft_ms", "overhead_us", "prompt_tokens",
          "completion_tokens", "cost_usd", "bytes_in", "bytes_out", "cache", "cache_similarity", "error")

cdef enum FieldId:
    F_TS, F_REQUEST_ID, F_CLIENT, F_METHOD, F_PATH, F_MODEL, F_CONSUMER, F_UPSTREAM, F_SERVED_MODEL, F_ATTEMPTS,
    F_STATUS, F_STREAM, F_LATENCY, F_TTFT, F_OVERHEAD, F_PROMPT, F_COMPLETION, F_COST, F_BYTES_IN, F_BYTES_OUT,
    F_CACHE, F_SIMILARITY, F_ERROR

_IDS = {"ts": F_TS, "request_id": F_REQUEST_ID, "client": F_CLIENT, "method": F_METHOD, "path": F_PATH,
        "model": F_MODEL, "served_model": F_SERVED_MODEL, "consumer": F_CONSUMER, "upstream": F_UPSTREAM,
        "attempts": F_ATTEMPTS, "status": F_STATUS, "stream": F_STREAM,
        "latency_ms": F_LATENCY, "ttft_ms": F_TTFT, "overhead_us": F_OVERHEAD, "prompt_tokens": F_PROMPT,
        "completion_tokens": F_COMPLETION, "cost_usd": F_COST, "bytes_in": F_BYTES_IN, "bytes_out": F_BYTES_OUT,
        "cache": F_CACHE, "cache_similarity": F_SIMILARITY, "error": F_ERROR}

DEF MAX_FIELDS = 64
cdef int _order[MAX_FIELDS]
cdef int _nfields = len(FIELDS)


cdef void _compile_fields() except *:
    cdef int i
    for i, name in enumerate(FIELDS):
        _order[i] = _IDS[name]            # a field without a writer fails here, at import


_compile_fields()


cdef void record(RequestStats stats, LineBuffer access_log, tuple log_hooks, object log, Exchange ex) except *:
    """Account a finished request (its response bytes are already written)."""
    cdef double latency = ex.t_end - ex.t_start
    cdef double ttft = ex.t_first_token - ex.t_start if ex.t_first_token != 0.0 else -1.0
    cdef double overhead = latency - ex.upstream_wait
    if overhead < 0.0:
        overhead = 0.0
    route = ex.route
    if route is not None or ex.model:
        # Labels come from the config (route name, deployment address), never from the client.
        stats.add(route.name if route is not None else "", ex.upstream_name, ex.consumer, ex.status,
                  latency, ttft, overhead, ex.prompt_tokens if ex.prompt_tokens > 0 else 0,
                  ex.completion_tokens if ex.completion_tokens > 0 else 0, ex.cost)
    if ex.rejection is not None:
        stats.rejected(*ex.rejection)
    if ex.upstream_errors is not None:
        for upstream, kind in ex.upstream_errors:
            stats.upstream_error(upstream, kind)
    if not access_log.enabled:
        return
    if not log_hooks:
        # The common case, formatted in C: the same JSON the dict would give, without building one.
        access_log.write_line(_access_line(ex, latency, ttft, overhead))
        return
    rec = access_record(ex, latency, ttft, overhead)
    for hook in log_hooks:
        try:
            hook(ex, rec)
        except Exception:
            log.exception("policy failed", phase="log", request_id=ex.request_id)
    access_log.write(rec)


def access_record(Exchange ex, double latency, double ttft, double overhead):
    """The access-log record as a dict (what log hooks see and may extend), built from FIELDS."""
    cdef int i
    return {FIELDS[i]: _field_value(_order[i], ex, latency, ttft, overhead) for i in range(_nfields)}


cdef object _field_value(int f, Exchange ex, double latency, double ttft, double overhead):
    if f == F_TS:
        return _wallclock_us() * 1e-6
    if f == F_REQUEST_ID:
        return ex.request_id
    if f == F_CLIENT:
        return ex.client_addr
    if f == F_METHOD:
        return ex.method.decode("latin-1")
    if f == F_PATH:
        return ex.path
    if f == F_MODEL:
        return ex.model
    if f == F_SERVED_MODEL:
        return _fallback_served(ex)
    if f == F_ATTEMPTS:
        return ex.attempts
    if f == F_CONSUMER:
        return ex.consumer
    if f == F_UPSTREAM:
        return ex.upstream_name
    if f == F_STATUS:
        return ex.status
    if f == F_STREAM:
        return ex.stream
    if f == F_LATENCY:
        return _ms(latency)
    if f == F_TTFT:
        return _ms(ttft) if ttft >= 0.0 else None
    if f == F_OVERHEAD:
        return <long long>(overhead * 1e6)
    if f == F_PROMPT:
        return ex.prompt_tokens
    if f == F_COMPLETION:
        return ex.completion_tokens
    if f == F_COST:
        return ex.cost
    if f == F_BYTES_IN:
        return ex.bytes_in
    if f == F_BYTES_OUT:
        return ex.bytes_out
    if f == F_CACHE:
        return ex.cache or None
    if f == F_SIMILARITY:
        return _similarity(ex)
    return ex.error or None            # F_ERROR


def format_access_line(Exchange ex, double latency, double ttft, double overhead):
    """The compiled access-log line of `ex` (ttft < 0: none); for tests against access_record + orjson."""
    return _access_line(ex, latency, ttft, overhead)


# -- the access-log line, formatted into one C buffer (the event loop is single-threaded) ----------------------

DEF LINE_CAP = 65536          # > 7 string fields * FIELD_CAP * 6 (worst escaping) + the numbers
DEF FIELD_CAP = 1024          # longer strings (an absurd path, say) are cut: the line stays bounded
cdef char _line[LINE_CAP]
cdef Py_ssize_t _n


cdef bytes _access_line(Exchange ex, double latency, double ttft, double overhead):
    """The line, written straight through in FIELDS' order (a loop over FIELDS with a switch per field cost
    ~600 instructions more per request); _check_writer verifies the order against FIELDS at import."""
    global _n
    _n = 0
    _puts('{"ts":')
    _put_fixed(_wallclock_us(), 6)
    _puts(',"request_id":')
    _put_str(ex.request_id)
    _puts(',"client":')
    _put_str(ex.client_addr)
    _puts(',"method":')
    _put_latin1(ex.method)
    _puts(',"path":')
    _put_str(ex.path)
    _puts(',"model":')
    _put_str(ex.model)
    _puts(',"consumer":')
    _put_str(ex.consumer)
    _puts(',"upstream":')
    _put_str(ex.upstream_name)
    served = _fallback_served(ex)
    if served is None and ex.attempts == 1:     # the common line: its own model answered at the first attempt
        _puts(',"served_model":null,"attempts":1')
    else:
        if served is None:
            _puts(',"served_model":null')
        else:
            _puts(',"served_model":')
            _put_str(served)
        _puts(',"attempts":')
        _put_int(ex.attempts)
    _puts(',"status":')
    _put_int(ex.status)
    _puts(',"stream":true' if ex.stream else ',"stream":false')
    _puts(',"latency_ms":')
    _put_fixed(_scaled(latency, 1e6), 3)
    if ttft >= 0.0:
        _puts(',"ttft_ms":')
        _put_fixed(_scaled(ttft, 1e6), 3)
    else:
        _puts(',"ttft_ms":null')
    _puts(',"overhead_us":')
    _put_int(<long long>(overhead * 1e6))
    _puts(',"prompt_tokens":')
    _put_int(ex.prompt_tokens)
    _puts(',"completion_tokens":')
    _put_int(ex.completion_tokens)
    _puts(',"cost_usd":')
    _put_fixed(_scaled(ex.cost, 1e9), 9)
    _puts(',"bytes_in":')
    _put_int(ex.bytes_in)
    _puts(',"bytes_out":')
    _put_int(ex.bytes_out)
    if ex.cache:
        _puts(',"cache":')
        _put_str(ex.cache)
    else:
        _puts(',"cache":null')
    if ex.cache_similarity > 0.0:
        _puts(',"cache_similarity":')
        _put_fixed(_scaled(ex.cache_similarity, 1e4), 4)
    else:
        _puts(',"cache_similarity":null')
    if ex.error:
        _puts(',"error":')
        _put_str(ex.error)
        _puts("}\n")
    else:
        _puts(',"error":null}\n')
    return PyBytes_FromStringAndSize(_line, _n)


cdef object _similarity(Exchange ex):
    """A semantic hit's cosine similarity, to 4 decimals as the line writes it; None otherwise."""
    if ex.cache_similarity > 0.0:
        return _scaled(ex.cache_similarity, 1e4) / 1e4
    return None


cdef inline str _fallback_served(Exchange ex):
    """The fallback model that answered, or None when the client's model did (its own route, or "*")."""
    route = ex.route
    if route is None:
        return None
    cdef str name = (<Route>route).name
    if (PyUnicode_GET_LENGTH(name) == 1 and PyUnicode_READ_CHAR(name, 0) == 42) or name == ex.model:   # "*"
        return None
    return name


def _check_writer():
    """The compiled line must have FIELDS' keys in FIELDS' order: checked once, when the module loads."""
    import orjson

    ex = new_exchange("r", "c", b"GET", "/", None, 0.0)
    keys = tuple(orjson.loads(_access_line(ex, 0.0, -1.0, 0.0)))
    if keys != FIELDS:
        raise ImportError(f"the compiled access line writes {keys}, FIELDS says {FIELDS}")


cdef inline void _put(const char* s, Py_ssize_t n) noexcept:
    global _n
    if _n + n < LINE_CAP:
        memcpy(_line + _n, s, n)
        _n += n


cdef inline void _puts(const char* s) noexcept:
    _put(s, strlen(s))


cdef void _put_str(str value) noexcept:
    """A JSON string: quotes, backslashes and control characters escaped, UTF-8 kept."""
    global _n
    cdef Py_ssize_t size = 0, i
    cdef const char* s = PyUnicode_AsUTF8AndSize(value, &size) if value is not None else NULL
    cdef unsigned char c
    if s == NULL:
        PyErr_Clear()
        _puts("null")
        return
    if size > FIELD_CAP:
        size = FIELD_CAP
        while size > 0 and (<unsigned char>s[size] & 0xC0) == 0x80:   # cut on a character boundary
            size -= 1
    _puts('"')
    for i in range(size):
        c = <unsigned char>s[i]
        if _n + 7 >= LINE_CAP:
            break
        if c == 34 or c == 92:
            _line[_n] = 92
            _line[_n + 1] = c
            _n += 2
        elif c < 32:
            _n += snprintf(_line + _n, 7, "\\u%04x", c)
        else:
            _line[_n] = c
            _n += 1
    _puts('"')


cdef void _put_latin1(bytes value) noexcept:
    """A JSON string of latin-1 bytes (the request method as received): what _put_str(value.decode("latin-1"))
    writes, without making the str."""
    global _n
    cdef Py_ssize_t size = len(value) if value is not None else 0, i
    cdef const unsigned char* s = <const unsigned char*>(<char*>value) if value is not None else NULL
    cdef unsigned char c
    if s == NULL:
        _puts("null")
        return
    if size > FIELD_CAP:
        size = FIELD_CAP
    _puts('"')
    for i in range(size):
        c = s[i]
        if _n + 7 >= LINE_CAP:
            break
        if c == 34 or c == 92:
            _line[_n] = 92
            _line[_n + 1] = c
            _n += 2
        elif c < 32:
            _n += snprintf(_line + _n, 7, "\\u%04x", c)
        elif c < 128:
            _line[_n] = c
            _n += 1
        else:                          # U+0080..U+00FF in UTF-8
            _line[_n] = 0xC0 | (c >> 6)
            _line[_n + 1] = 0x80 | (c & 0x3F)
            _n += 2
    _puts('"')


cdef void _put_int(long long v) noexcept:
    """Decimal digits of v (printf's number formatting costs far more than this loop)."""
    cdef char tmp[24]
    cdef int i = 24
    cdef unsigned long long u = <unsigned long long>(-v) if v < 0 else <unsigned long long>v
    while True:
        i -= 1
        tmp[i] = 48 + <char>(u % 10)
        u //= 10
        if u == 0:
            break
    if v < 0:
        i -= 1
        tmp[i] = 45
    _put(tmp + i, 24 - i)


cdef void _put_fixed(long long scaled, int decimals) noexcept:
    """scaled / 10**decimals as a JSON number with exactly `decimals` digits after the point."""
    cdef long long unit = 1
    cdef int i
    cdef char frac[18]
    for i in range(decimals):
        unit *= 10
    if scaled < 0:
        _puts("-")
        scaled = -scaled
    _put_int(scaled // unit)
    cdef long long f = scaled % unit
    for i in range(decimals - 1, -1, -1):
        frac[i] = 48 + <char>(f % 10)
        f //= 10
    _puts(".")
    _put(frac, decimals)


cdef inline long long _scaled(double v, double by) noexcept:
    return <long long>(v * by + (0.5 if v >= 0 else -0.5))


cdef inline double _ms(double seconds) noexcept:
    """Milliseconds rounded to the microsecond, in C (Python's round() costs a microsecond)."""
    return (<long long>(seconds * 1e6 + 0.5)) / 1e3


cdef inline long long _wallclock_us() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <long long>ts.tv_sec * 1000000 + ts.tv_nsec // 1000


_check_writer()
