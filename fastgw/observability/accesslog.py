"""Access log: one JSON line per request, written by a background thread so the event loop never blocks.

The worker's hot path calls `write_line(line)` (compiled, fastgw.observability.linebuf.LineBuffer: a list append), or
`write(record)` when a policy edits the record (orjson.dumps first, about a microsecond); a loop timer
calls `flush()` every `flush_interval` seconds, which hands the whole batch to the writer thread in one queue
put; the thread does the blocking os.write. `close()` flushes and joins the thread: nothing accepted is lost.

Memory is bounded: when the writer falls behind (a slow disk, a pipe nobody reads) by more than
`max_queued_bytes`, new lines are dropped and counted (`dropped`), and a warning is logged at most once per
flush; `write()` never blocks.
"""
from __future__ import annotations

import os
import queue
import sys
import threading
from typing import Any

import orjson

from fastgw.observability.linebuf import LineBuffer

__all__ = ["AccessLog"]

_OPTS = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS
_STOP = None  # sentinel put on the queue by close()


class AccessLog(LineBuffer):
    """`target`: "-" for stdout, "off" for nothing, otherwise a file path opened for appending.

    `write_line(line: bytes)` (inherited, compiled) keeps a serialised line; `dropped` counts the lines dropped
    since start (bounded memory).
    """

    def __init__(self, target: str, flush_interval: float = 0.2, *,
                 max_queued_bytes: int = 50 * 1024 * 1024, log: Any = None):
        super().__init__(target != "off", max_queued_bytes)
        self.target = target
        self.flush_interval = flush_interval
        self.log = log  # a fastgw.observability.logs.Logger (or None) for the "lines dropped" warning
        self.write_errors = 0      # failed os.write calls in the writer thread
        self._reported_dropped = 0
        # Bytes handed to the thread and bytes it has written: each counter has a single writer thread, so
        # their difference (the backlog) needs no lock.
        self._enqueued_bytes = 0
        self._written_bytes = 0
        self._fd = -1
        self._own_fd = False
        self._thread: threading.Thread | None = None
        if not self.enabled:
            return
        if target == "-":
            self._fd = sys.stdout.fileno()
        else:
            self._fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self._own_fd = True
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._writer, name="fastgw-accesslog", daemon=True)
        self._thread.start()

    # -- event-loop side -------------------------------------------------------------------------------

    def write(self, record: dict) -> None:
        """Serialise `record` and keep it for the next flush. Never blocks; drops when far behind."""
        if self._closed or not self.enabled:
            return
        if self._pending_bytes > self.max_queued_bytes:
            self.dropped += 1
            return
        self.write_line(orjson.dumps(record, default=str, option=_OPTS))

    def flush(self) -> None:
        """Hand the lines written since the last flush to the writer thread (one queue put)."""
        if not self.enabled:
            return
        batch = self._pending
        if batch:
            size = self._pending_bytes
            self._pending = []
            self._pending_bytes = 0
            if self.backlog + size > self.max_queued_bytes:
                self.dropped += len(batch)
            else:
                self._enqueued_bytes += size
                self._queue.put(batch)
        if self.dropped != self._reported_dropped:
            if self.log is not None:
                self.log.warning("access log lines dropped", dropped=self.dropped - self._reported_dropped,
                                 dropped_total=self.dropped, backlog_bytes=self.backlog)
            self._reported_dropped = self.dropped

    @property
    def backlog(self) -> int:
        """Bytes handed to the writer thread and not yet written."""
        return self._enqueued_bytes - self._written_bytes

    def schedule(self, loop) -> None:
        """Call flush() every flush_interval on `loop` until close() (a convenience for the worker)."""
        def tick() -> None:
            if self._closed:
                return
            self.flush()
            loop.call_later(self.flush_interval, tick)
        if self.enabled:
            loop.call_later(self.flush_interval, tick)

    def close(self) -> None:
        """Flush everything accepted, stop the writer thread and wait for it. Idempotent."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
        if self._own_fd:
            os.close(self._fd)
            self._own_fd = False

    # -- writer thread ---------------------------------------------------------------------------------

    def _writer(self) -> None:
        get = self._queue.get
        while True:
            batch = get()
            if batch is _STOP:
                return
            data = b"".join(batch)
            self._write_all(data)
            self._written_bytes += len(data)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view)
            except InterruptedError:
                continue
            except OSError:
                self.write_errors += 1  # disk full, closed pipe: drop this batch rather than spin
                return
            view = view[n:]
