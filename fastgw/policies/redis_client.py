"""A minimal asyncio Redis client: pipelined connections, hiredis as the RESP parser, and Redis as operators run
it: one server, TLS, ACL users, Sentinel-managed failover, Redis Cluster.

The URL says which (`parse_url`):

    redis://[user:password@]host[:port][/db]                     one server
    rediss://...?ca_file=ca.pem[&cert_file=c.pem&key_file=k.pem][&server_name=name]    the same over TLS
    redis+sentinel://[user:password@]host:port[,host:port...]/master-name[/db][?sentinel_password=...]
    redis+cluster://[user:password@]host:port[,host:port...]     seed nodes of a Redis Cluster
    rediss+sentinel://..., rediss+cluster://...                  TLS to every node (and sentinel)

The user and password are sent as `AUTH [user] password` to every data node (an ACL user when a user is named);
sentinels get `sentinel_username`/`sentinel_password` when given, else no AUTH.

One connection per server per client (one client per worker), commands pipelined: replies arrive in command
order, so pending calls are a FIFO of futures. Nothing hangs: connecting and every call have a timeout; a timeout
or a lost connection closes the connection (failing every pending call at once, since their replies can no longer
be matched), and after a failed connect the client fails fast for `retry_interval` seconds instead of queueing
callers behind a dead server.

A command is sent again only when Redis cannot have run it: it was never written (the connection could not be
opened), or Redis answered MOVED, ASK, TRYAGAIN, CLUSTERDOWN or READONLY. A command whose connection broke after
it was written may have run; it fails (the callers' fail_open decides), so nothing is counted twice.

Cluster: the slot map comes from CLUSTER SLOTS; a command goes to the master of its first key's slot (`key_slot`:
CRC16 of the key's hash tag, as Redis computes it). Every key of one command (one Lua script) must share a slot:
callers put a hash tag in their key names. MOVED updates the map and resends (and refreshes the whole map in the
background); ASK sends ASKING then the command to the node importing the slot; a node that cannot be reached
refreshes the map (a replica may have taken over) and the command goes to the new master if the slot moved.

Sentinel: the sentinels are asked for the master (SENTINEL get-master-addr-by-name), whose ROLE must be master.
A lost master connection, a refused connect or a READONLY reply (the old master was demoted) makes the next
command resolve the master again.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import ssl
import time
from collections import deque
from typing import NamedTuple
from urllib.parse import parse_qsl, unquote

import hiredis

__all__ = ["RedisClient", "RedisError", "RedisUnavailable", "Script", "RedisTarget", "parse_url", "key_slot"]

SLOTS = 16384
CHECK_INTERVAL = 1.0     # sentinel: seconds between checks (while in use) that the master is still the master
_MAX_REDIRECTS = 5


class RedisError(Exception):
    """An error reply from Redis (a failed AUTH, WRONGTYPE, a bug in a script...), or the server unreachable.

    Callers treat every RedisError alike (fail open or closed): a gateway cannot fix either at request time.
    `kind` names it for metrics: the reply's error code in lower case ("wrongpass", "noauth", "wrongtype"), or
    "error"."""

    kind = "error"
    unsent = False          # True: the command was never written (see RedisUnavailable)

    def __init__(self, message: str):
        super().__init__(message)
        code = message.split(" ", 1)[0]
        if 2 <= len(code) <= 16 and code.isalpha() and code.isupper():
            self.kind = code.lower()


class RedisUnavailable(RedisError):
    """Redis could not be reached or did not answer in time. `unsent`: the command was never written, so it did
    not run and may be sent elsewhere."""

    def __init__(self, kind: str, detail: str = "", unsent: bool = False):
        super().__init__(f"redis {kind}" + (f": {detail}" if detail else ""))
        self.kind = kind        # "connect", "timeout", "closed", "down"
        self.unsent = unsent


class Script:
    """A Lua script, called by its SHA-1 (loaded on first NOSCRIPT)."""

    def __init__(self, source: str):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


# -- hash slots ---------------------------------------------------------------------------------------------------

def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_CRC16 = _crc16_table()


def crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM), the checksum Redis Cluster hashes keys with."""
    crc = 0
    table = _CRC16
    for b in data:
        crc = ((crc << 8) & 0xFFFF) ^ table[(crc >> 8) ^ b]
    return crc


@functools.lru_cache(maxsize=65536)
def key_slot(key) -> int:
    """The cluster slot of `key` (str or bytes): of the part between the first "{" and the next "}" when that part
    is not empty (the hash tag), else of the whole key."""
    k = key.encode("utf-8", "surrogatepass") if isinstance(key, str) else bytes(key)
    start = k.find(b"{")
    if start >= 0:
        end = k.find(b"}", start + 1)
        if end > start + 1:
            k = k[start + 1:end]
    return crc16(k) % SLOTS


# Commands whose first key is not their first argument, and those that name no key (sent to any master).
_KEYLESS = frozenset((b"PING", b"ECHO", b"TIME", b"INFO", b"SCRIPT", b"CLUSTER", b"ROLE", b"CONFIG", b"DBSIZE",
                      b"FLUSHALL", b"FLUSHDB", b"CLIENT", b"COMMAND", b"WAIT", b"LASTSAVE", b"MEMORY",
                      b"SLOWLOG", b"FUNCTION", b"READONLY", b"READWRITE", b"ASKING", b"AUTH", b"HELLO"))
_SCRIPTED = frozenset((b"EVAL", b"EVALSHA", b"EVAL_RO", b"EVALSHA_RO", b"FCALL", b"FCALL_RO"))


def command_key(args):
    """The key a command is routed by in a cluster (its first key), or None for a command naming none."""
    name = args[0]
    name = (name.encode() if isinstance(name, str) else bytes(name)).upper()
    if name in _SCRIPTED:
        return args[3] if len(args) > 3 and int(args[2]) > 0 else None
    if name in _KEYLESS or len(args) < 2:
        return None
    return args[1]


# -- URLs -----------------------------------------------------------------------------------------------------------

class RedisTarget(NamedTuple):
    mode: str                           # "single", "sentinel" or "cluster"
    nodes: tuple                        # ((host, port), ...): the server, the sentinels or the cluster's seeds
    username: str | None
    password: str | None
    db: int
    tls: bool
    master: str = ""                    # sentinel: the master's name
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""
    sentinel_username: str | None = None
    sentinel_password: str | None = None


_SCHEMES = {"redis": ("single", False), "rediss": ("single", True), "redis+sentinel": ("sentinel", False),
            "rediss+sentinel": ("sentinel", True), "redis+cluster": ("cluster", False),
            "rediss+cluster": ("cluster", True)}
_OPTIONS = {"ca_file", "cert_file", "key_file", "server_name", "sentinel_username", "sentinel_password"}
_FORMS = ("redis://[user:password@]host:port[/db], rediss://... (TLS), "
          "redis+sentinel://[user:password@]host:port[,host:port...]/master-name[/db], "
          "redis+cluster://[user:password@]host:port[,host:port...]")


def _redact(url: str) -> str:
    from fastgw.runtime.config import redact_url   # messages are logged: never with a password
    return redact_url(url)


def parse_url(url: str) -> RedisTarget:
    """The RedisTarget a URL names (forms in the module doc). Raises ValueError saying what is wrong (the URL
    shown without its passwords)."""
    def bad(why: str) -> ValueError:
        return ValueError(f"{why} in {_redact(url)!r}; expected {_FORMS}")

    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise bad(f"unknown scheme {scheme + sep!r}" if sep else "no scheme")
    mode, tls = _SCHEMES[scheme.lower()]
    rest = rest.partition("#")[0]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
        if not colon:                   # "user@host": Redis has no user without a password; take it as one
            username, password = None, unquote(user) or None
    nodes = []
    for part in hosts.split(","):
        host, port = _host_port(part)
        if not host:
            raise bad("a host is missing")
        if port is None:
            raise bad(f"bad port in {part!r}")
        nodes.append((host, port))
    if mode == "single" and len(nodes) != 1:
        raise bad("one host expected (several: redis+sentinel:// or redis+cluster://)")
    segments = [s for s in path.split("/") if s]
    master = ""
    if mode == "sentinel":
        if not segments:
            raise bad("the master's name is missing")
        master = unquote(segments.pop(0))
    if len(segments) > 1 or (segments and not segments[0].isdigit()):
        raise bad(f"bad database {'/'.join(segments)!r}")
    db = int(segments[0]) if segments else 0
    if mode == "cluster" and db:
        raise bad("a cluster has only database 0")
    opts = {}
    for k, v in parse_qsl(query, keep_blank_values=True):
        if k not in _OPTIONS:
            raise bad(f"unknown option {k!r} (known: {', '.join(sorted(_OPTIONS))})")
        opts[k] = v
    if not tls and any(opts.get(k) for k in ("ca_file", "cert_file", "key_file", "server_name")):
        raise bad("TLS options need rediss://")
    if bool(opts.get("cert_file")) != bool(opts.get("key_file")):
        raise bad("cert_file and key_file go together")
    if mode != "sentinel" and any(k.startswith("sentinel_") for k in opts):
        raise bad("sentinel_* options need redis+sentinel://")
    return RedisTarget(mode, tuple(nodes), username, password, db, tls, master,
                       opts.get("ca_file", ""), opts.get("cert_file", ""), opts.get("key_file", ""),
                       opts.get("server_name", ""), opts.get("sentinel_username") or None,
                       opts.get("sentinel_password") or None)


def _host_port(text: str):
    """("host", port) of "host[:port]" or "[v6]:port"; port None when not a number."""
    text = text.strip()
    if text.startswith("["):
        host, _, after = text[1:].partition("]")
        port = after[1:] if after.startswith(":") else ""
    else:
        host, _, port = text.partition(":")
    if not port:
        return host, 6379
    return host, int(port) if port.isdigit() and 0 < int(port) < 65536 else None


def _addr(host, port) -> tuple[str, int]:
    return (host.decode() if isinstance(host, bytes) else host, int(port))


# -- one server ---------------------------------------------------------------------------------------------------

class _Protocol(asyncio.Protocol):
    def __init__(self, node: "_Node"):
        self.node = node
        self.reader = hiredis.Reader()
        self.pending: deque[asyncio.Future] = deque()
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.reader.feed(data)
        pending = self.pending
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self.transport.close()
                self._fail_all(RedisUnavailable("closed", f"protocol error: {exc}"))
                return
            if reply is False:
                return
            if not pending:        # a reply nobody waits for: the stream is out of step
                self.transport.close()
                return
            fut = pending.popleft()
            if not fut.done():
                if isinstance(reply, hiredis.ReplyError):
                    fut.set_exception(RedisError(str(reply)))
                else:
                    fut.set_result(reply)

    def connection_lost(self, exc):
        self.node._lost(self)
        self._fail_all(RedisUnavailable("closed", str(exc) if exc else "connection closed"))

    def _fail_all(self, err: Exception):
        while self.pending:
            fut = self.pending.popleft()
            if not fut.done():
                fut.set_exception(err)


class _Options:
    """What every connection of one client shares: credentials, TLS, timeouts."""

    def __init__(self, username, password, ssl_context, server_name, connect_timeout, timeout, retry_interval):
        self.username = username
        self.password = password
        self.ssl = ssl_context
        self.server_name = server_name
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.retry_interval = retry_interval


class _Node:
    """One server: one pipelined connection, opened on first use and after a loss."""

    def __init__(self, addr: tuple[str, int], opts: _Options, db: int = 0):
        self.addr = addr
        self.opts = opts
        self.db = db
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future | None = None
        self._down_until = 0.0

    async def _connection(self) -> _Protocol:
        if self._proto is not None:
            return self._proto
        if time.monotonic() < self._down_until:
            raise RedisUnavailable("down", f"recent connect failure ({self.addr[0]}:{self.addr[1]})", unsent=True)
        if self._connecting is None:
            # A task of its own that every caller awaits shielded: the first caller's cancellation (its client
            # went away) must neither abort the connect nor leave the others waiting for it forever.
            self._connecting = asyncio.ensure_future(self._connect())
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> _Protocol:
        try:
            proto = await asyncio.wait_for(self._open(), self.opts.connect_timeout)
        except Exception as exc:
            self._down_until = time.monotonic() + self.opts.retry_interval
            if isinstance(exc, RedisError):
                exc.unsent = True       # a refused AUTH, say: the command never went out
                raise exc from None
            raise RedisUnavailable("timeout" if isinstance(exc, asyncio.TimeoutError) else "connect", str(exc),
                                   unsent=True) from None
        finally:
            self._connecting = None
        self._proto = proto
        return proto

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        o = self.opts
        host, port = self.addr
        if o.ssl is not None:
            _, proto = await loop.create_connection(lambda: _Protocol(self), host, port, ssl=o.ssl,
                                                    server_hostname=o.server_name or host)
        else:
            _, proto = await loop.create_connection(lambda: _Protocol(self), host, port)
        setup = []
        if o.password is not None:
            setup.append(("AUTH", o.username, o.password) if o.username else ("AUTH", o.password))
        if self.db:
            setup.append(("SELECT", str(self.db)))
        try:
            for cmd in setup:
                await _send(proto, cmd)
        except BaseException:
            proto.transport.close()     # e.g. a wrong password: do not leak one connection per retry
            raise
        return proto

    def _lost(self, proto: _Protocol):
        if self._proto is proto:
            self._proto = None

    async def call(self, args, asking: bool = False):
        proto = await self._connection()
        if asking:                      # ASK redirection: ASKING then the command, in one write
            _send(proto, ("ASKING",)).add_done_callback(_retrieved)
        fut = _send(proto, args)
        try:
            return await asyncio.wait_for(fut, self.opts.timeout)
        except asyncio.TimeoutError:
            # Later replies can no longer be matched reliably with a slow server: start over.
            if self._proto is proto:
                self._proto = None
            proto.transport.close()
            raise RedisUnavailable("timeout", f"no reply in {self.opts.timeout}s") from None

    def send_now(self, args) -> asyncio.Future | None:
        """Write the command at once when connected (its reply's future), else None."""
        return _send(self._proto, args) if self._proto is not None else None

    def close(self):
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        self._proto = None


def _send(proto: _Protocol, args) -> asyncio.Future:
    fut = asyncio.get_running_loop().create_future()
    proto.pending.append(fut)
    proto.transport.write(hiredis.pack_command(tuple(args)))
    return fut


def _retrieved(fut: asyncio.Future):
    if not fut.cancelled():
        fut.exception()


# Error replies saying the command did not run here (so it may be sent again, elsewhere).
_NOT_RUN = frozenset(("moved", "ask", "tryagain", "clusterdown", "readonly", "loading"))


def _is(exc: RedisError, *codes: str) -> bool:
    return not isinstance(exc, RedisUnavailable) and exc.kind in codes


# -- the three modes ------------------------------------------------------------------------------------------------

class _Single:
    def __init__(self, target: RedisTarget, opts: _Options):
        self.node = _Node(target.nodes[0], opts, target.db)
        self.call = self.node.call
        self.send_now = self.node.send_now

    def close(self):
        self.node.close()


class _Sentinel:
    """The master that the sentinels name, checked with ROLE; resolved again when it fails or is demoted."""

    def __init__(self, target: RedisTarget, opts: _Options):
        self.target = target
        self.opts = opts
        sopts = _Options(target.sentinel_username, target.sentinel_password, opts.ssl, opts.server_name,
                         opts.connect_timeout, opts.timeout, 0.0)
        self.sentinels = [_Node(addr, sopts) for addr in target.nodes]
        self.master: _Node | None = None
        self._resolving: asyncio.Future | None = None
        self._down_until = 0.0
        self._check_at = 0.0

    async def call(self, args, asking=False):
        if self.master is not None and time.monotonic() >= self._check_at:
            self._check_at = time.monotonic() + CHECK_INTERVAL
            asyncio.ensure_future(self._check()).add_done_callback(_retrieved)
        for attempt in range(2):
            node = self.master or await self._master()
            try:
                return await node.call(args)
            except RedisError as exc:
                # Unreachable, broken, or demoted (READONLY): ask the sentinels again. Sent once more only when
                # Redis cannot have run it, and only to a master resolved anew.
                if isinstance(exc, RedisUnavailable) or _is(exc, "readonly", "loading", "masterdown"):
                    self._drop(node)
                    if attempt == 0 and (exc.unsent or _is(exc, "readonly", "loading")):
                        continue
                raise

    async def _check(self):
        """Is our master still the one the sentinels name? A master demoted while up (a forced failover, a
        partition) keeps its clients until the sentinels reconfigure it, seconds later; what they write
        meanwhile is lost at its demotion. Asking once a second bounds that window for this client."""
        node = self.master
        for sentinel in list(self.sentinels):     # _resolve may reorder them meanwhile
            try:
                addr = await sentinel.call(("SENTINEL", "get-master-addr-by-name", self.target.master))
            except RedisError:
                continue
            if addr and node is not None and _addr(*addr) != node.addr:
                self._drop(node)
            return

    def send_now(self, args):
        return self.master.send_now(args) if self.master is not None else None

    def _drop(self, node: _Node):
        if self.master is node:
            self.master = None
            node.close()

    async def _master(self) -> _Node:
        if time.monotonic() < self._down_until:
            raise RedisUnavailable("down", f"no master for {self.target.master!r} recently", unsent=True)
        if self._resolving is None:
            self._resolving = asyncio.ensure_future(self._resolve())
        return await asyncio.shield(self._resolving)

    async def _resolve(self) -> _Node:
        try:
            errors = []
            for i, sentinel in enumerate(list(self.sentinels)):
                try:
                    addr = await sentinel.call(("SENTINEL", "get-master-addr-by-name", self.target.master))
                except RedisError as exc:
                    errors.append(f"sentinel {sentinel.addr[0]}:{sentinel.addr[1]}: {exc}")
                    continue
                if not addr:
                    errors.append(f"sentinel {sentinel.addr[0]}:{sentinel.addr[1]} knows no {self.target.master!r}")
                    continue
                node = _Node(_addr(*addr), self.opts, self.target.db)
                try:
                    role = await node.call(("ROLE",))
                except RedisError as exc:
                    node.close()
                    errors.append(f"master {node.addr[0]}:{node.addr[1]}: {exc}")
                    continue
                if not role or role[0] != b"master":
                    node.close()
                    errors.append(f"{node.addr[0]}:{node.addr[1]} is not a master")
                    continue
                if i:                   # ask the sentinel that answered first next time
                    self.sentinels.remove(sentinel)
                    self.sentinels.insert(0, sentinel)
                self.master = node
                return node
            self._down_until = time.monotonic() + self.opts.retry_interval
            raise RedisUnavailable("connect", "; ".join(errors) or "no sentinel", unsent=True)
        finally:
            self._resolving = None

    def close(self):
        for n in self.sentinels:
            n.close()
        if self.master is not None:
            self.master.close()
            self.master = None


class _Cluster:
    """Commands to the master of their key's slot, by the slot map (CLUSTER SLOTS), following redirections."""

    def __init__(self, target: RedisTarget, opts: _Options):
        self.seeds = list(target.nodes)
        self.opts = opts
        self.nodes: dict[tuple[str, int], _Node] = {}
        self.slots: list | None = None      # slot -> master address
        self._refreshing: asyncio.Future | None = None
        self._refreshed_at = -1e9
        self._down_until = 0.0
        self.redirected = {"moved": 0, "ask": 0, "tryagain": 0, "clusterdown": 0, "down": 0}   # for tests, logs

    def _node(self, addr) -> _Node:
        n = self.nodes.get(addr)
        if n is None:
            n = self.nodes[addr] = _Node(addr, self.opts)
        return n

    async def call(self, args, asking=False):
        key = command_key(args)
        slot = key_slot(key) if key is not None else None
        if self.slots is None:
            await self.refresh()
        addr = self._owner(slot)
        asking = False
        redirects = 0
        while True:
            try:
                return await self._node(addr).call(args, asking)
            except RedisError as exc:
                redirects += 1
                if redirects > _MAX_REDIRECTS:
                    raise
                if isinstance(exc, RedisUnavailable):
                    self.redirected["down"] += 1
                    if not exc.unsent:
                        self._later_refresh()       # it may have run: fail it, but learn the new map
                        raise
                    await self.refresh()            # down: has a replica taken over its slots?
                    new = self._owner(slot)
                    if new == addr:
                        raise
                    addr, asking = new, False
                elif exc.kind in ("moved", "ask"):
                    self.redirected[exc.kind] += 1
                    # "MOVED 3999 127.0.0.1:6381": the slot is served there (for good, or for this command).
                    _, s, where = str(exc).split(" ", 2)
                    host, _, port = where.rpartition(":")
                    addr, asking = (host or addr[0], int(port)), exc.kind == "ask"
                    if exc.kind == "moved" and self.slots is not None:
                        self.slots[int(s)] = addr
                        self._later_refresh()
                elif exc.kind in ("tryagain", "clusterdown"):
                    self.redirected[exc.kind] += 1
                    # A multi-key command during a slot's migration, or a failover in progress: a moment later.
                    await asyncio.sleep(0.02 * redirects)
                    if exc.kind == "clusterdown":
                        await self.refresh()
                        addr = self._owner(slot)
                    asking = False
                else:
                    raise

    def send_now(self, args):
        if self.slots is None:
            return None
        key = command_key(args)
        node = self.nodes.get(self._owner(key_slot(key) if key is not None else None))
        return node.send_now(args) if node is not None else None

    def _owner(self, slot):
        if slot is None:
            for addr in self.slots or ():
                if addr is not None:
                    return addr
            return self.seeds[0]
        addr = self.slots[slot]
        if addr is None:
            raise RedisError(f"CLUSTERDOWN Hash slot {slot} not served")
        return addr

    def _later_refresh(self):
        if self._refreshing is None:
            asyncio.ensure_future(self.refresh()).add_done_callback(_retrieved)

    async def refresh(self):
        """Learn the slot map from the first node that answers (one refresh at a time; at most one per
        retry_interval / 10 unless the map is missing)."""
        if self._refreshing is None:
            if self.slots is not None and time.monotonic() - self._refreshed_at < self.opts.retry_interval / 10:
                return
            if self.slots is None and time.monotonic() < self._down_until:
                raise RedisUnavailable("down", "no cluster node answered recently", unsent=True)
            self._refreshing = asyncio.ensure_future(self._refresh())
        await asyncio.shield(self._refreshing)

    async def _refresh(self):
        try:
            errors = []
            known = list(dict.fromkeys([*self.nodes, *self.seeds]))
            # Nodes with an open connection first, those that failed to connect lately last: a dead node costs
            # the refresh nothing while another answers.
            known.sort(key=lambda a: 0 if a in self.nodes and self.nodes[a]._proto is not None else
                       2 if a in self.nodes and self.nodes[a]._down_until > time.monotonic() else 1)
            for addr in known:
                node = self._node(addr)
                try:
                    reply = await node.call(("CLUSTER", "SLOTS"))
                except RedisError as exc:
                    errors.append(f"{addr[0]}:{addr[1]}: {exc}")
                    continue
                slots = [None] * SLOTS
                for entry in reply:
                    start, end, master = int(entry[0]), int(entry[1]), entry[2]
                    host = master[0].decode() if master[0] not in (b"", b"?") else addr[0]
                    a = (host, int(master[1]))
                    slots[start:end + 1] = [a] * (end - start + 1)
                self.slots = slots
                self._refreshed_at = time.monotonic()
                live = set(slots)
                for a in list(self.nodes):      # a node no longer serving any slot: its connection goes
                    if a not in live and a not in self.seeds:
                        self.nodes.pop(a).close()
                return
            if self.slots is None:
                self._down_until = time.monotonic() + self.opts.retry_interval
            raise RedisUnavailable("connect", "no cluster node answered CLUSTER SLOTS: " + "; ".join(errors),
                                   unsent=True)
        finally:
            self._refreshing = None

    def close(self):
        for n in self.nodes.values():
            n.close()
        self.nodes.clear()


def _ssl_context(t: RedisTarget) -> ssl.SSLContext | None:
    if not t.tls:
        return None
    ctx = ssl.create_default_context(cafile=t.ca_file or None)
    if t.cert_file:
        ctx.load_cert_chain(t.cert_file, t.key_file)
    return ctx


class RedisClient:
    """RedisClient(url, connect_timeout=0.1, timeout=0.1, retry_interval=0.5), url in any form of the module doc.

    Use from one event loop (one client per worker). `await call(*args)` returns hiredis's decoded reply
    (bytes, int, list, None) or raises RedisError / RedisUnavailable. In a cluster every key of one call must
    be in one slot (share a hash tag); a call naming no key goes to any master.
    """

    def __init__(self, url: str, connect_timeout: float = 0.1, timeout: float = 0.1, retry_interval: float = 0.5):
        self.target = t = parse_url(url)
        try:
            ctx = _ssl_context(t)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"TLS files of {_redact(url)!r}: {exc}") from None
        self.opts = _Options(t.username, t.password, ctx, t.server_name, connect_timeout, timeout, retry_interval)
        self.mode = t.mode
        self._impl = {"single": _Single, "sentinel": _Sentinel, "cluster": _Cluster}[t.mode](t, self.opts)
        self._call = self._impl.call
        self.host, self.port = t.nodes[0]
        self.timeout = timeout

    async def call(self, *args):
        return await self._call(args)

    async def evalsha(self, script: Script, keys, args, retry_for: float = 0.0):
        """Run `script` by its SHA-1 (its source on NOSCRIPT). With `retry_for`, a call that could not be sent
        (Redis unreachable: a failover under way) is tried again until that many seconds have passed; one that
        may have run is never sent twice."""
        give_up = time.monotonic() + retry_for
        while True:
            try:
                try:
                    return await self._call(("EVALSHA", script.sha, len(keys), *keys, *args))
                except RedisError as exc:
                    if isinstance(exc, RedisUnavailable) or not str(exc).startswith("NOSCRIPT"):
                        raise
                    return await self._call(("EVAL", script.source, len(keys), *keys, *args))
            except RedisUnavailable as exc:
                if not exc.unsent or time.monotonic() >= give_up:
                    raise
                await asyncio.sleep(max(0.02, self.opts.retry_interval / 2))

    def submit(self, *args) -> asyncio.Future:
        """Run a command in the background: written to its connection before this returns when that connection
        is open (so it reaches Redis before anything this process writes afterwards), else once it is. The task's
        result is the reply; a redirection (MOVED, ASK, READONLY...) is followed as call() follows it."""
        try:
            sent = self._impl.send_now(args)
        except RedisError:
            sent = None
        return asyncio.ensure_future(self._submitted(sent, args))

    async def _submitted(self, sent, args):
        if sent is not None:
            try:
                return await asyncio.wait_for(sent, self.timeout)
            except asyncio.TimeoutError:
                raise RedisUnavailable("timeout", f"no reply in {self.timeout}s") from None
            except RedisError as exc:
                if isinstance(exc, RedisUnavailable) or exc.kind not in _NOT_RUN:
                    raise
        return await self._call(args)

    def redact(self, text: str) -> str:
        """`text` (an error message, for logs) without the passwords, should a server ever echo them."""
        for pw in (self.target.password, self.target.sentinel_password):
            if pw:
                text = text.replace(pw, "***")
        return text

    def close(self):
        self._impl.close()
