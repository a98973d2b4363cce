"""The gateway's configuration: one msgspec schema, loaded from TOML, overridden by environment variables.

Provider keys never live in the file: a deployment names the environment variable that holds its key
(`key_env`), read when the config is loaded and never logged.
"""
from __future__ import annotations

import os
import re

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
from typing import Literal
from urllib.parse import urlsplit

import msgspec


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the field."""


class Server(msgspec.Struct, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 0                      # 0: the CPUs this process may really use (affinity, cgroup quota)
    access_log: str = "-"                 # "-" stdout, a file path, or "off"
    drain_timeout: float = 30.0           # SIGTERM: seconds to finish in-flight requests and streams
    shutdown_delay: float = 0.0           # SIGTERM: seconds to keep serving while /readyz says 503 (LB deregistration)
    idle_timeout: float = 75.0            # keep-alive connection with no request
    header_timeout: float = 10.0          # first byte to end of head
    body_timeout: float = 30.0            # end of head to end of body
    max_header_bytes: int = 16384
    max_headers: int = 100
    max_body_bytes: int = 16 * 1024 * 1024
    stream_keepalive_interval: float = 15.0  # SSE comment while a stream waits for its first token; 0 = off
    realtime_idle_timeout: float = 600.0  # a Realtime (WebSocket) session with no byte either way this long is closed
    tcp_keepalive_idle: int = 60          # seconds; below the 350 s idle timeout of an AWS NLB
    proxy_protocol: Literal["off", "required"] = "off"
    trusted_proxies: list[str] = []       # peers whose PROXY header is believed (CIDRs or addresses)
    admin_host: str = "127.0.0.1"
    admin_port: int = 0                   # 0: no admin listener
    metrics: bool = True


class Upstream(msgspec.Struct, forbid_unknown_fields=True):
    connect_timeout: float = 5.0
    first_byte_timeout: float = 120.0     # request sent -> response head (and, for streams, first event)
    stream_gap_timeout: float = 120.0     # between two body chunks
    total_timeout: float = 900.0
    # Per worker and upstream address: at most this many connections; a request that finds all busy waits
    # in a first-come queue for at most queue_timeout, then gets a 503 upstream_busy.
    max_connections_per_upstream: int = 1024
    max_idle_per_upstream: int = 1024     # idle ones kept for reuse (a burst then opens no new connections)
    queue_timeout: float = 10.0
    # GET /v1/models: how long the model lists of the wildcard route's upstreams are reused before a refresh
    # (in the background: listings answer from the previous lists meanwhile).
    models_cache_s: float = 60.0


class DeploymentTimeouts(msgspec.Struct, forbid_unknown_fields=True):
    """A deployment's own timeouts (seconds); None keeps [upstream]'s."""
    connect: float | None = None
    first_byte: float | None = None
    stream_gap: float | None = None
    total: float | None = None


class DeploymentConfig(msgspec.Struct, forbid_unknown_fields=True):
    url: str                              # base URL, e.g. https://api.openai.com/v1
    model: str = ""                       # provider's model id; "" keeps the client's model name
    key_env: str = ""                     # environment variable holding the provider key; "" = no key
    weight: int = 1
    provider: str = "openai"              # wire format: openai (a pass-through), azure, anthropic, gemini
    ca_file: str = ""                     # https: a PEM file of extra CAs to trust (a private CA); "" = system CAs
    api_version: str = ""                 # azure: the api-version query value; anthropic: the anthropic-version
                                          # header; "" = the provider's default
    auth: str = ""                        # azure: "bearer" sends the key as Authorization: Bearer (an Entra ID
                                          # token) instead of api-key; "" = the provider's default
    default_max_tokens: int = 4096        # anthropic: max_tokens when the client sends none (Anthropic requires it)
    priority: int = 1                     # tier: 2 serves only while no deployment of tier 1 is available
    max_concurrent: int = 0               # requests in flight on it per worker; 0 = no limit
    timeouts: DeploymentTimeouts = msgspec.field(default_factory=DeploymentTimeouts)
    headers: dict[str, str] = {}          # extra header lines sent upstream (replacing a client's of that name)


class Retry(msgspec.Struct, forbid_unknown_fields=True):
    """[models.retry]: what a request does when an attempt fails before the client has a response head."""
    attempts: int = 1                     # tries per request on this model (1: only the connect failover and a
                                          # stale kept-alive connection's resend, as without this table)
    backoff_ms: float = 100.0             # the wait before retry n is random(0, min(max, backoff * 2**(n-1)))
    max_backoff_ms: float = 2000.0
    retry_after_cap_ms: float = 5000.0    # the upstream's retry-after(-ms) is waited up to this (same deployment)
    deadline_ms: float = 0.0              # no attempt starts, and no answer is awaited, past this; 0 = none


class Breaker(msgspec.Struct, forbid_unknown_fields=True):
    """[models.breaker]: a circuit breaker per deployment of the model, shared by the gateway's workers."""
    consecutive_failures: int = 5         # opens after this many failed attempts in a row; 0 = not this way
    error_rate: float = 0.0               # opens when this share of the window's attempts failed; 0 = not this way
    min_requests: int = 20                # ... once the window has at least this many attempts
    window_s: float = 30.0
    cooldown_s: float = 30.0              # open this long, then half-open
    half_open_probes: int = 1             # requests let through while half-open; a success closes it


class HealthCheck(msgspec.Struct, forbid_unknown_fields=True):
    """health_check = { ... }: an active check of each deployment of the model (off when absent)."""
    path: str = "/v1/models"              # GET on the deployment's host; 2xx-4xx but 429 = up
    interval_s: float = 10.0
    timeout_s: float = 5.0


class Model(msgspec.Struct, forbid_unknown_fields=True):
    name: str                             # the virtual name clients ask for; "*" matches any model
    deployments: list[DeploymentConfig]
    balancing: str = "round-robin"        # one of BALANCING
    sticky_key: str = "consumer"          # balancing = "sticky": "consumer" or "user" (the body's `user`)
    max_queue: int = 0                    # requests that wait when every deployment is at max_concurrent; 0 = 503
    queue_timeout: float | None = None    # the longest such a wait; None = [upstream] queue_timeout
    # Resilience: retries, fallback models (tried in order once this model's attempts are used up), and the
    # fallbacks for an upstream 400 context_length_exceeded / content_filter (content_policy_violation).
    retry: Retry = msgspec.field(default_factory=Retry)
    fallbacks: list[str] = []
    context_window_fallbacks: list[str] = []
    content_policy_fallbacks: list[str] = []
    breaker: Breaker | None = None        # None: no breaker (a health_check alone uses Breaker's defaults)
    health_check: HealthCheck | None = None


# A model's ways of picking a deployment for each request (see fastgw.routing.router.Route).
BALANCING = ("round-robin", "least-in-flight", "lowest-latency", "sticky")
STICKY_KEYS = ("consumer", "user")
# Header names a deployment's `headers` may not set: hop-by-hop ones (RFC 9110 7.6.1), and the ones the gateway
# writes itself (framing, host, the request id).
_RESERVED_HEADERS = frozenset(("connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                               "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade", "host",
                               "content-length", "expect", "x-request-id"))
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+").fullmatch
MAX_DEPLOYMENT_HEADERS = 32


class PassthroughRoute(msgspec.Struct, forbid_unknown_fields=True):
    path: str                             # a path prefix, e.g. "/v1/files" (the longest matching one wins)
    model: str = ""                       # the model whose deployments serve it; "" = [passthrough] model
    max_body_bytes: int = 0               # the largest request body on it; 0 = [passthrough] max_upload_bytes


class Passthrough(msgspec.Struct, forbid_unknown_fields=True):
    """Every other /v1 endpoint (files, batches, images, audio, moderations...), passed through to an
    OpenAI-format deployment (fastgw.proxy.passthrough)."""
    enabled: bool = True
    model: str = ""                       # serves requests that name no model and no known resource; "" = the
                                          # "*" model, else the first one
    routes: list[PassthroughRoute] = []
    max_upload_bytes: int = 512 * 1024 * 1024   # a streamed (multipart or binary) request body, at most
    unknown_resources: Literal["deny", "allow"] = "deny"   # an id the gateway did not see created, asked for by
                                          # an authenticated consumer: 404 (deny) or passed on (allow)
    resource_slots: int = 1 << 18         # resource ids remembered (shared by the workers; oldest replaced)
    resources_redis: str = ""             # share the resource map between gateway instances through this Redis
                                          # (any URL form of the rate limits'); "" = this gateway's own only
    resources_ttl_days: int = 0           # with resources_redis: forget an id there after this long (0: never;
                                          # a DELETE through the gateway forgets it)


class CacheRedis(msgspec.Struct, forbid_unknown_fields=True):
    url: str = "redis://127.0.0.1:6379/0"
    connect_timeout: float = 0.1          # seconds; a Redis that does not answer in time is a miss
    timeout: float = 0.05                 # seconds per lookup or store
    retry_interval: float = 0.5           # after a failed connect: misses at once this long, then try again
    key_prefix: str = "fastgw:cache:"


class CacheSemantic(msgspec.Struct, forbid_unknown_fields=True):
    """The semantic cache (fastgw.cache.semantic): after an exact miss, the answer to a similar earlier prompt."""
    models: list[str] = []                # opt-in: the models (config names) whose requests are looked up too
    embeddings_model: str = ""            # a model of this config (OpenAI format) that embeds the prompts
    threshold: float = 0.95               # cosine similarity at or above which a stored answer serves
    model_threshold: dict[str, float] = {}   # per model: its own threshold
    timeout: float = 0.5                  # seconds for an embedding; slower or failed = a miss
    retry_interval: float = 1.0           # after a failed embedding: no lookups by similarity this long
    max_entries: int = 10000              # per index (scope, model, parameters), the oldest out
    max_indexes: int = 1024               # indexes per worker, the least recently used out (~64 KB each + vectors)
    log_bytes: int = 64 * 1024 * 1024     # the shared log that brings new entries to every worker
    max_text_chars: int = 32768           # longer prompts are looked up exactly only


class Cache(msgspec.Struct, forbid_unknown_fields=True):
    """The exact response cache (fastgw.cache): identical requests answered from a stored answer."""
    enabled: bool = False
    backend: Literal["memory", "redis"] = "memory"   # memory: shared by this gateway's workers; redis: by instances
    size_bytes: int = 256 * 1024 * 1024   # memory: the whole store (index + entries), oldest overwritten
    ttl: float = 3600.0                   # seconds an entry is served
    model_ttl: dict[str, float] = {}      # per model (its config name): its own ttl; 0 = never cached
    scope: Literal["consumer", "group", "global"] = "consumer"   # who shares an entry
    allow_temperature: bool = False       # cache requests with a non-zero temperature too
    uncacheable_tools: list[str] = []     # tool names with side effects: a request offering one is not cached
    max_entry_bytes: int = 1024 * 1024    # larger answers are not stored
    charge_hits: bool = False             # true: a hit's tokens count against token limits and budgets
    redis: CacheRedis = msgspec.field(default_factory=CacheRedis)
    semantic: CacheSemantic = msgspec.field(default_factory=CacheSemantic)


class Config(msgspec.Struct, forbid_unknown_fields=True):
    server: Server = msgspec.field(default_factory=Server)
    upstream: Upstream = msgspec.field(default_factory=Upstream)
    models: list[Model] = []
    passthrough: Passthrough = msgspec.field(default_factory=Passthrough)
    cache: Cache = msgspec.field(default_factory=Cache)
    policies_dir: str = ""                # folder of policy files (*.toml); "" = no policies
    mock: bool = False                    # start the built-in mock upstream (the embedded default)
    source: str = ""                      # where this config came from (set by the loader)


# The embedded default: a built-in mock upstream, so a fresh install answers with no provider keys.
MOCK_URL = "http://mock.invalid/v1"       # replaced by the mock's real address at start-up
DEFAULT_TOML = f"""
mock = true
[[models]]
name = "*"
[[models.deployments]]
url = "{MOCK_URL}"
"""

# The file in the run directory through which the supervisor hands the validated config to its workers.
IN_FORCE = "config-in-force.json"

# Environment overrides, for containers: FASTGW_PORT=9000 etc.
_ENV = {
    "FASTGW_HOST": ("host", str), "FASTGW_PORT": ("port", int), "FASTGW_WORKERS": ("workers", int),
    "FASTGW_ACCESS_LOG": ("access_log", str), "FASTGW_ADMIN_PORT": ("admin_port", int),
    "FASTGW_ADMIN_HOST": ("admin_host", str), "FASTGW_DRAIN_TIMEOUT": ("drain_timeout", float),
    "FASTGW_SHUTDOWN_DELAY": ("shutdown_delay", float), "FASTGW_PROXY_PROTOCOL": ("proxy_protocol", str),
}


def parse(text: str, source: str = "<string>") -> Config:
    """Parse and validate TOML text; raises ConfigError naming the source and the bad field."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    try:
        cfg = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    cfg.source = source
    _check(cfg, source)
    return cfg


def load(path: str | None = None, env: dict | None = None) -> Config:
    """Load the config at `path` (or $FASTGW_CONFIG, or the embedded default) and apply FASTGW_* overrides."""
    env = os.environ if env is None else env
    path = path or env.get("FASTGW_CONFIG") or None
    if path is None:
        cfg = parse(DEFAULT_TOML, "<embedded default>")
    else:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        cfg = parse(text, path)
        if cfg.policies_dir and not os.path.isabs(cfg.policies_dir):
            cfg.policies_dir = os.path.join(os.path.dirname(os.path.abspath(path)), cfg.policies_dir)
    apply_env(cfg, env)
    return cfg


def apply_env(cfg: Config, env) -> None:
    for var, (field, kind) in _ENV.items():
        if var in env:
            try:
                value = kind(env[var])
            except ValueError:
                raise ConfigError(f"${var}: expected {kind.__name__}, got {env[var]!r}") from None
            setattr(cfg.server, field, value)
    _check(cfg, cfg.source)


def single_upstream(url: str, key_env: str = "") -> Config:
    """`fastgw serve --upstream URL`: every model goes to one OpenAI-compatible upstream, no file needed."""
    cfg = Config(models=[Model(name="*", deployments=[DeploymentConfig(url=url, key_env=key_env)])])
    cfg.source = f"--upstream {url}"
    _check(cfg, cfg.source)
    return cfg


def check(cfg: Config) -> None:
    """The rules msgspec's types cannot say, again: for a config changed after it was loaded (command-line
    overrides). Raises ConfigError."""
    _check(cfg, cfg.source)


def redact_url(url: str) -> str:
    """`url` with the password of its user info (scheme://user:password@host) replaced by ***, for messages."""
    return _PASSWORD_OPTION.sub(r"\1***", _PASSWORD_IN_URL.sub(r"\1***@", url))


_PASSWORD_IN_URL = re.compile(r"(://[^/@:\s]*:)[^/@\s]*@")
_PASSWORD_OPTION = re.compile(r"([?&][a-z_]*password=)[^&#\s]*")    # redis+sentinel://...?sentinel_password=


def _check_passthrough(cfg: Config, source: str) -> None:
    pt = cfg.passthrough
    names = {m.name for m in cfg.models}
    if pt.model and pt.model not in names and "*" not in names:
        raise ConfigError(f"{source}: passthrough.model: no model {pt.model!r} in models")
    if pt.max_upload_bytes <= 0 or pt.resource_slots < 64:
        raise ConfigError(f"{source}: passthrough: max_upload_bytes must be > 0 and resource_slots >= 64")
    if pt.resources_redis:
        from fastgw.policies.redis_client import parse_url
        try:
            parse_url(pt.resources_redis)
        except ValueError as exc:
            raise ConfigError(f"{source}: passthrough.resources_redis: {exc}") from None
    if pt.resources_ttl_days < 0:
        raise ConfigError(f"{source}: passthrough.resources_ttl_days: must be >= 0")
    for i, r in enumerate(pt.routes):
        if not r.path.startswith("/v1/"):
            raise ConfigError(f"{source}: passthrough.routes[{i}].path: expected a path under /v1/, got {r.path!r}")
        if r.model and r.model not in names and "*" not in names:
            raise ConfigError(f"{source}: passthrough.routes[{i}].model: no model {r.model!r} in models")
        if r.max_body_bytes < 0:
            raise ConfigError(f"{source}: passthrough.routes[{i}].max_body_bytes: must be >= 0")


def _check_cache(c: Cache, source: str) -> None:
    if c.size_bytes < 64 * 1024:
        raise ConfigError(f"{source}: cache.size_bytes: at least 65536")
    if c.ttl <= 0:
        raise ConfigError(f"{source}: cache.ttl: must be > 0 seconds")
    if c.max_entry_bytes <= 0:
        raise ConfigError(f"{source}: cache.max_entry_bytes: must be > 0")
    for name, t in c.model_ttl.items():
        if t < 0:
            raise ConfigError(f"{source}: cache.model_ttl.{name}: must be >= 0 (0 = never cached)")
    if c.redis.timeout <= 0 or c.redis.connect_timeout <= 0:
        raise ConfigError(f"{source}: cache.redis: timeouts must be > 0")
    if c.backend == "redis" and not c.redis.url.startswith("redis://"):
        raise ConfigError(f"{source}: cache.redis.url: expected redis://host:port[/db]")


def _check_semantic(cfg: Config, source: str) -> None:
    s, where = cfg.cache.semantic, f"{source}: cache.semantic"
    if not s.models:
        return
    if not cfg.cache.enabled:
        raise ConfigError(f"{where}.models: needs [cache] enabled = true (it serves the exact cache's entries)")
    names = {m.name for m in cfg.models}
    for name in s.models + list(s.model_threshold):
        if name not in names:
            raise ConfigError(f"{where}: {name!r} is not a model of this config")
    if s.embeddings_model not in names:
        raise ConfigError(f"{where}.embeddings_model: {s.embeddings_model!r} is not a model of this config")
    model = next(m for m in cfg.models if m.name == s.embeddings_model)
    for d in model.deployments:
        if d.provider not in ("openai", "azure"):
            raise ConfigError(f"{where}.embeddings_model: its deployments must speak the OpenAI format "
                              f"(provider {d.provider!r})")
    for name, t in [("threshold", s.threshold)] + [(f"model_threshold.{k}", v) for k, v in s.model_threshold.items()]:
        if not 0.0 < t <= 1.0:
            raise ConfigError(f"{where}.{name}: a cosine similarity in (0, 1]")
    if s.timeout <= 0 or s.retry_interval < 0:
        raise ConfigError(f"{where}: timeout must be > 0 and retry_interval >= 0 seconds")
    if s.max_entries < 1 or s.max_indexes < 1 or s.max_text_chars < 1:
        raise ConfigError(f"{where}: max_entries, max_indexes and max_text_chars must be >= 1")
    if s.log_bytes < 64 * 1024:
        raise ConfigError(f"{where}.log_bytes: at least 65536")


def _check(cfg: Config, source: str) -> None:
    """Rules msgspec's types cannot say."""
    _check_cache(cfg.cache, source)
    _check_semantic(cfg, source)
    from fastgw.providers import PROVIDERS   # here: providers are compiled, config is read before they are needed
    s = cfg.server
    if not 0 <= s.port <= 65535:
        raise ConfigError(f"{source}: server.port: {s.port} is not a TCP port")
    if s.admin_port and s.admin_port == s.port:
        # Both listeners use SO_REUSEPORT: the kernel would share the port's connections between them, and
        # /status would answer on the public port.
        raise ConfigError(f"{source}: server.admin_port: {s.admin_port} is the public port; the admin listener "
                          "needs a port of its own (it is never served on the public one)")
    if s.workers < 0:
        raise ConfigError(f"{source}: server.workers: must be >= 0 (0 = one per available CPU)")
    if s.proxy_protocol not in ("off", "required"):
        raise ConfigError(f"{source}: server.proxy_protocol: expected 'off' or 'required'")
    from fastgw.protocol.proxyproto import parse_networks

    try:
        parse_networks(s.trusted_proxies)
    except ValueError as exc:
        raise ConfigError(f"{source}: server.trusted_proxies: {exc}") from None
    if s.proxy_protocol == "required" and not s.trusted_proxies:
        raise ConfigError(f"{source}: server.trusted_proxies: empty while proxy_protocol is 'required', so every "
                          "connection would be refused; list the load balancers' addresses or CIDRs")
    if s.realtime_idle_timeout <= 0:
        raise ConfigError(f"{source}: server.realtime_idle_timeout: must be > 0")
    for field in ("max_header_bytes", "max_headers", "max_body_bytes"):
        if getattr(s, field) <= 0:
            raise ConfigError(f"{source}: server.{field}: must be > 0")
    u = cfg.upstream
    for field in ("max_connections_per_upstream", "connect_timeout", "first_byte_timeout", "stream_gap_timeout",
                  "total_timeout", "queue_timeout", "models_cache_s"):
        if getattr(u, field) <= 0:
            raise ConfigError(f"{source}: upstream.{field}: must be > 0")
    if u.max_idle_per_upstream < 0:
        raise ConfigError(f"{source}: upstream.max_idle_per_upstream: must be >= 0")
    _check_passthrough(cfg, source)
    seen = set()
    for i, m in enumerate(cfg.models):
        where = f"{source}: models[{i}] ({m.name!r})"
        if m.name in seen:
            raise ConfigError(f"{where}: duplicate model name")
        seen.add(m.name)
        if not m.deployments:
            raise ConfigError(f"{where}: deployments: at least one is needed")
        _check_balancing(m, where)
        for j, d in enumerate(m.deployments):
            parts = urlsplit(d.url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"{where}.deployments[{j}].url: expected http(s)://host[:port][/path], "
                                  f"got {redact_url(d.url)!r}")
            if d.weight < 1:
                raise ConfigError(f"{where}.deployments[{j}].weight: must be >= 1")
            if d.provider not in PROVIDERS:
                raise ConfigError(f"{where}.deployments[{j}].provider: unknown provider {d.provider!r} "
                                  f"(known: {', '.join(sorted(PROVIDERS))})")
            problem = PROVIDERS[d.provider].check(d)
            if problem:
                raise ConfigError(f"{where}.deployments[{j}].{problem}")
            problem = _deployment_problem(d)
            if problem:
                raise ConfigError(f"{where}.deployments[{j}].{problem}")
        _check_resilience(m, where)
    _check_fallbacks(cfg.models, source)


def _check_balancing(m: Model, where: str) -> None:
    if m.balancing not in BALANCING:
        raise ConfigError(f"{where}.balancing: unknown balancing {m.balancing!r} (known: {', '.join(BALANCING)})")
    if m.sticky_key not in STICKY_KEYS:
        raise ConfigError(f"{where}.sticky_key: expected one of {', '.join(STICKY_KEYS)}, got {m.sticky_key!r}")
    if m.max_queue < 0:
        raise ConfigError(f"{where}.max_queue: must be >= 0 (0 = answer 503 at once)")
    if m.queue_timeout is not None and m.queue_timeout <= 0:
        raise ConfigError(f"{where}.queue_timeout: must be > 0")
    if m.max_queue and not any(d.max_concurrent for d in m.deployments):
        raise ConfigError(f"{where}.max_queue: no deployment of this model has a max_concurrent, so no request "
                          "would ever wait")


def _deployment_problem(d: DeploymentConfig) -> str:
    """What is wrong with a deployment's balancing settings, as "field: why" ("" when nothing)."""
    if d.priority < 1:
        return "priority: must be >= 1 (1 = the first tier)"
    if d.max_concurrent < 0:
        return "max_concurrent: must be >= 0 (0 = no limit)"
    for field in ("connect", "first_byte", "stream_gap", "total"):
        value = getattr(d.timeouts, field)
        if value is not None and value <= 0:
            return f"timeouts.{field}: must be > 0"
    if len(d.headers) > MAX_DEPLOYMENT_HEADERS:
        return f"headers: at most {MAX_DEPLOYMENT_HEADERS}"
    seen = set()
    for name, value in d.headers.items():
        if not _TOKEN(name):
            return f"headers: {name!r} is not a valid header name"
        if name.lower() in seen:
            return f"headers.{name}: set twice (names are case-insensitive)"
        seen.add(name.lower())
        if name.lower() in _RESERVED_HEADERS:
            return f"headers.{name}: a hop-by-hop or gateway-managed header cannot be set"
        if any(c in value for c in "\r\n\0"):
            return f"headers.{name}: the value contains CR, LF or NUL"
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            return f"headers.{name}: the value must be Latin-1 text"
    return ""


def _check_resilience(m: Model, where: str) -> None:
    r = m.retry
    if r.attempts < 1:
        raise ConfigError(f"{where}.retry.attempts: must be >= 1 (1 = no retries)")
    for field in ("backoff_ms", "max_backoff_ms", "retry_after_cap_ms", "deadline_ms"):
        if not getattr(r, field) >= 0:
            raise ConfigError(f"{where}.retry.{field}: must be >= 0")
    b = m.breaker
    if b is not None:
        if b.consecutive_failures < 0:
            raise ConfigError(f"{where}.breaker.consecutive_failures: must be >= 0 (0 = not used)")
        if not 0 <= b.error_rate <= 1:
            raise ConfigError(f"{where}.breaker.error_rate: must be between 0 and 1 (0 = not used)")
        if b.consecutive_failures == 0 and b.error_rate == 0:
            raise ConfigError(f"{where}.breaker: set consecutive_failures or error_rate, or the breaker never opens")
        if b.min_requests < 1:
            raise ConfigError(f"{where}.breaker.min_requests: must be >= 1")
        for field in ("window_s", "cooldown_s"):
            if not getattr(b, field) > 0:
                raise ConfigError(f"{where}.breaker.{field}: must be > 0")
        if b.half_open_probes < 1:
            raise ConfigError(f"{where}.breaker.half_open_probes: must be >= 1")
    h = m.health_check
    if h is not None:
        if not h.path.startswith("/") or any(c in h.path for c in " \r\n"):
            raise ConfigError(f"{where}.health_check.path: expected an absolute path such as \"/v1/models\", "
                              f"got {h.path!r}")
        for field in ("interval_s", "timeout_s"):
            if not getattr(h, field) > 0:
                raise ConfigError(f"{where}.health_check.{field}: must be > 0")


_FALLBACK_LISTS = ("fallbacks", "context_window_fallbacks", "content_policy_fallbacks")


def _check_fallbacks(models: list[Model], source: str) -> None:
    """Every name in a fallback list is another configured model (not "*"), and no list kind has a cycle."""
    index = {m.name: i for i, m in enumerate(models)}
    for field in _FALLBACK_LISTS:
        for i, m in enumerate(models):
            where = f"{source}: models[{i}] ({m.name!r}).{field}"
            names = getattr(m, field)
            for name in names:
                if name == m.name:
                    raise ConfigError(f"{where}: {name!r} is this model itself")
                if name == "*" or name not in index:
                    raise ConfigError(f"{where}: {name!r} is not a configured model name")
            if len(set(names)) != len(names):
                raise ConfigError(f"{where}: a model is named twice")
        for i, m in enumerate(models):
            cycle = _cycle_from(m.name, {n.name: getattr(n, field) for n in models})
            if cycle:
                raise ConfigError(f"{source}: models[{i}] ({m.name!r}).{field}: a fallback cycle: "
                                  + " -> ".join(cycle))


def _cycle_from(start: str, edges: dict) -> list[str] | None:
    """A path start -> ... -> start through `edges`, or None."""
    path, on_path, done = [start], {start}, set()

    def walk(name):
        for nxt in edges.get(name, ()):
            if nxt == start:
                path.append(nxt)
                return True
            if nxt in on_path or nxt in done:
                continue
            path.append(nxt)
            on_path.add(nxt)
            if walk(nxt):
                return True
            path.pop()
            on_path.discard(nxt)
            done.add(nxt)
        return False

    return path if walk(start) else None


def provider_key(d: DeploymentConfig, env=None, field: str = "") -> str:
    """The key of a deployment, read from its environment variable ("" when it names none).

    `field` names the deployment's key_env in the error (e.g. "fastgw.toml: models[0] ('m').deployments[0].key_env").
    """
    if not d.key_env:
        return ""
    env = os.environ if env is None else env
    key = env.get(d.key_env)
    if key is None:
        where = field or f"deployment {d.url}: key_env"
        raise ConfigError(f"{where}: environment variable {d.key_env} is not set")
    return key


def publish(cfg: Config, run_dir: str) -> None:
    """Write `cfg` as the config in force, for the workers to apply on SIGHUP (atomically: never half a file)."""
    path = os.path.join(run_dir, IN_FORCE)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(msgspec.json.encode(cfg))
    os.replace(tmp, path)


def in_force(run_dir: str) -> Config:
    """The config the supervisor validated and published last: what a worker applies on SIGHUP."""
    with open(os.path.join(run_dir, IN_FORCE), "rb") as f:
        return msgspec.json.decode(f.read(), type=Config)
