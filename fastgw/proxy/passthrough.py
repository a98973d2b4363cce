"""Every other /v1 endpoint (files, uploads, batches, images, audio, moderations, vector stores, fine-tuning...),
passed through to an OpenAI-format deployment: where each request goes, and what its answer tells us.

Where a request goes, first match:
  1. a resource it names (a path segment or a body field such as input_file_id): the deployment that made it,
     and only for the consumer that made it (another consumer gets 404, as if it did not exist);
  2. its model (the JSON body's `model`, or a multipart body's `model` field): that model's route;
  3. the longest [[passthrough.routes]] path prefix that matches: its model's route;
  4. [passthrough] model, else the "*" model, else the first model.
What an answer tells us (a 2xx JSON one): the resources it made (its `id`, a batch's output files...) are
recorded for this consumer and deployment; a list (`"object": "list"`) asked for by a consumer is filtered to
the resources that consumer owns. A DELETE that succeeded forgets the id.

With `resources_redis` the map is shared by several gateway instances (routing/shared_resources.py): an id the
local table does not know makes route() return a coroutine (the relay awaits it, then admits) that looks it up in
Redis first.

Plain Python: once per pass-through request (chat and the other compiled paths never come here).
"""
from __future__ import annotations

import orjson

from fastgw.errors import GatewayError, model_not_found
from fastgw.protocol.jsonpeek import peek_request
from fastgw.routing.resources import ID_FIELDS, PRODUCED_FIELDS, PRODUCERS, is_resource_id, map_for, owner_key

# Methods a pass-through endpoint may be asked with (OpenAI's API uses GET, POST and DELETE).
METHODS = frozenset((b"GET", b"POST", b"DELETE", b"PUT", b"PATCH"))


def not_found(resource_id: str) -> GatewayError:
    return GatewayError(404, f"No such resource: '{resource_id}'.", type="invalid_request_error",
                        code="resource_not_found")


class Passthrough:
    """The pass-through settings of one config, with the routes they name (built with the Router)."""

    def __init__(self, cfg, router, run_dir: str, log=None, stats=None):
        pt = cfg.passthrough
        self.enabled = pt.enabled and bool(cfg.models)
        self.max_upload = pt.max_upload_bytes
        self.deny_unknown = pt.unknown_resources == "deny"
        self.router = router
        routes = list(router.routes.values()) + ([router.wildcard] if router.wildcard is not None else [])
        first = router.routes[cfg.models[0].name] if cfg.models and cfg.models[0].name != "*" else router.wildcard
        self.default = router.resolve(pt.model) if pt.model else (router.wildcard or first)
        self.rules = sorted(((r.path, router.resolve(r.model) if r.model else self.default,
                              r.max_body_bytes or pt.max_upload_bytes) for r in pt.routes),
                            key=lambda rule: -len(rule[0]))
        # Deployment seed -> (route, deployment): where a recorded resource's requests go.
        self.by_seed = {}
        for route in routes:
            for d in route.deployments:
                self.by_seed.setdefault(d.seed, (route, d))
        self.resources = map_for(run_dir, pt.resource_slots) if self.enabled else None
        self.shared = None
        if self.enabled and pt.resources_redis:
            from fastgw.routing.shared_resources import SharedResources
            self.shared = SharedResources(pt.resources_redis, pt.resources_ttl_days * 86400, log=log, stats=stats)

    def close(self) -> None:
        if self.shared is not None:
            self.shared.close()

    # -- the request --------------------------------------------------------------------------------------------

    def max_body(self, path: str) -> int:
        """The largest request body accepted on `path`."""
        for prefix, _, limit in self.rules:
            if path.startswith(prefix):
                return limit
        return self.max_upload

    def route(self, ex, model, body_obj, looked_up: bool = False):
        """(route, pinned deployment or None) for a pass-through request; sets ex.model. Raises GatewayError.
        With a shared map, a coroutine giving that instead when an id must be looked up in Redis first."""
        owner = owner_key(ex.consumer)
        pinned = None
        if self.shared is not None and not looked_up:
            self.shared.warm()
            named = list(_named_ids(ex.path, body_obj))
            missing = [rid for rid in named if self.resources.lookup(rid) is None]
            if missing or (not named and self.filters(ex)):    # a list to filter: the consumer's own first
                return self._route_after_lookup(ex, model, body_obj, missing, owner)
        for rid in _named_ids(ex.path, body_obj):
            found = self.resources.lookup(rid)
            if found is None:
                if self.deny_unknown and ex.consumer:
                    raise not_found(rid)
                continue
            rid_owner, seed = found
            if rid_owner != owner:
                raise not_found(rid)
            if pinned is None:
                pinned = self.by_seed.get(seed)
        if pinned is not None:
            route, d = pinned
            ex.model = model or ""
            return route, d
        if model:
            route = self.router.resolve(model)
            if route is None:
                raise model_not_found(model)
            ex.model = model
            return route, None
        route = self.default
        for prefix, rule_route, _ in self.rules:
            if ex.path.startswith(prefix):
                route = rule_route
                break
        if route is None:
            raise GatewayError(404, f"No deployment serves {ex.path}.", code="unknown_url")
        return route, None

    async def _route_after_lookup(self, ex, model, body_obj, missing, owner):
        from fastgw.policies.redis_client import RedisError
        try:
            if missing:
                await self.shared.fetch(list(dict.fromkeys(missing)), self.resources)
            else:
                await self.shared.fetch_owned(owner, self.resources)
        except RedisError as exc:
            if self.shared.stats is not None:
                self.shared.stats.upstream_error("redis", exc.kind)
            if not missing:                     # a list: filtered with what this instance knows
                return self.route(ex, model, body_obj, True)
            raise GatewayError(503, "The gateway's resource map is unavailable; please retry shortly.",
                               type="api_error", code="resource_map_unavailable",
                               headers=(("retry-after", "1"),)) from None
        return self.route(ex, model, body_obj, True)

    def route_json(self, ex):
        """route() for a request whose body is JSON (or empty): its fields are read here."""
        body = ex.body
        if not body:
            return self.route(ex, None, None)
        f = peek_request(body)
        if f is None:
            raise GatewayError(400, "We could not parse the JSON body of your request. The body must be a JSON "
                                    "object.", code="invalid_json")
        ex.fields = f
        ex.stream = f.stream
        obj = orjson.loads(body) if _names_fields(body) else None
        return self.route(ex, f.model if isinstance(f.model, str) and f.model else None, obj)

    # -- the answer ---------------------------------------------------------------------------------------------

    def answered(self, ex, body: bytes, deployment, whole: bool):
        """A 2xx JSON answer: record what it made, forget what it deleted; with `whole` (a list for a consumer)
        return it filtered to that consumer's resources, else None."""
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(obj, dict):
            return None
        owner = owner_key(ex.consumer)
        resources = self.resources
        if ex.method == b"DELETE":
            rid = obj.get("id")
            if is_resource_id(rid) and obj.get("deleted") is True:
                resources.forget(rid)
                if self.shared is not None:
                    self.shared.forget(rid, owner)
            return None
        if obj.get("object") == "list" and isinstance(obj.get("data"), list):
            if whole:
                return _only_owned(obj, resources, owner, self.deny_unknown)
            return None
        if ex.path.endswith("/content"):
            return None                     # a file's content is the client's own data, not an answer about ids
        for rid in _made_ids(obj, ex.method):
            known = resources.lookup(rid)
            if known is None:
                resources.record(rid, owner, deployment.seed)
                if self.shared is not None:     # before the answer goes out (see shared_resources.py)
                    self.shared.record(rid, owner, deployment.seed)
        return None

    def filters(self, ex) -> bool:
        """Is this request's answer a list to filter (read whole, then rewritten)? GETs of an authenticated
        consumer, but a file's content (relayed as it comes, however large)."""
        return ex.method == b"GET" and bool(ex.consumer) and not ex.path.endswith("/content")


def _names_fields(body: bytes) -> bool:
    """Cheap test before parsing a body whole: does it mention a field that names a resource?"""
    return any(f.encode() in body for f in ID_FIELDS)


def _named_ids(path: str, body_obj):
    """The resource ids a request names: path segments, then body fields."""
    for seg in path.split("/")[2:]:
        if is_resource_id(seg):
            yield seg
    if isinstance(body_obj, dict):
        yield from _ids_in(body_obj, ID_FIELDS)


def _made_ids(obj: dict, method: bytes):
    """What an answer made, and so belongs to the requester now: the object a POST created (and an upload's
    completed File), and the files a batch or fine-tuning job produced. Never an id an answer merely mentions:
    recorded as the requester's, it would hand them a resource the gateway had not seen made."""
    if method == b"POST":
        if is_resource_id(obj.get("id")):
            yield obj["id"]
        made = obj.get("file")              # an upload's completion: the File it made
        if isinstance(made, dict) and is_resource_id(made.get("id")):
            yield made["id"]
    if obj.get("object") in PRODUCERS:
        yield from _ids_in(obj, PRODUCED_FIELDS)


def _ids_in(obj: dict, fields):
    """The resource ids in `fields` of `obj`: each a string or a list of them."""
    for field in fields:
        value = obj.get(field)
        for v in value if isinstance(value, list) else (value,):
            if is_resource_id(v):
                yield v


def _only_owned(obj: dict, resources, owner: int, deny_unknown: bool) -> bytes:
    kept = []
    for item in obj["data"]:
        rid = item.get("id") if isinstance(item, dict) else None
        if not is_resource_id(rid):
            kept.append(item)               # not a resource (no id we know how to own): as it came
            continue
        found = resources.lookup(rid)
        if found is None:
            if not deny_unknown:
                kept.append(item)
        elif found[0] == owner:
            kept.append(item)
    obj["data"] = kept
    if "first_id" in obj:
        obj["first_id"] = kept[0].get("id") if kept and isinstance(kept[0], dict) else None
    if "last_id" in obj:
        obj["last_id"] = kept[-1].get("id") if kept and isinstance(kept[-1], dict) else None
    return orjson.dumps(obj)
