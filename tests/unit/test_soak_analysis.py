"""The soak's judgement can fail (perf/soak.py): a slow leak is found under the noise of requests in flight, a
noisy flat series is not called a leak, a worker not back to idle is named, and the plot is one valid SVG."""
import random
import xml.etree.ElementTree as ET

import pytest

from perf.soak import analyse, grows, idle_checks, judge_run, plot, slope


def samples(values_by_worker: dict, interval: float = 5.0) -> list[dict]:
    n = len(next(iter(values_by_worker.values())))
    return [{"t": i * interval, "answered": i * 2000,
             "workers": {w: {"rss_mb": v[i], "fds": v[i], "upstream_connections": v[i], "client_connections": v[i],
                             "asyncio_tasks": v[i], "upstream_idle": 0, "pid": 1}
                         for w, v in values_by_worker.items()}} for i in range(n)]


def test_slope_is_exact_on_a_line_and_its_error_zero():
    b, se = slope([(t, 3.0 + 0.5 * t) for t in range(10)])
    assert b == pytest.approx(0.5) and se == pytest.approx(0.0, abs=1e-12)
    assert slope([(0, 1.0), (1, 2.0)]) == (0.0, 0.0)          # too few points to judge


def test_a_slow_leak_under_noise_is_found_and_noise_alone_is_not():
    rng = random.Random(7)
    hour = 720                                                  # an hour of 5 s samples
    noise = [30 + rng.gauss(0, 8) for _ in range(hour)]         # connections in flight wandering around 30
    leak = [v + i * 5 / 3600 * 40 for i, v in enumerate(noise)]  # plus 40 an hour
    got = analyse(samples({"0": noise, "1": leak}), "client_connections", 20.0)
    assert got["0"]["bounded"] and not got["1"]["bounded"]
    assert got["1"]["slope_per_hour_second_half"] == pytest.approx(40, abs=10)
    # a short run's slope is mostly noise: not called a leak however steep it looks
    b, se = slope([(i * 5.0, v) for i, v in enumerate(noise[:12])])
    assert not grows(b, se, 20.0)


def test_a_worker_not_back_to_idle_is_named():
    idle = {"pid": 1, "rss_mb": 27.0, "fds": 20, "upstream_connections": 3, "upstream_idle": 3,
            "client_connections": 0, "asyncio_tasks": 1}
    after_ok = dict(idle, fds=26, upstream_connections=9, upstream_idle=9)    # 6 more idle upstream connections
    assert idle_checks({"0": idle}, {"0": after_ok}) == {"0": {"ok": True, "why": ""}}
    leaky = dict(after_ok, asyncio_tasks=4, upstream_connections=11, fds=29, client_connections=1)
    why = idle_checks({"0": idle}, {"0": leaky})["0"]["why"]
    assert "asyncio tasks 1 -> 4" in why and "2 upstream connections still busy" in why
    assert "1 client connections left" in why and "3 descriptors" in why
    assert idle_checks({"0": idle}, {"0": dict(idle, pid=2)})["0"]["ok"] is False   # restarted meanwhile


def test_the_run_verdict_and_the_plot():
    flat = [27.0 + 0.01 * (i % 3) for i in range(60)]
    idle = {"pid": 1, "rss_mb": 27.0, "fds": 20, "upstream_connections": 3, "upstream_idle": 3,
            "client_connections": 0, "asyncio_tasks": 1}
    run = {"samples": samples({"0": flat, "1": flat}), "idle_before": {"0": idle, "1": idle},
           "idle_after": {"0": idle, "1": idle}, "load": {"problems": {}, "answered": 1000}}
    j = judge_run(run)
    assert j["ok"] and len(j["verdicts"]) == 7
    run["load"]["problems"] = {"misdelivered": 1}
    assert not judge_run(run)["ok"]
    svg = ET.fromstring(plot(run, "soak <test> & co"))
    polylines = svg.findall(".//{http://www.w3.org/2000/svg}polyline")
    assert len(polylines) == 5 * 2 + 1                          # each series per worker, and the load
    assert all(len(p.get("points").split()) >= 59 for p in polylines)
