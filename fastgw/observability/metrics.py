"""Per-worker metrics, summed over workers when /metrics is scraped.

Why not prometheus_client's multiprocess mode: it takes a lock and writes an mmap'ed file on every inc, which
costs several microseconds per metric; a request updates about ten. Here each worker accumulates in C
records keyed by label tuples (fastgw.observability.stats.RequestStats, the per-request part, compiled) and plain dicts
for the rarer events, writes a snapshot file once a second
(`flush`, tmp + os.replace so a reader never sees half a file), and `render` sums every snapshot in the
shared directory. Snapshots of exited workers are kept, so counters stay monotonic across worker restarts;
their gauges are ignored (an exited worker has no open connections).

Label values come from configuration names (bounded), yet each metric is capped at `max_series` label sets;
beyond that, new label sets are counted in one series whose labels are all "__overflow__".
"""
from __future__ import annotations

import os
import re
from operator import add

import orjson

from fastgw.observability.stats import OVERFLOW, RequestStats

__all__ = ["Stats", "OVERFLOW", "DURATION_BUCKETS", "TTFT_BUCKETS", "OVERHEAD_BUCKETS_US"]

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
OVERHEAD_BUCKETS_US = (5.0, 10.0, 15.0, 20.0, 30.0, 50.0, 75.0, 100.0, 200.0, 500.0, 1000.0, 5000.0, 20000.0)

_PREFIX = "fastgw-metrics-"
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")

# name -> (help, label names). Counter names without the _total suffix (prometheus_client adds it).
_COUNTERS = {
    "requests": ("Requests answered, by final status.", ("model", "upstream", "consumer", "status")),
    "prompt_tokens": ("Prompt (input) tokens.", ("model", "upstream", "consumer")),
    "completion_tokens": ("Completion (output) tokens.", ("model", "upstream", "consumer")),
    "cost_usd": ("Estimated cost in US dollars.", ("model", "upstream", "consumer")),
    "rejections": ("Requests refused by policy (rate_limit, budget, auth, ...).", ("consumer", "model", "reason")),
    "upstream_errors": ("Upstream failures (connect, timeout, reset, busy, ...).", ("upstream", "kind")),
    "upstream_connects": ("Upstream connections opened.", ("upstream",)),
    "upstream_queued": ("Requests that waited for a free upstream connection.", ("upstream",)),
    "upstream_queue_wait_seconds": ("Seconds requests waited for a free upstream connection.", ("upstream",)),
    "fallbacks": ("Requests that moved on to a fallback model.", ("model", "fallback")),
    "breaker_opens": ("Circuit breakers opened (by failed attempts or health checks).", ("model", "upstream")),
    "cache_lookups": ("Response cache lookups by result: hit, semantic_hit (a similar prompt's answer), miss, refresh "
                      "(no-cache), bypass (not cacheable).",
                      ("model", "result")),
    "cache_bytes": ("Response cache bytes: served from hits, stored from misses.", ("model", "direction")),
    "estimated_costs": ("Requests a budget charged an estimated cost: the answer carried no measure of what it "
                        "used (a transcription answered as text, speech of a token-priced model).",
                        ("model", "endpoint")),
}
# Gauges with labels, summed over live workers.
_LABELLED_GAUGES = {
    "upstream_connections": ("Upstream connections open (busy, idle or connecting).", ("upstream",)),
    "upstream_idle_connections": ("Idle upstream connections kept for reuse.", ("upstream",)),
    "upstream_waiting": ("Requests waiting now for a free upstream connection.", ("upstream",)),
}
# Gauges of state the workers share (in shared memory): every live worker reports the same value, so the scrape
# takes the largest, not the sum.
_SHARED_GAUGES = {
    "deployment_state": ("Circuit breaker of a deployment: 0 closed, 1 half-open, 2 open.", ("model", "upstream")),
}
_HISTOGRAMS = {
    "request_duration_seconds": ("Request duration, from request head to last byte.", ("model", "upstream"),
                                 DURATION_BUCKETS),
    "time_to_first_token_seconds": ("Time to the first streamed token.", ("model",), TTFT_BUCKETS),
    "overhead_microseconds": ("Time spent in the gateway itself, excluding the upstream.", (), OVERHEAD_BUCKETS_US),
}


# Layout of one per-(model, upstream, consumer, status) record (RequestStats.records()): one record per request
# updates everything; the per-metric series are derived from the records at snapshot time.
_COUNT, _PROMPT, _COMPLETION, _COST, _DUR_SUM, _TTFT_SUM = range(6)
_DUR0 = 6
_TTFT0 = _DUR0 + len(DURATION_BUCKETS) + 1


class Stats(RequestStats):
    """One worker's metrics. `directory` is shared by all workers; `worker_id` names this worker.

    Hot path: `request(model, upstream, consumer, status, latency_s, ttft_s, overhead_s, prompt_tokens,
    completion_tokens, cost)` (compiled, inherited from RequestStats; compiled callers may use its cdef `add`).
    """

    def __init__(self, directory: str, worker_id: str, *, max_series: int = 10_000):
        super().__init__(DURATION_BUCKETS, TTFT_BUCKETS, OVERHEAD_BUCKETS_US, max_series)
        self.directory = directory
        self.worker_id = str(worker_id)
        self.pid = os.getpid()
        # The pid is in the file name so a restarted worker reusing the same id never overwrites the counters
        # of its predecessor.
        self.path = os.path.join(directory, f"{_PREFIX}{_SAFE.sub('_', self.worker_id)}-{self.pid}.json")
        os.makedirs(directory, exist_ok=True)
        self._rejections: dict[tuple, int] = {}
        self._upstream_errors: dict[tuple, int] = {}
        self._gauges: dict[str, float] = {}
        self._pool_counters: dict[str, dict] = {}
        self._labelled_gauges: dict[str, dict] = {name: {} for name in _LABELLED_GAUGES}
        self._fallbacks: dict[tuple, int] = {}
        self._breaker_opens: dict[tuple, int] = {}
        self._estimated_costs: dict[tuple, int] = {}
        self._shared_gauges: dict[str, dict] = {name: {} for name in _SHARED_GAUGES}

    # -- per event ---------------------------------------------------------------------------------------

    def rejected(self, consumer: str, model: str, reason: str) -> None:
        key = (consumer, model, reason)
        try:
            self._rejections[key] += 1
        except KeyError:
            self._counter_new(self._rejections, key)

    def upstream_error(self, upstream: str, kind: str) -> None:
        key = (upstream, kind)
        try:
            self._upstream_errors[key] += 1
        except KeyError:
            self._counter_new(self._upstream_errors, key)

    def fallback(self, model: str, fallback: str) -> None:
        """A request moved on from `model` to the fallback model `fallback` (names from the config)."""
        key = (model, fallback)
        try:
            self._fallbacks[key] += 1
        except KeyError:
            self._counter_new(self._fallbacks, key)


    def breaker_opened(self, model: str, upstream: str) -> None:
        """This worker opened the circuit breaker of `model`'s deployment on `upstream`."""
        key = (model, upstream)
        try:
            self._breaker_opens[key] += 1
        except KeyError:
            self._counter_new(self._breaker_opens, key)

    def cost_estimated(self, model: str, endpoint: str) -> None:
        """A budget charged `model`'s request to `endpoint` an estimate (model: a bounded label, model_label)."""
        key = (model, endpoint)
        try:
            self._estimated_costs[key] += 1
        except KeyError:
            self._counter_new(self._estimated_costs, key)

    def set_deployments(self, rows) -> None:
        """The breakers' states now: (model, upstream, state) rows, state 0 closed, 1 half-open, 2 open."""
        self._shared_gauges = {"deployment_state": {(model, upstream): state for model, upstream, state in rows}}

    def set_gauge(self, name: str, value: float) -> None:
        """Set gauge `fastgw_<name>` for this worker; the scrape sums it over live workers."""
        self._gauges[name] = value

    def set_pools(self, rows) -> None:
        """This worker's upstream pools now: (upstream, open, idle, waiting, connects, queued, queue_wait_s)
        rows (fastgw.proxy.upstream.Pools.report); the upstream names come from the config."""
        counters = {"upstream_connects": {}, "upstream_queued": {}, "upstream_queue_wait_seconds": {}}
        gauges = {name: {} for name in _LABELLED_GAUGES}
        for upstream, open_, idle, waiting, connects, queued, wait in rows:
            k = (upstream,)
            gauges["upstream_connections"][k] = open_
            gauges["upstream_idle_connections"][k] = idle
            gauges["upstream_waiting"][k] = waiting
            counters["upstream_connects"][k] = connects
            counters["upstream_queued"][k] = queued
            counters["upstream_queue_wait_seconds"][k] = wait
        self._pool_counters = counters
        self._labelled_gauges = gauges

    # -- slow path: new label sets ---------------------------------------------------------------------

    def _admit(self, series: dict, key: tuple) -> tuple:
        """The key to use for a new label set: itself, or the overflow series once the metric is full."""
        if len(series) >= self.max_series:
            return (OVERFLOW,) * len(key)
        return key

    def _counter_new(self, series: dict, key: tuple) -> None:
        key = self._admit(series, key)
        series[key] = series.get(key, 0) + 1

    # -- snapshots -------------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        """This worker's values in the per-metric form that snapshot files hold."""
        counters: dict[str, dict] = {name: {} for name in _COUNTERS}
        hists: dict[str, dict] = {name: {} for name in _HISTOGRAMS}
        for key, r in self.records().items():
            model, upstream, consumer, status = key
            counters["requests"][key] = r[_COUNT]
            k3 = (model, upstream, consumer)
            for name, i in (("prompt_tokens", _PROMPT), ("completion_tokens", _COMPLETION), ("cost_usd", _COST)):
                _merge_into(counters[name], k3, r[i], 1 << 62)
            _merge_into(hists["request_duration_seconds"], (model, upstream),
                        r[_DUR0:_TTFT0] + [r[_DUR_SUM]], 1 << 62)
            if any(r[_TTFT0:]):
                _merge_into(hists["time_to_first_token_seconds"], (model,), r[_TTFT0:] + [r[_TTFT_SUM]], 1 << 62)
        counters["rejections"] = self._rejections
        counters["upstream_errors"] = self._upstream_errors
        counters["fallbacks"] = self._fallbacks
        counters["breaker_opens"] = self._breaker_opens
        counters["estimated_costs"] = self._estimated_costs
        self.cache_flush()
        counters["cache_lookups"] = self._cache_lookups
        counters["cache_bytes"] = self._cache_bytes
        counters.update(self._pool_counters)
        hists["overhead_microseconds"][()] = self.overhead_histogram()
        return {
            "worker": self.worker_id,
            "pid": self.pid,
            "counters": {name: [[list(k), v] for k, v in series.items()] for name, series in counters.items()},
            "histograms": {name: [[list(k), v] for k, v in series.items()] for name, series in hists.items()},
            "gauges": dict(self._gauges),
            "labelled_gauges": {name: [[list(k), v] for k, v in series.items()]
                                for name, series in self._labelled_gauges.items()},
            "shared_gauges": {name: [[list(k), v] for k, v in series.items()]
                              for name, series in self._shared_gauges.items()},
        }

    def flush(self) -> None:
        """Atomically write this worker's snapshot (a reader sees the old or the new file, never half)."""
        data = orjson.dumps(self.snapshot())
        tmp = f"{self.path}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self.path)

    def render(self) -> bytes:
        """Flush, merge every worker's snapshot in the directory and return Prometheus text exposition."""
        self.flush()
        return render_directory(self.directory, self.max_series)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _load_snapshots(directory: str) -> list[dict]:
    snaps = []
    for name in os.listdir(directory):
        if not name.startswith(_PREFIX) or not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(directory, name), "rb") as f:
                snaps.append(orjson.loads(f.read()))
        except (OSError, orjson.JSONDecodeError):
            continue  # removed between listdir and open: its successor is written atomically
    return snaps


def _merge_into(total: dict, key: tuple, value, cap: int) -> None:
    """Add a counter value (a number) or a histogram (a list) into total[key], capping the series."""
    prev = total.get(key)
    if prev is None:
        if len(total) >= cap:
            key = (OVERFLOW,) * len(key)
            prev = total.get(key)
        if prev is None:
            total[key] = list(value) if isinstance(value, list) else value
            return
    if isinstance(value, list):
        prev[:] = map(add, prev, value)
    else:
        total[key] = prev + value


def render_directory(directory: str, max_series: int = 10_000) -> bytes:
    """Sum all snapshots in `directory` into Prometheus text format."""
    snaps = _load_snapshots(directory)
    counters: dict[str, dict] = {name: {} for name in _COUNTERS}
    hists: dict[str, dict] = {name: {} for name in _HISTOGRAMS}
    gauges: dict[str, float] = {}
    labelled: dict[str, dict] = {name: {} for name in _LABELLED_GAUGES}
    shared: dict[str, dict] = {name: {} for name in _SHARED_GAUGES}
    for snap in snaps:
        for name, rows in snap.get("counters", {}).items():
            if name in counters:
                for labels, value in rows:
                    _merge_into(counters[name], tuple(labels), value, max_series)
        for name, rows in snap.get("histograms", {}).items():
            if name in hists:
                width = len(_HISTOGRAMS[name][2]) + 2
                for labels, value in rows:
                    if len(value) == width:  # bucket layout changed across versions: skip, do not corrupt
                        _merge_into(hists[name], tuple(labels), value, max_series)
        if _pid_alive(int(snap.get("pid", 0))):
            for name, value in snap.get("gauges", {}).items():
                gauges[name] = gauges.get(name, 0) + value
            for name, rows in snap.get("labelled_gauges", {}).items():
                if name in labelled:
                    for labels, value in rows:
                        _merge_into(labelled[name], tuple(labels), value, max_series)
            for name, rows in snap.get("shared_gauges", {}).items():
                if name in shared:
                    series = shared[name]
                    for labels, value in rows:
                        key = tuple(labels)
                        if key in series or len(series) < max_series:
                            series[key] = max(series.get(key, value), value)
    labelled.update(shared)
    return _format(counters, hists, gauges, labelled)


# Text exposition format 0.0.4, written directly: prometheus_client's generate_latest spends ~5x longer per
# sample, and render() runs on a worker's event loop. Tests check the output with prometheus_client's parser.

def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple, key: tuple) -> str:
    return ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, key))


def _num(v) -> str:
    if isinstance(v, int):
        return str(v)
    if v == float("inf"):
        return "+Inf"
    return repr(float(v))


def _format(counters: dict, hists: dict, gauges: dict, labelled: dict) -> bytes:
    out: list[str] = []
    for name, (help_, labelnames) in _COUNTERS.items():
        full = f"fastgw_{name}"
        out.append(f"# HELP {full}_total {help_}\n# TYPE {full}_total counter\n")
        for key, value in sorted(counters[name].items(), key=_sort_key):
            out.append(f"{full}_total{{{_labels(labelnames, key)}}} {_num(value)}\n")
    for name, (help_, labelnames, bounds) in _HISTOGRAMS.items():
        full = f"fastgw_{name}"
        out.append(f"# HELP {full} {help_}\n# TYPE {full} histogram\n")
        les = [f'le="{_fmt(b)}"' for b in bounds] + ['le="+Inf"']
        for key, value in sorted(hists[name].items(), key=_sort_key):
            labels = _labels(labelnames, key)
            prefix = f"{full}_bucket{{{labels},"if labels else f"{full}_bucket{{"
            running = 0
            for le, count in zip(les, value):
                running += count
                out.append(f"{prefix}{le}}} {running}\n")
            braces = f"{{{labels}}}" if labels else ""
            out.append(f"{full}_sum{braces} {_num(value[-1])}\n{full}_count{braces} {running}\n")
    for name, (help_, labelnames) in {**_LABELLED_GAUGES, **_SHARED_GAUGES}.items():
        full = f"fastgw_{name}"
        out.append(f"# HELP {full} {help_}\n# TYPE {full} gauge\n")
        for key, value in sorted(labelled[name].items(), key=_sort_key):
            out.append(f"{full}{{{_labels(labelnames, key)}}} {_num(value)}\n")
    for name, value in sorted(gauges.items()):
        full = "fastgw_" + re.sub(r"[^A-Za-z0-9_]", "_", name)
        out.append(f"# HELP {full} Gauge {full}, summed over live workers.\n# TYPE {full} gauge\n"
                   f"{full} {_num(value)}\n")
    return "".join(out).encode()


def _sort_key(item):
    return tuple(str(v) for v in item[0])


def _fmt(bound: float) -> str:
    return repr(float(bound))
