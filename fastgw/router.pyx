"""Virtual model names -> upstream deployments, with weighted round-robin between a model's deployments.

Everything a request needs from its deployment (request lines, host and key header lines, the spliced model
value) is computed here once at load time, so routing costs a dict lookup and a counter step per request.
"""
from __future__ import annotations

import ssl
from urllib.parse import urlsplit

import orjson

from fastgw.config import Config, ConfigError, provider_key

# Endpoints proxied upstream; the part after "/v1" is appended to the deployment's base path.
PROXIED = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")


class Target:
    """One deployment, ready to send to."""

    __slots__ = ("name", "pool_key", "host", "port", "tls", "ssl", "server_hostname", "request_lines",
                 "header_lines", "model", "model_json")

    def __init__(self, url: str, model: str, key: str, ca_file: str = ""):
        parts = urlsplit(url)
        self.tls = parts.scheme == "https"
        self.ssl = tls_context(ca_file) if self.tls else None
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.server_hostname = self.host if self.tls else None
        self.name = f"{self.host}:{self.port}"   # the metrics label: bounded, from the config
        self.pool_key = (self.host, self.port, self.tls, ca_file)
        base = parts.path.rstrip("/")
        self.request_lines = {
            ep: b"POST " + (base + ep[3:]).encode() + b" HTTP/1.1\r\n" for ep in PROXIED
        }
        default_port = 443 if self.tls else 80
        host_value = self.host if self.port == default_port else f"{self.host}:{self.port}"
        lines = [b"host: " + host_value.encode() + b"\r\n"]
        if key:
            lines.append(b"authorization: Bearer " + key.encode() + b"\r\n")
        self.header_lines = b"".join(lines)
        self.model = model                       # "" = forward the client's model unchanged
        self.model_json = orjson.dumps(model) if model else b""

    def __repr__(self) -> str:                   # never shows the key
        return f"Target({self.name}, model={self.model!r})"


class Route:
    """A virtual model and its deployments; pick() is a smooth weighted round-robin."""

    __slots__ = ("name", "targets", "_cycle", "_i")

    def __init__(self, name: str, targets: list[tuple[Target, int]]):
        self.name = name
        self.targets = [t for t, _ in targets]
        # Expand weights into a fixed cycle once: picking is then one index step.
        self._cycle = [t for t, w in targets for _ in range(w)]
        self._i = 0

    def pick(self) -> Target:
        c = self._cycle
        i = self._i
        self._i = (i + 1) % len(c)
        return c[i]

    def fallbacks(self, first: Target) -> list[Target]:
        """Other deployments to try when `first` cannot be reached."""
        return [t for t in self.targets if t is not first]


class Router:
    def __init__(self, cfg: Config, env=None, mock_url: str | None = None):
        self.routes: dict[str, Route] = {}
        self.wildcard: Route | None = None
        for m in cfg.models:
            targets = []
            for d in m.deployments:
                url = mock_url if (mock_url and "mock.invalid" in d.url) else d.url
                targets.append((Target(url, d.model, provider_key(d, env), d.ca_file), d.weight))
            route = Route(m.name, targets)
            if m.name == "*":
                self.wildcard = route
            else:
                self.routes[m.name] = route
        created = 1700000000
        self.models_body = orjson.dumps({
            "object": "list",
            "data": [{"id": n, "object": "model", "created": created, "owned_by": "fastgw"} for n in self.routes],
        })

    def resolve(self, model: str) -> Route | None:
        r = self.routes.get(model)
        return r if r is not None else self.wildcard


_TLS: dict[str, ssl.SSLContext] = {}


def tls_context(ca_file: str = "") -> ssl.SSLContext:
    """One verifying client TLS context per CA file and process (system CAs, plus `ca_file` when given)."""
    ctx = _TLS.get(ca_file)
    if ctx is None:
        try:
            ctx = _TLS[ca_file] = ssl.create_default_context(cafile=ca_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"ca_file {ca_file!r}: cannot load: {exc}") from None
    return ctx
