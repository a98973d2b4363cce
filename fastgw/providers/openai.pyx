# cython: language_level=3
"""The OpenAI wire format: a pass-through (OpenAI itself, Azure's v1 API, vLLM, Ollama, Groq, Together, ...).

Nothing is translated: the request body goes out with at most two fields spliced (the deployment's model id,
and stream_options.include_usage when accounting needs a stream's usage), and the response bytes are relayed
as they come, the SSE relay reading usage on the way.
"""
from fastgw.protocol.jsonpeek import splice
from fastgw.providers.wire.models import openai_models
from fastgw.protocol.sse cimport SSERelay
from fastgw.proxy.exchange cimport Exchange

from fastgw.providers.base cimport Provider

cdef bytes _INCLUDE_USAGE = b'{"include_usage":true}'
cdef bytes _ADD_INCLUDE_USAGE = b',"stream_options":{"include_usage":true}'


cdef class OpenAI(Provider):
    def __init__(self):
        Provider.__init__(self, "openai", False)

    def request_lines(self, str base_path, endpoints, d):
        # Not the Messages API's: an Anthropic client is served as chat by the messages front.
        return {ep: b"POST " + (base_path + ep[3:]).encode() + b" HTTP/1.1\r\n" for ep in endpoints
                if not ep.startswith("/v1/messages")}

    def header_lines(self, str host_value, str key, d):
        lines = [b"host: " + host_value.encode() + b"\r\n"]
        if key:
            lines.append(b"authorization: Bearer " + key.encode() + b"\r\n")
        return b"".join(lines)

    def passthrough_line(self, Exchange ex, d):
        # The client's target below /v1, under the deployment's base path (query string kept).
        target = (<bytes>ex._parser.target) if ex._parser is not None else ex.path.encode("latin-1")
        return ex.method + b" " + d.base_path.encode() + target[3:] + b" HTTP/1.1\r\n"

    def messages_front(self):
        from fastgw.providers.messages import MessagesFront
        return MessagesFront(self)

    def models_target(self, str base_path, str cursor, int page_size):
        return base_path + "/models"                   # one page: OpenAI's list is not paginated

    def models_page(self, bytes body):
        return openai_models(body)

    cpdef bytes request_line(self, Exchange ex, dict request_lines):
        return <bytes>request_lines[ex.endpoint]       # every proxied endpoint has one

    cpdef object request_body(self, Exchange ex, bytes model_json, bint add_usage):
        f = ex.fields
        edits = None
        if model_json:
            edits = [(f.model_start, f.model_end, model_json)]
        if add_usage:
            e = ((f.stream_options_start, f.stream_options_end, _INCLUDE_USAGE) if f.stream_options_start >= 0
                 else (f.object_end, f.object_end, _ADD_INCLUDE_USAGE))
            edits = [e] if edits is None else sorted(edits + [e])
        return splice(ex.body, edits) if edits is not None else ex.body

    cpdef SSERelay open_stream(self, Exchange ex, bint strip_usage, bint keep_text):
        return SSERelay(strip_usage, keep_text)
