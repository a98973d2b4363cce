"""Load time: a config's retry policies, fallback chains and circuit breakers, put onto its routes.

`attach(router, cfg, run_dir, stats)` runs right after the Router is built (fastgw.proxy.gateway.build), in the
supervisor's preflight and in every worker. It gives each route its RetryPolicy (fastgw.routing.retry) with
the fallback models as Route objects, and each deployment of a model with a breaker its Breaker in the
gateway's shared table (fastgw.routing.breaker), keyed by the deployment's identity: a reload that keeps a
deployment keeps its breaker's state.
"""
from __future__ import annotations

from functools import partial
from urllib.parse import urlsplit

from fastgw.routing.breaker import table_for
from fastgw.routing.retry import RetryPolicy
from fastgw.runtime import config as C


def attach(router, cfg: C.Config, run_dir: str, stats=None) -> None:
    routes = {m.name: router.wildcard if m.name == "*" else router.routes[m.name] for m in cfg.models}
    models = {m.name: m for m in cfg.models}
    # A fallback model's deployments that forward the client's model name get the fallback's own name instead.
    for m in cfg.models:
        for name in set(m.fallbacks + m.context_window_fallbacks + m.content_policy_fallbacks):
            for d in routes[name].deployments:
                d.name_model(name)
    table = None
    for m in cfg.models:
        route = routes[m.name]
        r = m.retry
        policy = RetryPolicy(r.attempts, r.backoff_ms / 1000, r.max_backoff_ms / 1000, r.retry_after_cap_ms / 1000,
                             r.deadline_ms / 1000)
        policy.set_fallbacks([routes[n] for n in fallback_chain(m.name, models)],
                             [routes[n] for n in m.context_window_fallbacks],
                             [routes[n] for n in m.content_policy_fallbacks])
        route.retry = policy
        b = m.breaker if m.breaker is not None else (C.Breaker() if m.health_check is not None else None)
        if b is None:
            continue
        if table is None:
            table = table_for(run_dir)
        # Router made route.deployments in the config's order.
        for d, dc in zip(route.deployments, m.deployments):
            breaker = table.breaker(identity(d, dc), b.consecutive_failures, b.error_rate, b.min_requests,
                                    b.window_s, b.cooldown_s, b.half_open_probes)
            if stats is not None:
                breaker.on_open = partial(stats.breaker_opened, m.name, d.name)
            d.breaker = breaker


def fallback_chain(name: str, models: dict) -> list[str]:
    """The models tried, in order, once `name`'s attempts are used up: its `fallbacks`, each followed by its own
    (depth first), each model once. The config refuses cycles; `seen` keeps this finite regardless."""
    out, seen = [], {name}

    def walk(n):
        for f in models[n].fallbacks:
            if f not in seen:
                seen.add(f)
                out.append(f)
                walk(f)

    walk(name)
    return out


def identity(d, dc: C.DeploymentConfig) -> str:
    """What makes a deployment the same one across reloads: provider, address, path, model id, key variable."""
    return "|".join((dc.provider, d.name, "https" if d.tls else "http", urlsplit(dc.url).path.rstrip("/"),
                     d.model, dc.key_env))


def breaker_rows(router) -> list[tuple[str, str, int]]:
    """(model, upstream, state) of every deployment with a breaker (0 closed, 1 half-open, 2 open)."""
    rows = []
    for route in _routes(router):
        for d in route.deployments:
            if d.breaker is not None:
                rows.append((route.name, d.name, d.breaker.state()))
    return rows


def deployment_status(router) -> list[dict]:
    """Per deployment: model, upstream, provider model id, and its breaker's shared state (absent: none)."""
    out = []
    for route in _routes(router):
        for d in route.deployments:
            row = {"model": route.name, "upstream": d.name, "deployment_model": d.model}
            if d.breaker is not None:
                row["breaker"] = d.breaker.info()
            out.append(row)
    return out


def _routes(router):
    return list(router.routes.values()) + ([router.wildcard] if router.wildcard is not None else [])
