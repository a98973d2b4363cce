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


class Model(msgspec.Struct, forbid_unknown_fields=True):
    name: str                             # the virtual name clients ask for; "*" matches any model
    deployments: list[DeploymentConfig]


class Config(msgspec.Struct, forbid_unknown_fields=True):
    server: Server = msgspec.field(default_factory=Server)
    upstream: Upstream = msgspec.field(default_factory=Upstream)
    models: list[Model] = []
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
    return _PASSWORD_IN_URL.sub(r"\1***@", url)


_PASSWORD_IN_URL = re.compile(r"(://[^/@:\s]*:)[^/@\s]*@")


def _check(cfg: Config, source: str) -> None:
    """Rules msgspec's types cannot say."""
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
    for field in ("max_header_bytes", "max_headers", "max_body_bytes"):
        if getattr(s, field) <= 0:
            raise ConfigError(f"{source}: server.{field}: must be > 0")
    u = cfg.upstream
    for field in ("max_connections_per_upstream", "connect_timeout", "queue_timeout"):
        if getattr(u, field) <= 0:
            raise ConfigError(f"{source}: upstream.{field}: must be > 0")
    if u.max_idle_per_upstream < 0:
        raise ConfigError(f"{source}: upstream.max_idle_per_upstream: must be >= 0")
    seen = set()
    for i, m in enumerate(cfg.models):
        where = f"{source}: models[{i}] ({m.name!r})"
        if m.name in seen:
            raise ConfigError(f"{where}: duplicate model name")
        seen.add(m.name)
        if not m.deployments:
            raise ConfigError(f"{where}: deployments: at least one is needed")
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
