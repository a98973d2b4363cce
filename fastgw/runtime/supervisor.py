"""The parent process: forks N workers, restarts the ones that die, forwards signals. It serves nothing.

Signals are handled synchronously: the parent blocks SIGCHLD/SIGTERM/SIGINT/SIGHUP and waits for them with
sigtimedwait, so there is no busy loop, no handler racing the main code, and no event loop in the parent
(each worker creates its own uvloop after the fork).

- a worker that dies while we are not stopping is logged (index, pid, exit code or signal) and restarted,
  with an exponential backoff (0.1 s doubling to 10 s) while it keeps dying within `min_uptime` seconds;
- SIGTERM/SIGINT: SIGTERM to every worker (they drain), no more restarts, wait up to drain_timeout + 5 s,
  SIGKILL the stragglers; run() returns 0, or 1 if a worker had to be killed. A second SIGINT (Ctrl-C
  twice) kills at once;
- SIGHUP: reload() in the parent validates the new config; if it returns True, SIGHUP goes to every worker
  ("config validated, reloading workers"; each worker then logs "config reloaded"), else (False, or a
  ValueError whose message is logged as `error`) the workers keep the old config ("config reload refused").

Workers start with SIGINT and SIGHUP ignored (the parent turns Ctrl-C into a graceful SIGTERM; a SIGHUP
arriving before the worker installed its reload handler must not kill it) and SIGTERM at its default.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from typing import Callable

__all__ = ["available_cpus", "Supervisor"]

_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def available_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: min(CPU affinity, ceil(cgroup CPU quota)), at least 1.

    Reads cgroup v2 `cpu.max` ("max 100000" or "200000 100000") or cgroup v1
    `cpu.cfs_quota_us`/`cpu.cfs_period_us` (quota -1 = unlimited) under `cgroup_root`.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _cgroup_quota(root: str) -> float | None:
    """The CPU quota in CPUs, or None when unlimited or unknown."""
    v2 = _read(os.path.join(root, "cpu.max"))
    if v2 is not None:
        parts = v2.split()
        try:
            if parts[0] != "max" and float(parts[1]) > 0:
                return float(parts[0]) / float(parts[1])
        except (IndexError, ValueError):
            pass
        return None
    for sub in ("", "cpu", "cpu,cpuacct", "cpuacct,cpu"):
        quota = _read(os.path.join(root, sub, "cpu.cfs_quota_us"))
        period = _read(os.path.join(root, sub, "cpu.cfs_period_us"))
        if quota is None or period is None:
            continue
        try:
            q, p = float(quota), float(period)
        except ValueError:
            return None
        return q / p if q > 0 and p > 0 else None
    return None


def _describe(status: int) -> dict:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return {"signal": name}
    return {"exit_code": code}


class Supervisor:
    """Keeps `n_workers` forked children running `target(index)` (which returns an exit code)."""

    def __init__(self, n_workers: int, target: Callable[[int], int], *, drain_timeout: float,
                 reload: Callable[[], bool], log, min_uptime: float = 5.0, max_backoff: float = 10.0,
                 kill_grace: float = 5.0):
        if n_workers < 1:
            raise ValueError("n_workers must be >= 1")
        self.n_workers = n_workers
        self.target = target
        self.drain_timeout = drain_timeout
        self.reload = reload
        self.log = log
        self.min_uptime = min_uptime
        self.max_backoff = max_backoff
        self.kill_grace = kill_grace  # extra time after drain_timeout before SIGKILL
        self.workers: dict[int, int] = {}        # pid -> index
        self._started: dict[int, float] = {}     # index -> monotonic start time
        self._fast_failures: dict[int, int] = {}  # index -> consecutive deaths within min_uptime
        self._restart_at: dict[int, float] = {}  # index -> monotonic time of a pending restart
        self._old_mask: set = set()

    # -- public ----------------------------------------------------------------------------------------

    def run(self) -> int:
        self._old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            self.log.info("supervisor started", pid=os.getpid(), workers=self.n_workers)
            for index in range(self.n_workers):
                self._spawn(index)
            return self._loop()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._old_mask)

    # -- children --------------------------------------------------------------------------------------

    def _spawn(self, index: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self._child(index)  # never returns
        self.workers[pid] = index
        self._started[index] = time.monotonic()
        self.log.info("worker started", worker=index, pid=pid)

    def _child(self, index: int) -> None:
        code = 1
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, self._old_mask)
            result = self.target(index)
            code = 0 if result is None else int(result)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException as exc:  # noqa: BLE001 - the child must never return into the parent's code
            try:
                log = self.log.bind(index) if hasattr(self.log, "bind") else self.log
                log.exception("worker crashed", exc)
            except BaseException:
                pass
            code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except BaseException:
                pass
            os._exit(code & 0xFF)

    def _reap(self) -> list[tuple[int, int, int]]:
        """Collect exited workers: [(pid, index, status)]."""
        dead = []
        for pid in list(self.workers):
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                got, status = pid, 0
            if got == pid:
                dead.append((pid, self.workers.pop(pid), status))
        return dead

    def _signal_all(self, sig: int) -> None:
        for pid in self.workers:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    # -- main loop -------------------------------------------------------------------------------------

    def _loop(self) -> int:
        while True:
            timeout = 1.0  # a safety net only: SIGCHLD normally wakes us
            if self._restart_at:
                timeout = max(0.0, min(min(self._restart_at.values()) - time.monotonic(), timeout))
            info = signal.sigtimedwait(_SIGNALS, timeout)
            sig = info.si_signo if info is not None else None
            if sig in (signal.SIGTERM, signal.SIGINT):
                return self._shutdown(sig)
            if sig == signal.SIGHUP:
                self._reload()
            self._handle_deaths()
            now = time.monotonic()
            for index, due in list(self._restart_at.items()):
                if due <= now:
                    del self._restart_at[index]
                    self._spawn(index)

    def _handle_deaths(self) -> None:
        now = time.monotonic()
        for pid, index, status in self._reap():
            uptime = now - self._started.get(index, now)
            if uptime < self.min_uptime:
                self._fast_failures[index] = self._fast_failures.get(index, 0) + 1
            else:
                self._fast_failures[index] = 0
            failures = self._fast_failures[index]
            delay = 0.0 if failures <= 1 else min(self.max_backoff, 0.1 * 2 ** (failures - 2))
            self.log.error("worker died", worker=index, pid=pid, uptime_s=round(uptime, 3),
                           restart_in_s=delay, **_describe(status))
            self._restart_at[index] = now + delay

    def _reload(self) -> None:
        reason = {}
        try:
            ok = bool(self.reload())
        except ValueError as exc:  # the new config is not usable (ConfigError): its message names the field
            ok, reason = False, {"error": str(exc)}
        except Exception as exc:  # a broken reload must not take the supervisor down
            self.log.exception("config reload failed", exc)
            ok = False
        if ok:
            self._signal_all(signal.SIGHUP)
            self.log.info("config validated, reloading workers", workers=len(self.workers))
        else:
            self.log.warning("config reload refused", **reason)

    def _shutdown(self, sig: int) -> int:
        self.log.info("shutting down", signal=signal.Signals(sig).name, workers=len(self.workers),
                      drain_timeout_s=self.drain_timeout)
        self._restart_at.clear()
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.drain_timeout + self.kill_grace
        killed = 0
        force = False
        while self.workers:
            for pid, index, status in self._reap():
                self.log.info("worker exited", worker=index, pid=pid, **_describe(status))
            if not self.workers:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0 or force:
                for pid, index in list(self.workers.items()):
                    self.log.error("worker killed", worker=index, pid=pid, forced=force)
                    try:
                        os.kill(pid, signal.SIGKILL)
                        os.waitpid(pid, 0)
                    except (ProcessLookupError, ChildProcessError):
                        pass
                    killed += 1
                self.workers.clear()
                break
            info = signal.sigtimedwait(_SIGNALS, min(remaining, 1.0))
            if info is not None and info.si_signo == signal.SIGINT:
                force = True  # Ctrl-C again while draining: do not wait any longer
        self.log.info("supervisor stopped", killed=killed)
        return 1 if killed else 0
