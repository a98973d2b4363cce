"""One request's state, from its head to its access-log line. Plain slots: made once per request, no dict."""
from __future__ import annotations


class Exchange:
    """What policies, the router and the log see of one request.

    Times are time.perf_counter() seconds. `upstream_wait` accumulates the time spent waiting on the upstream, so
    the gateway's own overhead is (end - start) - upstream_wait.
    """

    __slots__ = (
        # request
        "request_id", "client_addr", "method", "path", "endpoint", "_parser", "body", "fields",
        "model", "stream", "client_wants_usage", "_prompt_estimate",
        # identity and policy state
        "consumer", "group", "scratch",
        # routing
        "route", "deployment", "upstream_name",
        # response
        "status", "response_headers", "prompt_tokens", "completion_tokens", "cost", "error",
        "bytes_in", "bytes_out", "events",
        # timing
        "t_start", "t_sent", "t_first_byte", "t_end", "upstream_wait",
    )

    def __init__(self, request_id: str, client_addr: str, method: bytes, path: str, parser, t_start: float):
        self.request_id = request_id
        self.client_addr = client_addr
        self.method = method
        self.path = path
        self.endpoint = path            # the route key, e.g. "/v1/chat/completions"
        self._parser = parser           # valid until the body is forwarded: header() reads the client's head
        self.body = b""
        self.fields = None              # fastgw._core.jsonpeek.RequestFields
        self.model = ""
        self.stream = False
        self.client_wants_usage = False
        self._prompt_estimate = -1
        self.consumer = ""
        self.group = ""
        self.scratch = None             # a dict that policies may create for per-request state
        self.route = None
        self.deployment = None
        self.upstream_name = ""
        self.status = 0
        self.response_headers = []      # extra b"name: value\r\n" lines for the client response
        self.prompt_tokens = -1
        self.completion_tokens = -1
        self.cost = 0.0
        self.error = ""                 # short reason when the gateway or upstream failed
        self.bytes_in = 0
        self.bytes_out = 0
        self.events = 0
        self.t_start = t_start
        self.t_sent = 0.0
        self.t_first_byte = 0.0
        self.t_end = 0.0
        self.upstream_wait = 0.0

    def header(self, lower_name: bytes) -> bytes | None:
        """The client's request header (first value), by lowercase name; None when absent."""
        p = self._parser
        return p.header(lower_name) if p is not None else None

    @property
    def prompt_tokens_estimate(self) -> int:
        """Estimated prompt tokens of the body (compiled, a few µs for 4 KB); computed once, when first asked."""
        if self._prompt_estimate < 0:
            from fastgw._core.tokens import estimate_chat_tokens  # only policies that meter tokens pay for it

            self._prompt_estimate = estimate_chat_tokens(self.body)
        return self._prompt_estimate

    @property
    def overhead(self) -> float:
        """Seconds the gateway itself spent on this request (total minus waiting on the upstream)."""
        end = self.t_end or self.t_start
        return max(0.0, (end - self.t_start) - self.upstream_wait)

    def new_scratch(self) -> dict:
        if self.scratch is None:
            self.scratch = {}
        return self.scratch
