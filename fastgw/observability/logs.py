"""JSON logs for operations: one JSON object per line, on stderr by default.

Each line is {"ts": ISO-8601 UTC, "level", "event", "worker"?, ...fields}. Logging never raises: a broken
stream or an unserialisable field must not take a request or the supervisor down with it.

Stack traces go to the log only (`Logger.exception`); callers answer clients with a generic error and, if
they want, the short `error_id` that `exception` returns, so an operator can find the stack in the log.
"""
from __future__ import annotations

import datetime
import os
import sys
import traceback
import time
from typing import IO, Any

import orjson

__all__ = ["Logger"]

_OPTS = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Logger:
    """Writes one JSON line per event. `worker` (an index or name) is added to every line when set."""

    def __init__(self, stream: IO | None = None, worker: int | str | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.worker = worker

    def bind(self, worker: int | str | None) -> "Logger":
        """A logger writing to the same stream with another worker label (used right after fork)."""
        return Logger(self.stream, worker)

    def log(self, level: str, event: str, **fields: Any) -> None:
        record: dict[str, Any] = {"ts": _now(), "level": level, "event": event}
        if self.worker is not None:
            record["worker"] = self.worker
        record.update(fields)
        try:
            line = orjson.dumps(record, default=str, option=_OPTS)
        except Exception:  # e.g. a key orjson cannot take: fall back to str() for every value
            try:
                line = orjson.dumps({str(k): str(v) for k, v in record.items()}, option=_OPTS)
            except Exception:
                return
        try:
            buf = getattr(self.stream, "buffer", None)
            if buf is not None:
                buf.write(line)
                buf.flush()
            else:
                self.stream.write(line.decode())
                self.stream.flush()
        except Exception:
            pass

    def info(self, event: str, **fields: Any) -> None:
        self.log("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.log("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.log("error", event, **fields)

    def exception(self, event: str, exc: BaseException | None = None, **fields: Any) -> str:
        """Log `exc` (default: the exception being handled) with its stack at level error.

        Returns a short random error id: put it (and nothing else about the exception) in the client's
        response so the two can be matched without leaking internals.
        """
        if exc is None:
            exc = sys.exc_info()[1]
        error_id = os.urandom(6).hex()
        if exc is not None:
            fields["exc_type"] = type(exc).__name__
            fields["exc"] = str(exc)
            fields["stack"] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.log("error", event, error_id=error_id, **fields)
        return error_id


class LogThrottle:
    """At most one warning per `interval` seconds for an event a client can trigger at will (a refused PROXY
    connection, say): the first is logged at once, the rest are counted and reported with the next one."""

    def __init__(self, log: Logger, interval: float, clock=time.monotonic):
        self.log = log
        self.interval = interval
        self.clock = clock
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, event: str, **fields: Any) -> bool:
        """Log `event` unless one was logged less than `interval` ago; True when it was logged."""
        now = self.clock()
        if now < self._next.get(event, 0.0):
            self._suppressed[event] = self._suppressed.get(event, 0) + 1
            return False
        self._next[event] = now + self.interval
        suppressed = self._suppressed.pop(event, 0)
        if suppressed:
            fields["suppressed"] = suppressed
        self.log.warning(event, **fields)
        return True
