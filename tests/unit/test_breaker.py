"""fastgw.routing.breaker (compiled): the circuit breaker's states at explicit times, its shared memory across
processes, and fastgw.routing.resilience keeping a deployment's state across a reload."""
import os

import pytest

from fastgw.routing.breaker import BreakerTable, BreakerTableFull, deployment_key, monotonic_ns, table_for
from fastgw.routing.resilience import attach, breaker_rows, deployment_status, fallback_chain
from fastgw.routing.router import Router
from fastgw.runtime import config

S = 1_000_000_000          # one second in ns


@pytest.fixture
def table(tmp_path):
    return BreakerTable(str(tmp_path / "b.shm"), 64)


def test_consecutive_failures_open_it_and_a_success_in_between_resets_the_count(table):
    b = table.breaker("d", consecutive_failures=3, cooldown_s=10)
    t = monotonic_ns()
    assert not b.record(False, t) and not b.record(False, t)
    assert not b.record(True, t)                       # the run is broken
    assert not b.record(False, t) and not b.record(False, t)
    assert b.state(t) == 0 and b.allows(t)
    assert b.record(False, t)                          # the third in a row: opened (True: a change)
    assert b.state(t) == 2 and not b.allows(t) and not b.try_admit(t)
    assert not b.record(False, t)                      # already open: nothing changes
    assert b.info()["opens"] == 1 and b.info()["state"] == "open"


def test_after_the_cooldown_probes_are_let_through_then_a_success_closes(table):
    b = table.breaker("d", consecutive_failures=1, cooldown_s=10, half_open_probes=2)
    t = monotonic_ns()
    b.record(False, t)
    assert not b.allows(t + 9 * S)
    assert b.allows(t + 10 * S) and b.state(t + 10 * S) == 1   # cooled down: reported half-open
    assert b.allows(t + 10 * S)                                # asking does not take a probe
    assert b.try_admit(t + 10 * S) and b.try_admit(t + 10 * S)  # two probes
    assert not b.try_admit(t + 10 * S) and not b.allows(t + 10 * S)
    assert b.record(True, t + 11 * S)                          # one success closes
    assert b.state(t + 11 * S) == 0 and b.try_admit(t + 11 * S)


def test_a_failed_probe_opens_it_again_for_a_whole_cooldown(table):
    b = table.breaker("d", consecutive_failures=1, cooldown_s=10)
    t = monotonic_ns()
    b.record(False, t)
    assert b.try_admit(t + 10 * S)
    assert b.record(False, t + 12 * S)                         # the probe failed
    assert not b.allows(t + 21 * S) and b.allows(t + 22 * S)
    assert b.info()["opens"] == 2


def test_probes_that_never_answer_are_let_go_after_a_cooldown(table):
    b = table.breaker("d", consecutive_failures=1, cooldown_s=10, half_open_probes=1)
    t = monotonic_ns()
    b.record(False, t)
    assert b.try_admit(t + 10 * S)                             # a probe whose client left, say
    assert not b.try_admit(t + 15 * S)
    assert b.try_admit(t + 20 * S)                             # a new round


def test_error_rate_over_the_window_needs_min_requests(table):
    b = table.breaker("d", consecutive_failures=0, error_rate=0.5, min_requests=10, window_s=10)
    t = monotonic_ns()
    for ok in (False, True) * 4:                               # 4 of 8 failed, but fewer than min_requests
        assert not b.record(ok, t)
    assert b.state(t) == 0
    assert not b.record(True, t)                               # 9: 4 failed
    assert b.record(False, t)                                  # 10: 5 failed = 50 %
    assert b.state(t) == 2


def test_error_rate_forgets_an_old_window(table):
    b = table.breaker("d", consecutive_failures=0, error_rate=0.5, min_requests=4, window_s=10)
    t = monotonic_ns()
    for _ in range(3):
        b.record(False, t)                                     # 3 failures, below min_requests
    later = t + 25 * S                                         # two windows later: they no longer count
    for _ in range(3):
        assert not b.record(True, later)
    assert not b.record(False, later)                          # 1 of 4
    assert b.state(later) == 0


def test_a_breaker_that_never_failed_writes_nothing_on_success(table):
    b = table.breaker("d", consecutive_failures=3)
    assert b.record(True) is False and b.info() == {"state": "closed", "consecutive_failures": 0, "opens": 0,
                                                    "retry_in_s": 0.0}


def test_health_checks_force_the_state(table):
    b = table.breaker("d", consecutive_failures=5, cooldown_s=30)
    assert b.force_open() and not b.force_open()               # True only when it changed
    assert b.state() == 2 and 29 < b.info()["retry_in_s"] <= 30
    assert b.force_close() and not b.force_close()
    assert b.state() == 0


def test_the_state_is_shared_with_another_process(tmp_path):
    path = str(tmp_path / "shared.shm")
    parent = BreakerTable(path, 64).breaker("dep-a", consecutive_failures=2, cooldown_s=30)
    pid = os.fork()
    if pid == 0:                                               # another worker: maps the file, sees two failures
        try:
            child = BreakerTable(path, 64).breaker("dep-a", consecutive_failures=2, cooldown_s=30)
            child.record(False)
            child.record(False)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert parent.state() == 2 and not parent.allows()
    other = BreakerTable(path, 64).breaker("dep-b", consecutive_failures=2)
    assert other.state() == 0                                  # another deployment, another slot


def test_one_slot_per_identity_and_a_full_table_says_so(tmp_path):
    t = BreakerTable(str(tmp_path / "small.shm"), 8)
    for i in range(8):
        t.breaker(f"d{i}")
    t.breaker("d3")                                            # known: no new slot
    assert t.in_use() == 8
    with pytest.raises(BreakerTableFull):
        t.breaker("one-more")
    assert deployment_key("x") == deployment_key("x") != deployment_key("y")


def test_a_table_file_of_another_size_is_refused(tmp_path):
    BreakerTable(str(tmp_path / "t.shm"), 64)
    with pytest.raises(ValueError):
        BreakerTable(str(tmp_path / "t.shm"), 128)


CONFIG = """
[[models]]
name = "m"
fallbacks = ["b", "c"]
breaker = {{ consecutive_failures = 1, cooldown_s = 60 }}
[[models.deployments]]
url = "http://{a}:8000/v1"
[[models.deployments]]
url = "http://10.0.0.2:8000/v1"
model = "x"
[[models]]
name = "b"
fallbacks = ["d"]
[[models.deployments]]
url = "http://10.0.0.3:8000/v1"
[[models]]
name = "c"
fallbacks = ["d"]
[[models.deployments]]
url = "http://10.0.0.4:8000/v1"
[[models]]
name = "d"
[[models.deployments]]
url = "http://10.0.0.5:8000/v1"
"""


def built(tmp_path, **kw):
    cfg = config.parse(CONFIG.format(**{"a": "10.0.0.1", **kw}))
    router = Router(cfg)
    attach(router, cfg, str(tmp_path))
    return router


def test_fallback_chains_are_flattened_depth_first_each_model_once(tmp_path):
    r = built(tmp_path)
    assert [x.name for x in r.routes["m"].retry.fallbacks] == ["b", "d", "c"]
    assert [x.name for x in r.routes["b"].retry.fallbacks] == ["d"]
    assert r.routes["d"].retry.fallbacks == [] and r.routes["d"].retry.attempts == 1
    models = {m.name: m for m in config.parse(CONFIG.format(a="h")).models}
    assert fallback_chain("c", models) == ["d"]


def test_a_reload_keeps_the_state_of_unchanged_deployments_only(tmp_path):
    first = built(tmp_path)
    a, x = first.routes["m"].deployments
    assert a.breaker is not None and first.routes["b"].deployments[0].breaker is None   # b has no breaker
    a.breaker.record(False)                                  # consecutive_failures = 1: open
    assert {(m, u): s for m, u, s in breaker_rows(first)} == {("m", "10.0.0.1:8000"): 2, ("m", "10.0.0.2:8000"): 0}
    again = built(tmp_path)                                  # the same config, reloaded
    assert again.routes["m"].deployments[0].breaker.state() == 2
    moved = built(tmp_path, a="10.0.0.9")                    # the first deployment changed its URL
    assert moved.routes["m"].deployments[0].breaker.state() == 0
    assert moved.routes["m"].deployments[1].breaker.state() == 0
    status = deployment_status(again)
    assert status[0] == {"model": "m", "upstream": "10.0.0.1:8000", "deployment_model": "",
                         "breaker": again.routes["m"].deployments[0].breaker.info()}
    assert "breaker" not in status[2]


def test_breakers_of_one_run_dir_share_a_table(tmp_path):
    assert table_for(str(tmp_path)) is table_for(str(tmp_path))
