"""Identity: API keys of consumers, consumer groups, allowed models ("key-auth").

Keys live in the config only as SHA-256 hex digests. The presented key (Authorization: Bearer <key>, or the
`api-key` header) is hashed and the digest looked up in a dict. Why that is constant-time enough: the only
secret-dependent comparison is between digests, and what a timing side channel could leak is how many leading
bytes of the *digest of the attacker's own input* match a stored digest; turning that into a key needs SHA-256
preimages. The found digest is then confirmed with hmac.compare_digest anyway. No database, no I/O: auth cannot
fail because something else is slow or down. Keys never reach logs or metrics (only consumer names do).
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sys
from fnmatch import fnmatchcase

import msgspec

from fastgw.policies import FieldError, model_label
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


# The cache of good keys (KeyAuth._seen) holds at most this many header values, then starts again empty.
# Why it is safe: only values whose key passed the full check (SHA-256 digest found, confirmed with
# compare_digest) are ever stored, so wrong keys cannot fill it or evict anything, and a wrong key always
# takes the full path, exactly as before. A lookup compares the presented value with a stored one only when
# their 64-bit hashes are equal (Python's SipHash, seeded at random per process), so timing cannot be used to
# guess a stored key byte by byte. Entries hold the key's header value in memory, as the request itself did;
# they never reach logs or metrics, and a new configuration (a new KeyAuth) starts with an empty cache, so a
# revoked key stops working on reload.
_SEEN_MAX = 4096

_MISSING = ("You didn't provide an API key. You need to provide your API key in an Authorization header using "
            "Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the api-key header.")
_WRONG = "Incorrect API key provided."


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
        # Header values (b"Bearer sk-...", or the api-key header's) that passed the check -> the entry: the hot
        # path skips SHA-256 for keys already seen. See _SEEN_MAX for why this is safe.
        self._seen: dict[bytes, tuple] = {}
        self._seen_api_key: dict[bytes, tuple] = {}
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
        entry = self._seen.get(v) if v is not None else self._seen_api_key.get(ex.header(b"api-key"))
        if entry is None:
            entry = self._check(ex, v)
        ex.consumer = entry[0]
        ex.group = entry[1]

    def _check(self, ex, v):
        """The full check: parse, hash, look up, confirm; remembers the header value when the key is good."""
        key = None
        seen = self._seen
        if v is not None:
            scheme, _, rest = v.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                key = rest.strip()
        if not key:
            v = ex.header(b"api-key")
            seen = self._seen_api_key
            key = v.strip() if v is not None else None
        if not key:
            self._refuse(_MISSING)
        digest = hashlib.sha256(key).hexdigest()
        entry = self._by_hash.get(digest)
        if entry is None:
            self._refuse(_WRONG)
        # The dict found it by digest already; confirm in constant time (defence in depth).
        if not hmac.compare_digest(entry[2], digest):
            self._refuse(_WRONG)
        if len(seen) >= _SEEN_MAX:
            seen.clear()
        seen[v] = entry
        return entry

    def _refuse(self, message: str):
        self.ctx.stats.rejected("", "", "auth")
        raise Reject(401, message, type="invalid_request_error", code="invalid_api_key")

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

    def _model_allowed(self, k: tuple[str, str], rules: tuple) -> bool:
        """Whether model k[1] is allowed by every pattern list of `rules` (consumer's, group's); cached."""
        ok = all(not pats or any(fnmatchcase(k[1], p) for p in pats) for pats in rules)
        if len(self._allowed) > 8192:
            self._allowed.clear()
        self._allowed[k] = ok
        return ok

    def _refuse_model(self, ex):
        self.ctx.stats.rejected(ex.consumer, model_label(self.ctx, ex.model), "model_not_allowed")
        raise Reject(403, f"The model `{ex.model}` is not allowed for this API key.",
                     type="invalid_request_error", param="model", code="model_not_allowed")
