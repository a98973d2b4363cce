"""Built-in policies, their registry and the loader of policy files.

A policy file is one TOML file in the `policies_dir` folder declaring one policy instance:

    policy = "rate-limit"          # a built-in name, or "package.module:ClassName" for a custom policy
    backend = "local"              # ... the fields of that policy's Config, at the top level or under [config]

Files are read in name order (so "10-auth.toml" comes before "20-limits.toml"); the returned policies are then
ordered by `priority` (stable, so equal priorities keep file order). Every error names the file, the field and
the problem, e.g. "policies/20-limits.toml: rules[0].window: Expected `str`, got `int`".
"""
from __future__ import annotations

import glob
import importlib
import os
import re
import tomllib

import msgspec

from fastgw.runtime.config import ConfigError
from fastgw.policies.api import Policy, PolicyContext

__all__ = ["BUILTINS", "load_policies", "load_policy_file", "resolve", "FieldError", "model_label",
           "completion_estimate"]

# Built-in policies by name -> "module:Class" (imported on first use, so an unused policy costs nothing).
BUILTINS = {
    "key-auth": "fastgw.policies.auth.policy:KeyAuth",
    "rate-limit": "fastgw.policies.ratelimit.policy:RateLimit",
    "budget": "fastgw.policies.budget.policy:Budget",
}


class FieldError(ValueError):
    """Raised by a policy's constructor for a rule msgspec's types cannot say; the loader adds the file."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def resolve(name: str) -> type[Policy]:
    """The policy class for a built-in name or a "package.module:ClassName" reference."""
    target = BUILTINS.get(name, name)
    if ":" not in target:
        raise LookupError(f"unknown policy {name!r} (built-ins: {', '.join(sorted(BUILTINS))}; "
                          f"custom policies are named 'package.module:ClassName')")
    mod_name, _, cls_name = target.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise LookupError(f"cannot import {mod_name!r}: {exc}") from None
    cls = getattr(mod, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise LookupError(f"{target!r} is not a fastgw.policies.api.Policy subclass")
    return cls


_AT = re.compile(r"^(.*?)\s+-\s+at\s+`\$(.*)`$", re.S)


def _field_path(msg: str) -> tuple[str, str]:
    """Split msgspec's "Expected `int`, got `str` - at `$.rules[0].requests`" into (field, problem)."""
    m = _AT.match(msg)
    if not m:
        return "", msg
    return m.group(2).lstrip("."), m.group(1)


def load_policy_file(path: str, ctx: PolicyContext) -> Policy:
    """Load one policy file; raises ConfigError naming the file, the field and the problem."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    name = raw.pop("policy", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{path}: policy: missing; name the policy, e.g. policy = \"rate-limit\"")
    try:
        cls = resolve(name)
    except LookupError as exc:
        raise ConfigError(f"{path}: policy: {exc}") from None
    fields = cls.Config.__struct_fields__ if hasattr(cls.Config, "__struct_fields__") else ()
    if isinstance(raw.get("config"), dict) and "config" not in fields:
        nested = raw.pop("config")
        for k in nested:
            if k in raw:
                raise ConfigError(f"{path}: {k}: given both at the top level and under [config]")
        raw.update(nested)
    try:
        cfg = msgspec.convert(raw, cls.Config)
    except msgspec.ValidationError as exc:
        field, problem = _field_path(str(exc))
        raise ConfigError(f"{path}: {field or '(top level)'}: {problem}") from None
    # Policies with counters name them after the file unless the file says otherwise ("id"), so two files of
    # the same policy never share buckets and every instance of a fleet agrees on the names.
    if "id" in fields and not getattr(cfg, "id"):
        cfg.id = os.path.splitext(os.path.basename(path))[0]
    try:
        policy = cls(cfg, ctx)
    except FieldError as exc:
        raise ConfigError(f"{path}: {exc.field}: {exc.problem}") from None
    policy.source = path
    return policy


def load_policies(directory: str, ctx: PolicyContext) -> list[Policy]:
    """Every *.toml policy file of `directory`, in name order, then sorted by priority (stable)."""
    if not os.path.isdir(directory):
        raise ConfigError(f"{directory}: policies_dir is not a directory")
    loaded = []
    try:
        for path in sorted(glob.glob(os.path.join(directory, "*.toml"))):
            loaded.append(load_policy_file(path, ctx))
    except BaseException:
        for p in loaded:
            p.close()
        raise
    loaded.sort(key=lambda p: p.priority)
    return loaded


def completion_estimate(ex, default: int) -> int:
    """Completion tokens to plan for before the response: max_tokens (else `default`) per choice (n); none for
    embeddings. What rate-limit reserves and budget prices, beside the prompt estimate."""
    if ex.endpoint.endswith("/embeddings"):
        return 0
    f = ex.fields
    mt = f.max_tokens if f is not None else -1
    n = f.n if f is not None else -1
    return (mt if mt >= 0 else default) * (n if n > 1 else 1)


def model_label(ctx: PolicyContext, model: str) -> str:
    """A bounded metrics label for a client-chosen model name: a name from the config or the price table,
    else "other" (a client must not be able to mint label values)."""
    names = _config_models(ctx)
    if model in names:
        return model
    from fastgw.policies.budget.prices import KNOWN_MODELS
    return model if model in KNOWN_MODELS else "other"


def _config_models(ctx: PolicyContext) -> frozenset:
    # Only on refusals (not per admitted request), so no cache.
    models = getattr(ctx.config, "models", None) or ()
    return frozenset(m.name for m in models if m.name != "*")
