# One request's state (see exchange.pyx). A cdef class: made once per request with direct C stores.
from fastgw.protocol.http cimport _Message

cdef class Exchange:
    cdef public str request_id, client_addr, path, endpoint, model, consumer, group, upstream_name, error
    cdef public bytes method, body
    cdef public _Message _parser     # the request's parser (None once the request is over)
    cdef public object fields, route, deployment, scratch
    # Pass-through endpoints (issue 15): `form` the small text fields of a multipart body (model,
    # response_format...) read before its first file, else None; `response_body` a 2xx JSON answer kept whole
    # (for its usage, resource ids and pricing), else None.
    cdef public object form, response_body
    cdef public bint stream, client_wants_usage
    # The response cache (fastgw.cache): "hit", "miss", "refresh", "bypass", or None when it was not asked; the
    # request's cache key while its answer is to be stored, else None.
    cdef public str cache
    cdef public object cache_key
    # The semantic cache (fastgw.cache.semantic): the request's query (its partition, text and vector) while it is
    # looked up or its answer is to be indexed, else None; a semantic hit's cosine similarity (0.0: none).
    cdef public object cache_semantic
    cdef public double cache_similarity
    cdef public bint messages_api    # the client speaks Anthropic's Messages API (POST /v1/messages...)
    cdef public bint passthrough     # another /v1 endpoint, passed through (fastgw.proxy.passthrough)
    cdef public bint settled         # its complete phase ran already (a Realtime session settles each response)
    cdef public long long _prompt_estimate
    cdef public int status, events
    cdef public int attempts         # requests sent upstream for it (retries and fallbacks included)
    cdef public list response_headers
    # Accounting (fastgw.observability.accounting): a refusal's (consumer, model, reason) metric labels, and
    # the (upstream, kind) of every failed upstream attempt; None when there is none.
    cdef public object rejection, upstream_errors
    cdef public long long prompt_tokens, completion_tokens, bytes_in, bytes_out
    cdef public double cost, t_start, t_sent, t_first_byte, t_first_token, t_end, upstream_wait

    cdef long long prompt_estimate(self) except? -2


cdef Exchange new_exchange(str request_id, str client_addr, bytes method, str path, object parser, double t_start)
