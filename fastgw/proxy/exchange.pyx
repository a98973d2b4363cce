# cython: language_level=3
"""One request's state, from its head to its access-log line: what policies, the router and the log see.

Fields (all readable and writable from Python policies):
  request_id, client_addr, method (bytes), path, endpoint   the request
  body (bytes), fields (jsonpeek.RequestFields), model, stream, client_wants_usage
  passthrough                        another /v1 endpoint (files, images, audio...), passed through
  settled                            the complete phase ran already: a Realtime session runs it per response
  messages_api                       the client speaks Anthropic's Messages API (/v1/messages...): answers
                                     and errors go back in Anthropic's shapes
  consumer, group                    set by an identity policy ("" when anonymous)
  scratch                            None, or a dict a policy made with new_scratch() for per-request state
  route, deployment, upstream_name   where it goes: the model (Route) and deployment of the last attempt (a
                                     fallback model's once one served), its upstream
  attempts                           requests sent upstream (retries and fallbacks included)
  status, response_headers (list of b"name: value\\r\\n" lines for the client), prompt_tokens and
  completion_tokens (-1 = unknown), cost (USD), error, bytes_in, bytes_out, events
  cache                              the response cache: "hit", "miss", "refresh", "bypass", None (not asked);
                                     a hit reports 0 prompt and completion tokens (it cost nothing: limits and
                                     budgets settle it free) unless [cache] charge_hits
  cache_key                          the cache key while the answer is to be stored, else None
  cache_semantic, cache_similarity   the semantic cache's query (None when not asked) and a semantic hit's
                                     cosine similarity (0.0 otherwise)
  rejection, upstream_errors         what accounting counts besides the request (None when nothing)
  form, response_body                pass-through endpoints: a multipart body's text fields read before its
                                     first file (dict str -> str), and a 2xx JSON answer kept whole (bytes);
                                     None otherwise
  t_start       the request head arrived       t_sent         sent upstream (last attempt)
  t_first_byte  the upstream's response head   t_first_token  a stream's first event relayed to the client
  t_end         the last byte written          upstream_wait  seconds spent waiting on the upstream
  (all CLOCK_MONOTONIC seconds, time.perf_counter()'s clock)

A policy that rewrites `body` must keep it a JSON object; the gateway reads the fields of the new body again.
"""
from fastgw.tokens.estimate import estimate_chat_tokens


cdef class Exchange:
    def __init__(self, str request_id, str client_addr, bytes method, str path, object parser, double t_start):
        _fill(self, request_id, client_addr, method, path, parser, t_start)

    def header(self, bytes lower_name):
        """The client's request header (first value), by lowercase name; None when absent."""
        cdef _Message p = self._parser   # typed: a direct C call, not a Python method lookup
        return p.header(lower_name) if p is not None else None

    @property
    def prompt_tokens_estimate(self):
        """Estimated prompt tokens of the body (compiled, a few µs for 4 KB); computed once, when first asked."""
        return self.prompt_estimate()

    cdef long long prompt_estimate(self) except? -2:
        # The same for compiled callers (the rate limiter's admission), without a Python attribute lookup.
        if self._prompt_estimate < 0:
            self._prompt_estimate = estimate_chat_tokens(self.body)
        return self._prompt_estimate

    @property
    def overhead(self):
        """Seconds the gateway itself spent on this request (total minus waiting on the upstream)."""
        cdef double end = self.t_end or self.t_start
        return max(0.0, (end - self.t_start) - self.upstream_wait)

    def new_scratch(self):
        if self.scratch is None:
            self.scratch = {}
        return self.scratch


cdef inline void _fill(Exchange ex, str request_id, str client_addr, bytes method, str path, object parser,
                       double t_start):
    ex.request_id = request_id
    ex.client_addr = client_addr
    ex.method = method
    ex.path = path
    ex.endpoint = path
    ex._parser = parser
    ex.body = b""
    ex.model = ex.consumer = ex.group = ex.upstream_name = ex.error = ""
    ex._prompt_estimate = -1
    ex.response_headers = []
    ex.prompt_tokens = ex.completion_tokens = -1
    ex.t_start = t_start
    # Every other field starts as zero / False / None, as the allocator leaves it.


cdef Exchange new_exchange(str request_id, str client_addr, bytes method, str path, object parser, double t_start):
    cdef Exchange ex = Exchange.__new__(Exchange)
    _fill(ex, request_id, client_addr, method, path, parser, t_start)
    return ex
