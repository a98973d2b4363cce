"""Identity: API keys of consumers, consumer groups, allowed models ("key-auth").

Keys live in the config only as SHA-256 hex digests. The presented key (Authorization: Bearer <key>, else the
`api-key` header, else `x-api-key` as Anthropic's clients send it) is hashed and the digest looked up in a dict
of the configured digests; that lookup is the whole check. Why no constant-time compare is needed: the only comparisons that depend on a secret are the
dict's, between the digest of the caller's own input and a stored digest. The most a timing side channel can
leak is how much of a stored *digest* some input's digest matches, and a digest, even whole, does not give a
key: finding a key for it is a SHA-256 preimage. (A compare_digest of the found entry with the digest that found
it, as there was, compared a value with itself and could not fail.) No database, no I/O: auth cannot fail
because something else is slow or down. Keys never reach logs or metrics (only consumer names do), and the
cache of good keys holds none either (see _SEEN_MAX).
"""
from __future__ import annotations

import hashlib
import re
import secrets
import sys
from fnmatch import fnmatchcase

import msgspec

from fastgw.policies import FieldError
from fastgw.policies.auth.lookup import KeyLookup
from fastgw.policies.api import Policy, Reject

__all__ = ["KeyAuth", "hash_key", "new_key", "hash_key_main"]

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def hash_key(key: str) -> str:
    """The value to put in a policy file for `key`: its SHA-256 hex digest (what `fastgw hash-key` prints)."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(prefix: str = "sk-fgw-") -> str:
    """A fresh random API key (256 bits)."""
    return prefix + secrets.token_urlsafe(32)


def hash_key_main(argv: list[str] | None = None) -> int:
    """`fastgw hash-key [KEY]`: print the digest of KEY (or of each line of stdin, or of a new key with --new)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--new":
        key = new_key()
        print(f"key:  {key}\nhash: {hash_key(key)}")
        return 0
    keys = argv or [line.strip() for line in sys.stdin if line.strip()]
    for k in keys:
        print(hash_key(k))
    return 0


class Consumer(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    keys: list[str]                 # SHA-256 hex digests of the consumer's keys ("sha256:" prefix allowed)
    group: str = ""
    models: list[str] = []          # allowed models (glob patterns); empty = whatever the group allows


class Group(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    models: list[str] = []          # allowed models (glob patterns); empty = any


class Config(msgspec.Struct, forbid_unknown_fields=True):
    consumers: list[Consumer] = []
    groups: list[Group] = []


# The cache of good keys (KeyAuth._seen, ._seen_api_key) maps hash(header value) -> (consumer, group, digest):
# a key seen before costs one SipHash of the header (what a dict keyed by the value itself computed anyway) and
# no SHA-256. It never holds a key: not the value (a dict keyed by it would keep the bytes alive), only its
# 64-bit hash, Python's SipHash with a per-process random key, and the configured digest. Why a hash match is
# enough: only values that passed the full check are stored, so a wrong key is accepted only if its hash equals
# that of a cached good key it does not know: a blind online guess at 64 bits, at most _SEEN_MAX / 2**64 per
# request (blind even with a fixed PYTHONHASHSEED: the good value is what the guesser lacks), while every other
# wrong key takes the full path. At most _SEEN_MAX entries, then it starts again
# empty (only holders of good keys can fill it, by varying their header's spelling); a new configuration (a
# new KeyAuth) starts empty, so a revoked key stops working on reload.
_SEEN_MAX = 4096

_MISSING = ("You didn't provide an API key. You need to provide your API key in an Authorization header using "
            "Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the api-key or x-api-key header (a WebSocket: "
            "or as the subprotocol openai-insecure-api-key.YOUR_KEY).")
_WRONG = "Incorrect API key provided."


def _key_header(ex):
    """The key of the api-key header (Azure OpenAI's clients), else of x-api-key (Anthropic's clients)."""
    k = ex.header(b"api-key")
    return k if k is not None else ex.header(b"x-api-key")


def _subprotocol_key(ex):
    """A browser's WebSocket cannot set headers: OpenAI's Realtime clients send the key as the subprotocol
    `openai-insecure-api-key.<key>` (Sec-WebSocket-Protocol); the gateway never forwards it upstream."""
    v = ex.header(b"sec-websocket-protocol")
    if v is None:
        return None
    for p in v.split(b","):
        p = p.strip()
        if p.startswith(b"openai-insecure-api-key."):
            return p[24:] or None
    return None


class KeyAuth(Policy):
    name = "key-auth"
    priority = 100
    Config = Config

    def __init__(self, config: Config, ctx):
        super().__init__(config, ctx)
        groups = {}
        for i, g in enumerate(config.groups):
            if g.name in groups:
                raise FieldError(f"groups[{i}].name", f"duplicate group {g.name!r}")
            groups[g.name] = tuple(g.models)
        self._by_hash: dict[str, tuple] = {}   # digest -> (consumer, group, digest)
        names = set()
        for i, c in enumerate(config.consumers):
            if c.name in names:
                raise FieldError(f"consumers[{i}].name", f"duplicate consumer {c.name!r}")
            names.add(c.name)
            if c.group and c.group not in groups:
                groups[c.group] = ()   # a group named only by its members: no model restriction of its own
            if not c.keys:
                raise FieldError(f"consumers[{i}].keys", "at least one key hash is needed")
            for j, h in enumerate(c.keys):
                d = h.lower().removeprefix("sha256:")
                if not _HEX64.match(d):
                    raise FieldError(f"consumers[{i}].keys[{j}]", "expected a SHA-256 hex digest (64 hex digits; "
                                     "`fastgw hash-key KEY` prints it), not a key")
                if d in self._by_hash:
                    raise FieldError(f"consumers[{i}].keys[{j}]", "this key hash already belongs to another consumer")
                self._by_hash[d] = (c.name, c.group, d)
        # hash() of header values (b"Bearer sk-...", or the api-key header's) that passed the check -> the
        # entry: the hot path skips SHA-256 for keys already seen. See _SEEN_MAX for what it holds and why.
        self._seen: dict[int, tuple] = {}
        self._seen_api_key: dict[int, tuple] = {}
        # Consumer name -> (its allowed models, its group's), for the consumers restricted by either.
        self._restricted = {c.name: (tuple(c.models), groups.get(c.group, ())) for c in config.consumers
                            if c.models or groups.get(c.group)}
        # (consumer, model) -> allowed; bounded because model names come from clients.
        self._allowed: dict[tuple[str, str], bool] = {}
        # Every request runs the compiled copy of access() and request() below (auth_lookup.pyx: the same
        # lookups, one C call each instead of a Python frame); the Python methods stay its reference. Not
        # when a subclass overrides either: its own code must run.
        if type(self).access is KeyAuth.access and type(self).request is KeyAuth.request:
            fast = KeyLookup(self)
            self.access = fast.access
            self.request = fast.request

    def access(self, ex) -> None:
        v = ex.header(b"authorization")
        if v is not None:
            entry = self._seen.get(hash(v))
        else:
            k = _key_header(ex)
            entry = self._seen_api_key.get(hash(k)) if k is not None else None
        if entry is None:
            entry = self._check(ex, v)
        ex.consumer = entry[0]
        ex.group = entry[1]

    def _check(self, ex, v):
        """The full check: parse, hash, look up; remembers the header value's hash when the key is good."""
        key = None
        seen = self._seen
        if v is not None:
            scheme, _, rest = v.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                key = rest.strip()
        if not key:
            v = _key_header(ex)
            seen = self._seen_api_key
            key = v.strip() if v is not None else None
        if not key:
            key = _subprotocol_key(ex)
            if key:
                seen = None              # not cached: a WebSocket session checks its key once
        if not key:
            self._refuse(_MISSING)
        entry = self._by_hash.get(hashlib.sha256(key).hexdigest())
        if entry is None:
            self._refuse(_WRONG)
        if seen is not None:
            if len(seen) >= _SEEN_MAX:
                seen.clear()
            seen[hash(v)] = entry
        return entry

    def _refuse(self, message: str):
        raise Reject(401, message, type="invalid_request_error", code="invalid_api_key", reason="auth")

    def request(self, ex) -> None:
        # ex.consumer is the name access() set (names are unique), or another identity policy's: only the
        # consumers configured here with a model restriction are checked.
        rules = self._restricted.get(ex.consumer)
        if rules is None:
            return
        k = (ex.consumer, ex.model)
        ok = self._allowed.get(k)
        if ok is None:
            ok = self._model_allowed(k, rules)
        if not ok:
            self._refuse_model(ex)

    def model_visible(self, ex, model: str) -> bool:
        """GET /v1/models lists a restricted consumer only the models it may use."""
        rules = self._restricted.get(ex.consumer)
        if rules is None:
            return True
        k = (ex.consumer, model)
        ok = self._allowed.get(k)
        return ok if ok is not None else self._model_allowed(k, rules)

    def _model_allowed(self, k: tuple[str, str], rules: tuple) -> bool:
        """Whether model k[1] is allowed by every pattern list of `rules` (consumer's, group's); cached."""
        ok = all(not pats or any(fnmatchcase(k[1], p) for p in pats) for pats in rules)
        if len(self._allowed) > 8192:
            self._allowed.clear()
        self._allowed[k] = ok
        return ok

    def _refuse_model(self, ex):
        raise Reject(403, f"The model `{ex.model}` is not allowed for this API key.",
                     type="invalid_request_error", param="model", code="model_not_allowed")
