"""What GET /v1/models and GET /v1/models/{id} answer: the virtual model names of the config, then the models the
upstreams of the wildcard route list, merged in that order (the first entry of an id wins), each an OpenAI model
object. One catalog per worker and config (the Gateway makes it in `apply`).

The upstreams' lists are fetched in the background on the worker's loop (upstream_models.fetch_models) and reused
for `models_cache_s`; a listing that finds them stale starts a refresh and answers at once from the previous
lists. Only before the first refresh is over does a listing wait for it, and never past FIRST_WAIT from the
refresh's start: it then answers with the lists that are in. An upstream that fails or times out contributes
nothing until the next refresh and is logged once per failure streak.

Which wildcard deployments are asked: those that forward the client's model name (no `model` of their own: then
every name the upstream lists is one a client can send) of a provider that can list its models
(Provider.models_target). What a caller sees is filtered by the policies' `model_visible` hooks (key-auth: the
consumer's allowed models).
"""
from __future__ import annotations

import asyncio
from urllib.parse import unquote

import orjson

from fastgw.errors import model_not_found
from fastgw.providers.wire.models import model_object
from fastgw.routing.upstream_models import fetch_models

FIRST_WAIT = 2.0           # seconds the first listings may wait for the upstreams' lists
FETCH_TIMEOUT = 10.0       # seconds for one upstream's whole list; then it contributes nothing this time
CREATED = 1700000000       # `created` of the virtual names: the gateway's own, a fixed value keeps answers stable
LIST = "/v1/models"


class ModelCatalog:
    def __init__(self, loop, router, cache_s: float, log, visible: tuple = ()):
        self.loop = loop
        self.cache_s = cache_s
        self.log = log
        self.visible = visible             # the policies' model_visible(ex, model) hooks
        self.own = [model_object(name, CREATED, "fastgw") for name in router.routes]
        w = router.wildcard
        self.sources = [d for d in (w.deployments if w is not None else ())
                        if not d.model and d.provider.models_target(d.base_path, "", 1) is not None]
        self.found = {}                    # deployment -> its models at the last refresh ([] when it failed)
        self.failing = set()               # deployments whose last fetch failed (logged when the streak began)
        self.refreshed = False             # a refresh is over: answers never wait again
        self.first_deadline = 0.0          # loop time after which the first listings stop waiting
        self.fresh_until = 0.0             # loop time at which the lists go stale
        self.task = None                   # the refresh running, or None
        self.waiters = []                  # (callback, args) of listings waiting for the first refresh
        self.timer = None
        self._by_id = None                 # id -> model object, merged; None when the lists changed
        self._body = b""

    # -- answers ---------------------------------------------------------------------------------------------

    def ready(self) -> bool:
        """True when a listing can be answered now. Starts a refresh when the lists are stale."""
        if not self.sources:
            return True
        now = self.loop.time()
        if self.task is None and now >= self.fresh_until:
            if not self.first_deadline:
                self.first_deadline = now + FIRST_WAIT
            self.task = self.loop.create_task(self._refresh())
        return self.refreshed or now >= self.first_deadline

    def when_ready(self, callback, *args) -> None:
        """Call callback(*args) when the first refresh is over or FIRST_WAIT after it began, whichever is first
        (only when ready() said False)."""
        self.waiters.append((callback, args))
        if self.timer is None:
            self.timer = self.loop.call_at(self.first_deadline, self._wake)

    def answer(self, ex, path: str) -> bytes:
        """The JSON body of GET /v1/models (`path` == LIST) or /v1/models/{id} for the caller of `ex`; raises
        GatewayError 404 model_not_found for an id it cannot see."""
        by_id = self._merged()
        if path == LIST:
            if not self.visible:
                return self._body
            return orjson.dumps({"object": "list", "data": [m for m in by_id.values() if self._sees(ex, m["id"])]})
        model = unquote(path[len(LIST) + 1:])          # the SDKs percent-encode the id (it may hold a "/")
        m = by_id.get(model)
        if m is None or not self._sees(ex, model):
            raise model_not_found(model)
        return orjson.dumps(m)

    def _sees(self, ex, model: str) -> bool:
        return all(hook(ex, model) for hook in self.visible)

    def _merged(self) -> dict:
        by_id = self._by_id
        if by_id is None:
            by_id = {}
            for m in self.own:
                by_id.setdefault(m["id"], m)
            for d in self.sources:
                for m in self.found.get(d, ()):
                    by_id.setdefault(m["id"], m)
            self._by_id = by_id
            self._body = orjson.dumps({"object": "list", "data": list(by_id.values())})
        return by_id

    # -- refreshing -----------------------------------------------------------------------------------------

    async def _refresh(self) -> None:
        try:
            await asyncio.gather(*[self._fetch(d) for d in self.sources])
        finally:
            self.task = None
            self.refreshed = True
            self.fresh_until = self.loop.time() + self.cache_s
            self._wake()

    async def _fetch(self, d) -> None:
        try:
            models = await asyncio.wait_for(fetch_models(d), FETCH_TIMEOUT)
        except Exception as exc:          # the upstream's trouble (refused, timed out, 401, malformed, TLS)
            models = []
            if d not in self.failing:
                self.failing.add(d)
                self.log.warning("upstream model list unavailable", upstream=d.name,
                                 error=str(exc) or type(exc).__name__)
        else:
            if d in self.failing:
                self.failing.discard(d)
                self.log.info("upstream model list available again", upstream=d.name)
        self.found[d] = models
        self._by_id = None

    def _wake(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        waiters, self.waiters = self.waiters, []
        for callback, args in waiters:
            try:
                callback(*args)
            except Exception:             # one listing's bug must not leave the others waiting
                self.log.exception("model listing failed")

    def close(self) -> None:
        """The config is replaced or the worker stops: stop refreshing; waiting listings answer now."""
        if self.task is not None:
            self.task.cancel()
        self._wake()
