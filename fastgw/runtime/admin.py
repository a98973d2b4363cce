"""The read-only admin listener: GET /status on its own port (loopback by default), never on the public one.

Every worker writes a small status snapshot into the run directory each second; whichever worker accepts an
admin connection merges them, so the answer covers the whole gateway.
"""
from __future__ import annotations

import asyncio
import glob
import hashlib
import os
import time

import msgspec
import orjson

from fastgw import __version__
from fastgw.protocol import http as H
from fastgw.routing.resilience import deployment_status


def config_version(cfg) -> str:
    """A short digest of the effective config, to tell which one each worker runs."""
    return hashlib.sha256(msgspec.json.encode(cfg)).hexdigest()[:12]


def write_status(gw, started: float, reloads: int, asyncio_tasks: int = 0) -> None:
    """This worker's snapshot (called by the worker's one-second timer, which counts its `asyncio_tasks`)."""
    errors = {}
    for (upstream, kind), n in gw.stats._upstream_errors.items():
        errors.setdefault(upstream, {})[kind] = n
    upstreams = {}
    for route in list(gw.router.routes.values()) + ([gw.router.wildcard] if gw.router.wildcard else []):
        for t in route.deployments:
            pool = gw.pools.pools.get(t.pool_key)
            upstreams[t.name] = {"name": t.name, "open_connections": pool.open if pool else 0,
                                 "idle_connections": len(pool.idle) if pool else 0,
                                 "connects": pool.connects if pool else 0, "errors": errors.get(t.name, {})}
    status = {
        "worker": gw.worker_id, "pid": os.getpid(), "started_at": started, "connections": len(gw.connections),
        "asyncio_tasks": asyncio_tasks,
        "draining": gw.draining, "config_source": gw.cfg.source, "config_version": config_version(gw.cfg),
        "reloads": reloads, "upstreams": list(upstreams.values()), "deployments": deployment_status(gw.router),
        "updated_at": time.time(),
    }
    path = os.path.join(gw.run_dir, f"status-{gw.worker_id}.json")
    tmp = path + f".{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(orjson.dumps(status))
    os.replace(tmp, path)


def read_status(run_dir: str) -> bytes:
    workers = []
    for path in sorted(glob.glob(os.path.join(run_dir, "status-*.json"))):
        try:
            with open(path, "rb") as f:
                w = orjson.loads(f.read())
            os.kill(w["pid"], 0)                    # only live workers
        except (OSError, ValueError, KeyError):
            continue
        workers.append(w)
    versions = sorted({w["config_version"] for w in workers})
    return orjson.dumps({"version": __version__, "config_versions": versions, "workers": workers},
                        option=orjson.OPT_INDENT_2)


class AdminConnection(asyncio.Protocol):
    def __init__(self, gw):
        self.gw = gw
        self.parser = H.RequestParser(8192, 50, 0)
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        p = self.parser
        p.feed(data)
        ev = p.next_event()
        while ev == H.HEAD:
            ev = p.next_event()
        if ev == H.NEED_DATA:
            return
        if ev == H.ERROR:
            self._send(p.error_status, b'{"error":"bad request"}')
        elif p.method != b"GET":
            self._send(405, b'{"error":"read-only: use GET"}')
        elif p.target.split(b"?")[0] == b"/status":
            self._send(200, read_status(self.gw.run_dir))
        elif p.target == b"/healthz":              # the container's HEALTHCHECK: the public port may need PROXY
            self._send(200, b'{"status":"ok"}')
        elif p.target == b"/readyz":
            self._send(503 if self.gw.draining else 200,
                       b'{"status":"draining"}' if self.gw.draining else b'{"status":"ready"}')
        else:
            self._send(404, b'{"error":"unknown path; try GET /status"}')

    def _send(self, status: int, body: bytes) -> None:
        from fastgw.errors import reason

        self.transport.write(H.response_head(status, reason(status), [b"content-type: application/json\r\n",
                                                                       b"connection: close\r\n"], len(body)) + body)
        self.transport.close()
