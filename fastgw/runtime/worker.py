"""One worker process: its own uvloop, its own SO_REUSEPORT listener, drained on SIGTERM, reloaded on SIGHUP.

The kernel spreads new connections over the workers' listeners; a worker never shares a socket or a lock with
another (token buckets, the only shared state on the request path, live in shared memory: fastgw/policies/ratelimit/bucket.pyx).
"""
from __future__ import annotations

import asyncio
import resource
import signal
import time
from typing import Callable

import uvloop

from fastgw.runtime import admin
from fastgw.observability.accesslog import AccessLog
from fastgw.runtime.config import Config, ConfigError
from fastgw.runtime.listener import Listener, listen_socket
from fastgw.proxy.client import ClientConnection, monotonic
from fastgw.proxy.gateway import Gateway
from fastgw.observability.metrics import Stats
from fastgw.routing.resilience import breaker_rows

STATS_FLUSH_INTERVAL = 1.0


class Worker:
    def __init__(self, index: int, cfg: Config, load_config: Callable[[], Config], run_dir: str, log):
        self.index = index
        self.cfg = cfg
        self.load_config = load_config
        self.run_dir = run_dir
        self.log = log
        self.loop = asyncio.get_event_loop()
        self.gw: Gateway | None = None
        self.server = None
        self.admin_server = None
        self.started = time.time()
        self.reloads = 0
        self.stopped = self.loop.create_future()

    async def serve(self) -> int:
        cfg, loop = self.cfg, self.loop
        s = cfg.server
        mock_url = None
        if cfg.mock:
            # The embedded default: a mock upstream inside this worker, on a loopback port of its own.
            from fastgw.devtools.mock import start_mock

            mock = await start_mock("127.0.0.1", 0)
            mock_url = f"http://127.0.0.1:{mock.sockets[0].getsockname()[1]}/v1"
        stats = Stats(self.run_dir, str(self.index))
        access_log = AccessLog(s.access_log, log=self.log)
        self.gw = gw = Gateway(loop, cfg, log=self.log, stats=stats, access_log=access_log, run_dir=self.run_dir,
                               worker_id=str(self.index), mock_url=mock_url)
        self.server = Listener(loop, listen_socket(s.host, s.port), lambda: ClientConnection(gw), self.log)
        self.server.start()
        if s.admin_port:
            self.admin_server = await loop.create_server(lambda: admin.AdminConnection(gw),
                                                         sock=listen_socket(s.admin_host, s.admin_port))
        loop.add_signal_handler(signal.SIGTERM, self.drain)
        loop.add_signal_handler(signal.SIGINT, self.drain)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._sweep()
        self._flush()
        self._snapshot()
        self.log.info("worker listening", host=s.host, port=s.port, upstream_mock=mock_url)
        code = await self.stopped
        access_log.close()
        stats.flush()
        gw.close()
        return code

    # -- periodic work: one timer each, never per request ---------------------------------------------

    def _sweep(self) -> None:
        gw = self.gw
        now = monotonic()
        for conn in list(gw.connections):
            conn.check_deadline(now)
        interval = 1.0
        if gw.keepalive_interval > 0:
            interval = min(interval, gw.keepalive_interval / 4)
        self.loop.call_later(interval, self._sweep)

    def _flush(self) -> None:
        self.gw.access_log.flush()
        self.loop.call_later(self.gw.access_log.flush_interval, self._flush)

    def _snapshot(self) -> None:
        gw = self.gw
        # Tasks alive on this worker's loop (connects, admissions, background policy work): counted once a
        # second here, never per request, so a soak can tell a task leak from load.
        tasks = len(asyncio.all_tasks(self.loop))
        gw.stats.set_gauge("open_connections", len(gw.connections))
        gw.stats.set_gauge("draining", 1.0 if gw.draining else 0.0)
        gw.stats.set_gauge("asyncio_tasks", tasks)
        gw.stats.set_pools(gw.pools.report())
        gw.stats.set_deployments(breaker_rows(gw.router))
        gw.stats.flush()
        if self.cfg.server.admin_port:
            admin.write_status(gw, self.started, self.reloads, tasks)
        self.loop.call_later(STATS_FLUSH_INTERVAL, self._snapshot)

    # -- signals ------------------------------------------------------------------------------------------

    def reload(self) -> None:
        try:
            cfg = self.load_config()
            self.gw.apply(cfg)
        except (ConfigError, OSError, ValueError) as exc:
            self.log.error("config reload refused", error=str(exc))
            return
        if (cfg.server.host, cfg.server.port) != (self.cfg.server.host, self.cfg.server.port):
            self.log.warning("config reload: the listen address changes only on restart")
        self.cfg = cfg
        self.reloads += 1
        self.log.info("config reloaded", source=cfg.source, config_version=admin.config_version(cfg))

    def drain(self) -> None:
        gw = self.gw
        if gw.draining:
            return
        gw.draining = True                     # /readyz answers 503 from now on
        delay = self.cfg.server.shutdown_delay
        self.log.info("draining", shutdown_delay=delay, drain_timeout=self.cfg.server.drain_timeout)
        self.loop.call_later(delay, self._stop_accepting)

    def _stop_accepting(self) -> None:
        gw = self.gw
        self.server.close()
        if self.admin_server is not None:
            self.admin_server.close()
        for conn in list(gw.connections):      # idle keep-alive connections go now; busy ones after their response
            conn.close_if_idle()
        self._wait_drained(self.loop.time() + self.cfg.server.drain_timeout)

    def _wait_drained(self, deadline: float) -> None:
        gw = self.gw
        if not gw.connections:
            self.log.info("drained")
            self.stopped.set_result(0)
            return
        if self.loop.time() >= deadline:
            self.log.warning("drain timeout: closing connections", open=len(gw.connections))
            for conn in list(gw.connections):
                conn.transport.abort()
            self.stopped.set_result(0)
            return
        self.loop.call_later(0.05, self._wait_drained, deadline)


def raise_fd_limit() -> None:
    """Each connection holds a descriptor (two when proxied): use the hard limit, not the often-1024 soft one."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass


def run_worker(index: int, cfg: Config, load_config: Callable[[], Config], run_dir: str, log) -> int:
    """Entry point in the forked child: serve `cfg`; on SIGHUP apply `load_config()`, the config the supervisor
    validated and published (fastgw.runtime.config.in_force), never a fresh read of the file."""
    raise_fd_limit()
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(Worker(index, cfg, load_config, run_dir, log).serve())
    finally:
        loop.close()
