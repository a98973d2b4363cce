"""Builds, once per config load, one tuple of hooks per phase; the connection code runs them.

Only hooks that a policy really overrides are kept, so an unused phase costs one empty-tuple loop per request.
"""
from __future__ import annotations

from fastgw.policies.api import PHASES, Policy, PolicyContext, overridden_hooks


class Pipeline:
    __slots__ = ("policies", "needs_usage", "model_visible") + PHASES

    def __init__(self, policies: list[Policy]):
        self.policies = sorted(policies, key=lambda p: p.priority)
        for phase in PHASES:
            setattr(self, phase, tuple(getattr(p, phase) for p in self.policies if phase in overridden_hooks(p)))
        # Streams are asked for include_usage only when some policy accounts tokens.
        self.needs_usage = any(p.needs_usage for p in self.policies)
        # GET /v1/models asks these whether a caller sees a model (Policy.model_visible).
        self.model_visible = tuple(p.model_visible for p in self.policies
                                   if type(p).model_visible is not Policy.model_visible)

    def close(self) -> None:
        for p in self.policies:
            p.close()


def load_pipeline(cfg, ctx: PolicyContext) -> Pipeline:
    """The policies configured in cfg.policies_dir (none when it is empty)."""
    if not cfg.policies_dir:
        return Pipeline([])
    from fastgw.policies import load_policies

    return Pipeline(load_policies(cfg.policies_dir, ctx))
