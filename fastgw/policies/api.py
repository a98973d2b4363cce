"""The policy API: how plain-Python policies hook into a request's life.

A policy is a class with a name, a priority and a msgspec `Config`, and only the hooks it needs. At load time the
pipeline (fastgw/pipeline.py) keeps, per phase, a tuple of the hooks that policies really override, so a phase no
policy uses costs nothing per request.

Phases, in order (`ex` is the request's `fastgw.proxy.exchange.Exchange`):

    access(ex)                 head received, body not read yet: identify the caller, refuse early.
                               ex.header(b"authorization"), ex.path, ex.client_addr are available.
    request(ex)                whole body read: ex.model, ex.stream, ex.body, ex.fields, ex.prompt_tokens_estimate.
                               Admit (return None), refuse (raise Reject), rewrite (assign ex.body), or return an
                               awaitable when the decision needs I/O (e.g. Redis); the pipeline awaits it.
    response_headers(ex)       the upstream answered: append extra header lines (bytes, b"name: value\r\n") to
                               ex.response_headers, e.g. x-ratelimit-remaining-tokens.
    stream_event(ex, event)    each complete SSE event of a stream (bytes). Costly: only policies that define it
                               make the relay split events for them.
    complete(ex)               the response is over (or failed): ex.status, ex.prompt_tokens, ex.completion_tokens
                               (the upstream's usage, or the exact count of what streamed). Settle reservations,
                               charge budgets, set ex.cost. May return an awaitable (run in the background).
    log(ex, record)            add fields to the access-log record (a dict). Never put keys or secrets there.

`complete` and `log` always run, even when an earlier phase refused the request or the upstream failed.
A Realtime session (GET /v1/realtime) is a run of responses: `request` runs at the upgrade and again after each
response, `complete` after each response with that response's usage (and once more at the end, with what came
since), so limits and budgets are charged as the session goes; a refusal of the next response closes the session.

Besides the phases, one question the gateway asks policies:

    model_visible(ex, model)   GET /v1/models and /v1/models/{id}: whether the caller (after the access phase:
                               ex.consumer, ex.group) may see `model` in the list. A model some policy hides is
                               left out of the list, and retrieving it is a 404. Default: visible.

Example (a policy that refuses requests without a `user` field):

    class RequireUser(Policy):
        name = "require-user"
        priority = 500

        class Config(msgspec.Struct, forbid_unknown_fields=True):
            message: str = "the 'user' field is required"

        def request(self, ex):
            if ex.fields.user is None:
                raise Reject(400, self.config.message, param="user", code="missing_user")

Policies are configured by files in `policies/` (see policies/README.md and fastgw/policies/).

The pipeline takes each hook from the policy instance, so `__init__` may replace an overridden hook with a
faster callable of the same meaning: the built-in key-auth and rate-limit (local backend) install compiled
copies of their per-request hooks this way (fastgw/policies/*.pyx) and keep their Python methods as the
reference the tests compare them with.
"""
from __future__ import annotations

from typing import Any, Awaitable, ClassVar

import msgspec

from fastgw.errors import GatewayError as Reject  # noqa: F401  (re-exported: policies raise Reject)
from fastgw.errors import Reply  # noqa: F401  (re-exported: policies raise Reply to answer a request)

PHASES = ("access", "request", "response_headers", "stream_event", "complete", "log")


class PolicyContext:
    """What the gateway lends to policies at load time (one per worker)."""

    __slots__ = ("log", "stats", "run_dir", "worker_id", "config")

    def __init__(self, log: Any, stats: Any, run_dir: str, worker_id: str, config: Any):
        self.log = log            # fastgw.observability.logs.Logger
        self.stats = stats        # fastgw.observability.metrics.Stats
        self.run_dir = run_dir    # a directory shared by all workers of this gateway (shared memory lives here)
        self.worker_id = worker_id
        self.config = config      # the whole fastgw.runtime.config.Config


class Policy:
    """Base class. Subclasses set `name`, `Config`, maybe `priority`, and override the hooks they need."""

    name: ClassVar[str] = ""
    priority: ClassVar[int] = 1000        # lower runs first in every phase
    Config: ClassVar[type[msgspec.Struct]] = msgspec.Struct
    # True when the policy needs the real token usage of streams: the gateway then asks the upstream for
    # stream_options.include_usage (and hides that extra chunk from clients that did not ask for it).
    needs_usage: ClassVar[bool] = False

    def __init__(self, config: msgspec.Struct, ctx: PolicyContext):
        self.config = config
        self.ctx = ctx

    def close(self) -> None:
        """Release resources when the config is reloaded or the worker stops."""

    # Hooks: not overriding one means it is never called.
    def access(self, ex) -> None: ...
    def request(self, ex) -> Awaitable[None] | None: ...
    def response_headers(self, ex) -> None: ...
    def stream_event(self, ex, event: bytes) -> None: ...
    def complete(self, ex) -> Awaitable[None] | None: ...
    def log(self, ex, record: dict) -> None: ...

    def model_visible(self, ex, model: str) -> bool:
        return True


def overridden_hooks(policy: Policy) -> list[str]:
    """The phases a policy instance really implements."""
    cls = type(policy)
    return [ph for ph in PHASES if getattr(cls, ph) is not getattr(Policy, ph)]
