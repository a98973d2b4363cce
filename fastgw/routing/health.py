"""Active health checks: `health_check = { path, interval_s, timeout_s }` on a model (off when absent).

One worker (worker "0") checks every deployment of such a model every `interval_s`: a GET of `path` on the
deployment's host with its key. A check that cannot connect, times out, or gets a 429 or 5xx opens the
deployment's circuit breaker (shared by all workers, so they all skip it); a check that gets any other status
closes it again, without waiting out the cool-down. Between checks the breaker works as without them.
"""
from __future__ import annotations

import asyncio


class HealthChecks:
    def __init__(self, loop, log):
        self.loop = loop
        self.log = log
        self.tasks: list[asyncio.Task] = []

    def apply(self, cfg, router) -> None:
        """Check the deployments of `router` (a config just applied) from now on; the old checks stop."""
        self.close()
        for m in cfg.models:
            hc = m.health_check
            if hc is None:
                continue
            route = router.wildcard if m.name == "*" else router.routes[m.name]
            for d in route.deployments:
                if d.breaker is not None:
                    self.tasks.append(self.loop.create_task(self._run(m.name, d, hc)))

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        self.tasks = []

    async def _run(self, model: str, d, hc) -> None:
        while True:
            try:
                self._apply_result(model, d, await check(d, hc.path, hc.timeout_s))
            except asyncio.CancelledError:
                raise
            except Exception:                       # a bug must not end the checks for good
                self.log.exception("health check failed to run", model=model, upstream=d.name)
            await asyncio.sleep(hc.interval_s)

    def _apply_result(self, model: str, d, problem: str | None) -> None:
        b = d.breaker
        if problem is None:
            if b.force_close():
                self.log.info("health check passed: breaker closed", model=model, upstream=d.name)
        elif b.force_open():
            if b.on_open is not None:
                b.on_open()
            self.log.warning("health check failed: breaker opened", model=model, upstream=d.name, error=problem)


async def check(d, path: str, timeout: float) -> str | None:
    """None when deployment `d` answers GET `path` with a status below 500 other than 429; else what failed."""
    writer = None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(d.host, d.port, ssl=d.ssl, server_hostname=d.server_hostname), timeout)
        writer.write(b"GET " + path.encode() + b" HTTP/1.1\r\n" + d.header_lines + b"connection: close\r\n\r\n")
        line = await asyncio.wait_for(reader.readline(), timeout)
    except asyncio.TimeoutError:
        return "timeout"
    except OSError as exc:
        return f"connect: {type(exc).__name__}"
    finally:
        if writer is not None:
            writer.close()
    parts = line.split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return "not an HTTP response"
    status = int(parts[1])
    if status == 429 or status >= 500:
        return f"status {status}"
    return None
