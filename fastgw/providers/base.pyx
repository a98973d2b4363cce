# cython: language_level=3
"""The provider interface: what the relay asks of a deployment's wire format, per request and per chunk.

A provider is one module with one Provider subclass. At load time it checks a deployment's config (`check`) and
gives it its request lines (`request_lines`, by endpoint), its constant header lines (host, key) and the
provider that serves the Anthropic Messages API in front of it (`messages_front`). Per request the relay asks
it for:

  request_line(ex, request_lines)         the request line for this exchange
  request_body(ex, model_json, add_usage) the body to send: the client's, with the provider's model spliced in
                                          (model_json, "" = keep the client's) and, when add_usage, the stream
                                          asked to report usage
  open_stream(ex, strip_usage, keep_text) the per-chunk relay of a 200 stream: an SSERelay (or a subclass that
                                          translates events to OpenAI chunks) whose feed() returns the bytes for
                                          the client and which reports events, usage and, with keep_text, the text
  response_body(ex, status, body)         translating providers only: a whole non-stream response body (a
                                          success or an error) in the client's wire format; usage goes to ex,
                                          and the status the client gets to ex.status

For GET /v1/models behind a wildcard route (fastgw.routing.catalog), a format that can list its models gives
`models_target` (the request target of one page of its list) and `models_page` (that page as OpenAI model
objects, fastgw.providers.wire.models).

The OpenAI pass-through (openai.pyx) translates nothing: the relay forwards its response bytes unchanged and
never calls response_body, so the OpenAI path pays one C method call per request for being a provider.
"""
from fastgw.errors import GatewayError
from fastgw.protocol.jsonpeek import splice


cdef class Provider:
    """Base class; `name` is the config's `provider` value."""

    def __init__(self, str name, bint translates):
        self.name = name
        self.translates = translates

    def check(self, d):
        """A deployment config's problem as "field: what is wrong", or "" (load time)."""
        return ""

    def request_lines(self, str base_path, endpoints, d):
        """Endpoint -> request line for deployment config `d` whose URL path is base_path (load time)."""
        raise NotImplementedError

    def header_lines(self, str host_value, str key, d):
        """The header lines every request to this deployment carries: host and the provider key (load time)."""
        raise NotImplementedError

    def messages_front(self):
        """The provider serving POST /v1/messages (Anthropic's API) on this format's deployments; None when none
        can (load time)."""
        return None

    def models_target(self, str base_path, str cursor, int page_size):
        """The target of a GET for the page of this format's model list after `cursor` ("" = the first), on a
        deployment whose URL path is base_path; None when its deployments have no list to offer."""
        return None

    def models_page(self, bytes body):
        """One page of the model list -> (OpenAI model objects, the next page's cursor, "" after the last)."""
        raise NotImplementedError

    def passthrough_line(self, Exchange ex, d):
        """The request line of a pass-through request (another /v1 endpoint) to deployment `d`; formats that
        have no such endpoints refuse."""
        raise GatewayError(400, f"{ex.path} is not available for model `{ex.model}` (provider {self.name}).",
                           code="unsupported_endpoint")

    def passthrough_body(self, Exchange ex, bytes model_json):
        """The body of a pass-through request: the client's, with the deployment's model id spliced into a JSON
        body's `model` (model_json, "" = keep the client's)."""
        f = ex.fields
        if model_json and f is not None and f.model_start >= 0:
            return splice(ex.body, [(f.model_start, f.model_end, model_json)])
        return ex.body

    cpdef bytes request_line(self, Exchange ex, dict request_lines):
        line = request_lines.get(ex.endpoint)
        if line is None:
            raise GatewayError(400, f"{ex.endpoint} is not available for model `{ex.model}` (provider "
                                    f"{self.name}).", code="unsupported_endpoint")
        return line

    cpdef object request_body(self, Exchange ex, bytes model_json, bint add_usage):
        raise NotImplementedError

    cpdef SSERelay open_stream(self, Exchange ex, bint strip_usage, bint keep_text):
        raise NotImplementedError

    cpdef bytes response_body(self, Exchange ex, int status, bytes body):
        raise NotImplementedError
