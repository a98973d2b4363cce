# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Virtual model names -> upstream deployments, and the balancing that picks one of a model's deployments.

Everything a request needs from its deployment (request lines, host and key header lines, the spliced model
value, its timeouts) is computed here once at load time, so routing costs a dict lookup and a short loop per
request. Compiled (cdef classes, see router.pxd) so that both are C calls from the connection code, not
interpreted Python functions on every request.

Balancing (a model's `balancing`), within the first priority tier that has a deployment to offer:
  round-robin      smooth weighted round robin (nginx's): over any `sum of weights` picks each deployment gets
                   exactly its weight, interleaved (weights 2:1 give a, b, a, not a, a, b)
  least-in-flight  the fewest requests in flight on this worker relative to weight; ties by weighted round robin
  lowest-latency   the lowest moving average of time to first byte (a stream's first event); one pick in
                   EXPLORE_EVERY goes to the deployment picked least recently instead, so a slow one that
                   recovered is measured again; a deployment never measured counts as fastest (it is tried)
  sticky           weighted rendezvous hashing of a key (the consumer, or the body's `user`): one key always
                   lands on the same deployment while it is available, and removing a deployment moves only
                   the keys it had
A deployment is skipped when it is in the caller's `exclude`, not available() (its circuit breaker), or at its
max_concurrent.
"""
import ssl
from collections import deque
from urllib.parse import urlsplit

import orjson

from libc.math cimport log

from fastgw.providers import PROVIDERS
from fastgw.routing.retry import NO_RETRY
from fastgw.runtime.config import Config, ConfigError, DeploymentConfig, Upstream, provider_key

# Endpoints proxied upstream (the OpenAI ones, then Anthropic's Messages API, served by messages_provider).
PROXIED = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
MESSAGES = ("/v1/messages", "/v1/messages/count_tokens")

cdef enum:                      # Route.strategy
    ROUND_ROBIN
    LEAST_IN_FLIGHT
    LOWEST_LATENCY
    STICKY
    STICKY_USER                 # sticky, keyed on the body's `user`

cdef dict _STRATEGIES = {"round-robin": ROUND_ROBIN, "least-in-flight": LEAST_IN_FLIGHT,
                         "lowest-latency": LOWEST_LATENCY, "sticky": STICKY}
# lowest-latency: weight of a new first-byte time in the moving average, and how often a pick explores.
LATENCY_WEIGHT = 0.3
EXPLORE_EVERY = 20
cdef double _ALPHA = LATENCY_WEIGHT
cdef long long _EXPLORE = EXPLORE_EVERY


cdef class Deployment:
    """One deployment of a model (a provider's endpoint, its model id and key), ready to send to. Its `name`
    (host:port) is the `upstream` of metrics and the access log: the server requests go to.

    `config` is its DeploymentConfig (weight, priority, max_concurrent, timeouts, headers and the provider's
    settings); `upstream` the [upstream] section whose timeouts apply where it has none of its own."""

    def __init__(self, str url, str model, str key, str ca_file="", str provider="openai", config=None,
                 upstream=None):
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
        self.base_path = base                    # the URL's path: where the provider's other endpoints are
        self.request_lines = self.provider.request_lines(base, PROXIED + MESSAGES, self.config)
        default_port = 443 if self.tls else 80
        host_value = self.host if self.port == default_port else f"{self.host}:{self.port}"
        provider_lines = self.provider.header_lines(host_value, key, self.config)
        self.header_lines = provider_lines + _own_header_lines(self.config.headers, provider_lines)
        self.own_header_names = tuple(n.lower().encode() for n in self.config.headers)
        self.model = model                       # "" = forward the client's model unchanged
        self.model_json = orjson.dumps(model) if model else b""
        self.pool = None
        c = self.config
        # Its identity, not its place in the list: removing another deployment moves no sticky key to it.
        self.seed = _hash64(f"{provider}|{url}|{model}|{c.key_env}".encode())
        self.weight, self.priority, self.max_concurrent = c.weight, c.priority, c.max_concurrent
        upstream = upstream if upstream is not None else Upstream()
        t = c.timeouts
        self.own_timeouts = any(v is not None for v in (t.connect, t.first_byte, t.stream_gap, t.total))
        self.connect_timeout = t.connect if t.connect is not None else upstream.connect_timeout
        self.first_byte_timeout = t.first_byte if t.first_byte is not None else upstream.first_byte_timeout
        self.stream_gap_timeout = t.stream_gap if t.stream_gap is not None else upstream.stream_gap_timeout
        self.total_timeout = t.total if t.total is not None else upstream.total_timeout

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

    # The relay's bookkeeping of one attempt on this deployment: started, (first_byte,) ended.

    cpdef void started(self):
        """A request was sent (or queued for a connection) on it."""
        self.in_flight += 1

    cpdef void first_byte(self, double seconds):
        """A successful answer began `seconds` after the request was sent (a stream: its first event)."""
        if self.samples == 0:
            self.latency = seconds
        else:
            self.latency += _ALPHA * (seconds - self.latency)
        self.samples += 1

    cpdef void ended(self):
        """A request sent on it ended, any way; a request queued for a free slot of the route may go now."""
        self.in_flight -= 1
        if self.queue_route is not None:
            self.queue_route.wake()


cdef class _Waiter:
    """A request waiting in a route's queue; `callback(deployment)` when its turn comes."""
    cdef Exchange ex
    cdef object callback
    cdef bint waiting


cdef class Route:
    """A virtual model, its deployments and its balancing: pick() chooses the deployment of each request."""

    def __init__(self, str name, list deployments, str balancing="round-robin", str sticky_key="consumer",
                 int max_queue=0, double queue_timeout=10.0):
        """`deployments`: Deployments, whose weight and priority are their config's; or (Deployment, weight)
        pairs, the weight given replacing the config's."""
        self.name = name
        self.deployments = []
        for item in deployments:
            d = item
            if isinstance(item, tuple):
                d, weight = item
                (<Deployment?>d).weight = weight
            if (<Deployment?>d).weight < 1:
                raise ValueError(f"route {name!r}: deployment {d.name} has weight {d.weight}; it must be >= 1")
            self.deployments.append(d)
        if balancing not in _STRATEGIES:
            raise ValueError(f"route {name!r}: unknown balancing {balancing!r}")
        self.balancing = balancing
        self.sticky_key = sticky_key
        self.strategy = _STRATEGIES[balancing]
        if self.strategy == STICKY and sticky_key == "user":
            self.strategy = STICKY_USER
        priorities = sorted({(<Deployment>d).priority for d in self.deployments})
        self.tiers = [[d for d in self.deployments if (<Deployment>d).priority == p] for p in priorities]
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.waiters = deque()
        for d in self.deployments:
            if max_queue > 0 and (<Deployment>d).max_concurrent > 0:
                (<Deployment>d).queue_route = self
        self.retry = NO_RETRY
        self.served_line = served_line(name)

    cpdef Deployment pick(self, Exchange ex, list exclude=None):
        """The deployment for a request by the model's balancing, skipping those in `exclude`, unavailable
        ones and those at max_concurrent; tier 2 only when tier 1 has none to offer. None when none is left."""
        cdef list tier
        cdef Deployment d
        cdef unsigned long long key = 0
        if self.strategy >= STICKY:
            key = _sticky_key(ex, self.strategy == STICKY_USER)
        for tier in self.tiers:
            d = self._pick_in(tier, exclude, key)
            if d is not None:
                return d
        return None

    cdef Deployment _pick_in(self, list tier, list exclude, unsigned long long key):
        cdef Deployment d, best = None
        cdef double score, best_score = 0.0
        cdef bint explore
        if self.strategy == ROUND_ROBIN:
            return _weighted(tier, exclude, None)
        if self.strategy == LEAST_IN_FLIGHT:
            for d in tier:                   # in_flight / weight, compared without dividing
                if _eligible(d, exclude) and (best is None or
                                              d.in_flight * best.weight < best.in_flight * d.weight):
                    best = d
            return _weighted(tier, exclude, best) if best is not None else None
        if self.strategy == LOWEST_LATENCY:
            self.picks += 1
            explore = self.picks % _EXPLORE == 0
            for d in tier:
                if _eligible(d, exclude) and (best is None or (
                        d.last_pick < best.last_pick if explore else d.latency < best.latency)):
                    best = d
            if best is not None:
                best.last_pick = self.picks
            return best
        for d in tier:                       # sticky: the highest weighted rendezvous score
            if _eligible(d, exclude):
                score = _rendezvous(key, d)
                if best is None or score > best_score:
                    best, best_score = d, score
        return best

    def fallbacks(self, first):
        """Other deployments to try when `first` cannot be reached."""
        return [d for d in self.deployments if d is not first]

    cdef bint any_full(self, list exclude):
        """Some deployment would be picked but for its max_concurrent (then waiting for a slot makes sense)."""
        cdef Deployment d
        for d in self.deployments:
            if (d.max_concurrent and d.in_flight >= d.max_concurrent and d.available()
                    and (exclude is None or d not in exclude)):
                return True
        return False

    # -- the queue of requests waiting for a free slot (max_queue) ------------------------------------------

    def wait(self, Exchange ex, callback):
        """Queue a request that found every deployment at max_concurrent: `callback(deployment)` is called
        when one has a slot for it. Returns the place in the queue (for leave), or None when there is no room:
        no deployment is merely full (nothing would free up), or max_queue requests wait already."""
        if self.queued >= self.max_queue or not self.any_full(None):
            return None
        cdef _Waiter w = _Waiter.__new__(_Waiter)
        w.ex, w.callback, w.waiting = ex, callback, True
        self.waiters.append(w)
        self.queued += 1
        return w

    def leave(self, _Waiter w):
        """A queued request gives up its place (it timed out, or its client left)."""
        if w.waiting:
            w.waiting = False
            self.queued -= 1
            if self.queued == 0:
                self.waiters.clear()

    cdef void wake(self) except *:
        """A slot may be free: the first request still waiting gets a deployment if one has room now."""
        cdef _Waiter w
        cdef Deployment d
        if self.queued == 0:
            return
        while self.waiters:
            w = <_Waiter>self.waiters.popleft()
            if not w.waiting:
                continue
            d = self.pick(w.ex, None)
            if d is None:
                self.waiters.appendleft(w)
                return
            w.waiting = False
            self.queued -= 1
            w.callback(d)
            return


cdef inline bint _eligible(Deployment d, list exclude) except -1:
    if d.max_concurrent and d.in_flight >= d.max_concurrent:
        return False
    if exclude is not None and d in exclude:
        return False
    return d.available()


cdef Deployment _weighted(list tier, list exclude, Deployment load):
    """Smooth weighted round robin over the eligible deployments of `tier` (with `load`, only over those as
    loaded as it, relative to weight): each adds its weight to its running weight, the highest is picked and
    gives back the sum of the weights that took part."""
    cdef Deployment d, best = None
    cdef long long total = 0
    for d in tier:
        if not _eligible(d, exclude):
            continue
        if load is not None and d.in_flight * load.weight != load.in_flight * d.weight:
            continue
        d.current += d.weight
        total += d.weight
        if best is None or d.current > best.current:
            best = d
    if best is not None:
        best.current -= total
    return best


cdef unsigned long long _hash64(bytes data):
    """FNV-1a (64 bit), then a finalizer: the same in every worker and release (unlike hash())."""
    cdef unsigned long long h = 14695981039346656037ULL
    cdef const unsigned char* p = data
    cdef Py_ssize_t i
    for i in range(len(data)):
        h = (h ^ p[i]) * 1099511628211ULL
    return _mix(h)


cdef inline unsigned long long _mix(unsigned long long z) noexcept:
    """splitmix64's finalizer: every input bit moves every output bit."""
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL
    return z ^ (z >> 31)


cdef unsigned long long _sticky_key(Exchange ex, bint user) except? 0:
    """The hash of what sticky balancing keys on: the body's `user` (sticky_key = "user") or the consumer
    (the identity a key-auth policy set), falling back to the consumer, then the client address."""
    key = None
    if ex is not None:
        if user and ex.fields is not None:
            key = ex.fields.user
        if not key:
            key = ex.consumer or ex.client_addr
    return _hash64((<str>key).encode("utf-8", "surrogatepass") if key else b"")


cdef inline double _rendezvous(unsigned long long key, Deployment d) noexcept:
    """Weighted rendezvous score: weight / -ln(u), u uniform in (0, 1) from (key, deployment)."""
    cdef double u = ((_mix(key ^ d.seed) >> 11) + 0.5) * (1.0 / 9007199254740992.0)
    return d.weight / -log(u)


def sticky_hash(str key):
    """_hash64 of a sticky key's UTF-8 (for tests)."""
    return _hash64(key.encode("utf-8", "surrogatepass"))


cdef bytes _own_header_lines(dict headers, bytes provider_lines):
    """A deployment's `headers` as header lines; refused (ConfigError) when its provider sets that name."""
    if not headers:
        return b""
    taken = {line.split(b":", 1)[0].strip().lower() for line in provider_lines.split(b"\r\n") if line}
    out = []
    for name, value in headers.items():
        if name.lower().encode() in taken:
            raise ConfigError(f"headers.{name}: set by the gateway for this deployment's provider (its host or "
                              "key); it cannot be replaced")
        out.append(f"{name}: {value}\r\n".encode("latin-1"))
    return b"".join(out)


cdef class Router:
    """The routes of one config: `routes` by virtual model name, and the "*" route (`wildcard`) or None."""

    def __init__(self, cfg: Config, env=None, mock_url=None):
        self.routes = {}
        self.wildcard = None
        for i, m in enumerate(cfg.models):
            where = f"{cfg.source}: models[{i}] ({m.name!r})"
            deployments = []
            for j, d in enumerate(m.deployments):
                url = mock_url if (mock_url and "mock.invalid" in d.url) else d.url
                key = provider_key(d, env, f"{where}.deployments[{j}].key_env")
                try:
                    deployments.append(Deployment(url, d.model, key, d.ca_file, d.provider, d, cfg.upstream))
                except ConfigError as exc:
                    raise ConfigError(f"{where}.deployments[{j}].{exc}") from None
            queue_timeout = m.queue_timeout if m.queue_timeout is not None else cfg.upstream.queue_timeout
            route = Route(m.name, deployments, m.balancing, m.sticky_key, m.max_queue, queue_timeout)
            if m.name == "*":
                self.wildcard = route
            else:
                self.routes[m.name] = route

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
