# cython: language_level=3, boundscheck=False, wraparound=False
"""Virtual model names -> upstream deployments, with weighted round-robin between a model's deployments.

Everything a request needs from its deployment (request lines, host and key header lines, the spliced model
value) is computed here once at load time, so routing costs a dict lookup and a counter step per request.
Compiled (cdef classes, see router.pxd) so that both are C calls from the connection code, not interpreted
Python functions on every request.
"""
import ssl
from urllib.parse import urlsplit

import orjson

from fastgw.providers import PROVIDERS
from fastgw.routing.retry import NO_RETRY
from fastgw.runtime.config import Config, ConfigError, DeploymentConfig, provider_key

# Endpoints proxied upstream (the OpenAI ones, then Anthropic's Messages API, served by messages_provider).
PROXIED = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
MESSAGES = ("/v1/messages", "/v1/messages/count_tokens")


cdef class Deployment:
    """One deployment of a model (a provider's endpoint, its model id and key), ready to send to. Its `name`
    (host:port) is the `upstream` of metrics and the access log: the server requests go to."""

    def __init__(self, str url, str model, str key, str ca_file="", str provider="openai", config=None):
        self.config = config if config is not None else DeploymentConfig(url=url, model=model, provider=provider,
                                                                         ca_file=ca_file)
        self.provider = PROVIDERS[provider]
        self.messages_provider = self.provider.messages_front()
        parts = urlsplit(url)
        self.tls = parts.scheme == "https"
        self.ssl = tls_context(ca_file) if self.tls else None
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.server_hostname = self.host if self.tls else None
        self.name = f"{self.host}:{self.port}"   # the metrics label: bounded, from the config
        self.pool_key = (self.host, self.port, self.tls, ca_file)
        base = parts.path.rstrip("/")
        self.request_lines = self.provider.request_lines(base, PROXIED + MESSAGES, self.config)
        default_port = 443 if self.tls else 80
        host_value = self.host if self.port == default_port else f"{self.host}:{self.port}"
        self.header_lines = self.provider.header_lines(host_value, key, self.config)
        self.model = model                       # "" = forward the client's model unchanged
        self.model_json = orjson.dumps(model) if model else b""
        self.pool = None

    def __repr__(self) -> str:                   # never shows the key
        return f"Deployment({self.name}, model={self.model!r}, provider={self.provider.name})"

    def name_model(self, str model):
        """Send `model` as the model id when the config names none (a deployment that forwards the client's
        model name): set on the deployments of a fallback model, whose clients may have asked for another."""
        if not self.model:
            self.model = model
            self.model_json = orjson.dumps(model)

    # -- health: its circuit breaker (fastgw.routing.breaker), shared by the workers -----------------------

    cdef bint available(self):
        """False while its breaker is open (or half-open with every probe out): picks skip it. No side effect."""
        return self.breaker is None or self.breaker.available()

    cdef bint admit(self):
        """Let one request go to it: True unless its breaker is half-open and another request took the last
        probe since `available` said yes (the relay then picks again)."""
        return self.breaker is None or self.breaker.admit()

    cdef void succeeded(self) except *:
        """One attempt on it answered (any status but 429 and 5xx)."""
        if self.breaker is not None:
            self.breaker.succeeded()

    cdef void failed(self, str kind) except *:
        """One attempt on it failed (`kind`: connect, timeout, reset, protocol, http_429, http_5xx...)."""
        cdef Breaker b = self.breaker
        if b is not None and b.failed() and b.on_open is not None:
            b.on_open()


cdef class Route:
    """A virtual model and its deployments; pick() is a weighted round-robin over them."""

    def __init__(self, str name, list deployments):
        """`deployments`: (Deployment, weight) pairs; a weight is a whole number >= 1."""
        self.name = name
        self.deployments = [<Deployment?>d for d, _ in deployments]
        # Expand weights into a fixed cycle once: picking is then one index step.
        self._cycle = [d for d, w in deployments for _ in range(w)]
        self._n = len(self._cycle)
        self._i = 0
        self.retry = NO_RETRY
        self.served_line = served_line(name)

    cpdef Deployment pick(self, Exchange ex, list exclude=None):
        """The next deployment of the cycle that is not in `exclude` and is available (its breaker not open);
        None when there is none."""
        cdef Py_ssize_t i = self._i, k
        cdef Deployment d
        if self._n == 0:
            raise ValueError(f"route {self.name!r} has no deployment with a positive weight")
        for k in range(self._n):
            d = <Deployment>self._cycle[i]
            i = i + 1 if i + 1 < self._n else 0
            if (exclude is None or d not in exclude) and (d.breaker is None or d.available()):
                self._i = i
                return d
        return None

    def fallbacks(self, first):
        """Other deployments to try when `first` cannot be reached."""
        return [d for d in self.deployments if d is not first]


cdef class Router:
    """The routes of one config: `routes` by virtual model name, and the "*" route (`wildcard`) or None."""

    def __init__(self, cfg: Config, env=None, mock_url=None):
        self.routes = {}
        self.wildcard = None
        for i, m in enumerate(cfg.models):
            deployments = []
            for j, d in enumerate(m.deployments):
                url = mock_url if (mock_url and "mock.invalid" in d.url) else d.url
                key = provider_key(d, env, f"{cfg.source}: models[{i}] ({m.name!r}).deployments[{j}].key_env")
                deployments.append((Deployment(url, d.model, key, d.ca_file, d.provider, d), d.weight))
            route = Route(m.name, deployments)
            if m.name == "*":
                self.wildcard = route
            else:
                self.routes[m.name] = route
        created = 1700000000
        self.models_body = orjson.dumps({
            "object": "list",
            "data": [{"id": n, "object": "model", "created": created, "owned_by": "fastgw"} for n in self.routes],
        })

    cpdef Route resolve(self, model):
        """The route of a client's model name: its own, else the wildcard, else None."""
        r = self.routes.get(model)
        return <Route>r if r is not None else self.wildcard


def served_line(str name):
    """b"x-fastgw-model: <name>\\r\\n", the header naming the virtual model that served an answer; b"" for the
    wildcard (its served model is the client's own name) and for a name a header cannot carry."""
    if name == "*" or not (name.isascii() and name.isprintable()):
        return b""
    return b"x-fastgw-model: " + name.encode() + b"\r\n"


_TLS = {}


def tls_context(str ca_file=""):
    """One verifying client TLS context per CA file and process (system CAs, plus `ca_file` when given)."""
    ctx = _TLS.get(ca_file)
    if ctx is None:
        try:
            ctx = _TLS[ca_file] = ssl.create_default_context(cafile=ca_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"ca_file {ca_file!r}: cannot load: {exc}") from None
    return ctx
