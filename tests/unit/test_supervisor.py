"""The supervisor with real forks: the test forks a process that runs Supervisor.run(), whose workers
record their pid and the SIGHUPs they receive in files under tmp_path."""
import os
import signal
import time

import orjson
import pytest

from fastgw.observability.logs import Logger
from fastgw.runtime.supervisor import Supervisor, available_cpus

pytestmark = pytest.mark.timeout(30)


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def worker_target(directory, ignore_term=False):
    def target(index):
        pid = os.getpid()
        path = os.path.join(directory, f"w{index}-{pid}")

        def on_hup(signum, frame):
            with open(path + ".hup", "a") as f:
                f.write("hup\n")

        def on_term(signum, frame):
            raise SystemExit(0)

        signal.signal(signal.SIGHUP, on_hup)
        signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore_term else on_term)
        with open(path, "w") as f:
            f.write(str(pid))
        while True:
            time.sleep(0.05)
    return target


_dirs = {}  # supervisor pid -> its tmp_path


def start(tmp_path, n=2, drain_timeout=1.0, ignore_term=False, target=None, **kw):
    """Fork a process running the supervisor; returns its pid."""
    (tmp_path / "reload_ok").write_text("1")

    def reload():
        answer = (tmp_path / "reload_ok").read_text()
        if answer == "raise":
            raise ValueError("fastgw.toml: models[0].deployments[0].key_env: environment variable K is not set")
        return answer == "1"

    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            with open(tmp_path / "sup.log", "w") as logf:
                sup = Supervisor(n, target or worker_target(str(tmp_path), ignore_term),
                                 drain_timeout=drain_timeout, reload=reload, log=Logger(logf), **kw)
                code = sup.run()
        finally:
            os._exit(code)
    _dirs[pid] = tmp_path
    return pid


def workers(tmp_path):
    """{index: pid} of the workers whose pid file exists and which are alive."""
    out = {}
    for name in os.listdir(tmp_path):
        if name.startswith("w") and "." not in name:
            index, pid = name[1:].split("-")
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                continue
            out[int(index)] = int(pid)
    return out


def hups(tmp_path, pid_by_index):
    counts = {}
    for index, pid in pid_by_index.items():
        p = tmp_path / f"w{index}-{pid}.hup"
        counts[index] = len(p.read_text().splitlines()) if p.exists() else 0
    return counts


def log_events(tmp_path):
    path = tmp_path / "sup.log"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def stop(sup_pid, sig=signal.SIGTERM):
    # before "supervisor started" the signals are not blocked yet and would kill it outright
    wait_for(lambda: any(e["event"] == "supervisor started" for e in log_events(_dirs[sup_pid])))
    os.kill(sup_pid, sig)
    _, status = os.waitpid(sup_pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_dead_worker_is_restarted_and_sigterm_stops_all(tmp_path):
    sup = start(tmp_path, n=2)
    try:
        first = wait_for(lambda: (w := workers(tmp_path)) and len(w) == 2 and w)
        os.kill(first[1], signal.SIGKILL)
        second = wait_for(lambda: (w := workers(tmp_path)) and len(w) == 2 and w[1] != first[1] and w)
        assert second[0] == first[0]  # the other worker was left alone
    except BaseException:
        os.kill(sup, signal.SIGKILL)
        raise
    assert stop(sup) == 0
    for pid in second.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    events = log_events(tmp_path)
    died = [e for e in events if e["event"] == "worker died"]
    assert died == [dict(died[0], worker=1, pid=first[1], signal="SIGKILL")]
    assert any(e["event"] == "supervisor stopped" and e["killed"] == 0 for e in events)


def test_sigint_is_graceful_too(tmp_path):
    sup = start(tmp_path, n=1)
    w = wait_for(lambda: workers(tmp_path))
    assert stop(sup, signal.SIGINT) == 0
    with pytest.raises(ProcessLookupError):
        os.kill(w[0], 0)


def test_straggler_is_killed_after_drain_timeout(tmp_path):
    sup = start(tmp_path, n=1, drain_timeout=0.2, ignore_term=True, kill_grace=0.3)
    w = wait_for(lambda: workers(tmp_path))
    assert stop(sup) == 1  # it ignored SIGTERM: killed after drain_timeout + kill_grace
    with pytest.raises(ProcessLookupError):
        os.kill(w[0], 0)
    assert any(e["event"] == "worker killed" for e in log_events(tmp_path))


def test_sighup_forwarded_only_when_reload_accepts(tmp_path):
    sup = start(tmp_path, n=2)
    try:
        w = wait_for(lambda: (x := workers(tmp_path)) and len(x) == 2 and x)
        time.sleep(0.2)  # let the workers install their SIGHUP handler after writing the pid file
        os.kill(sup, signal.SIGHUP)
        wait_for(lambda: hups(tmp_path, w) == {0: 1, 1: 1})
        (tmp_path / "reload_ok").write_text("0")
        os.kill(sup, signal.SIGHUP)
        wait_for(lambda: any(e["event"] == "config reload refused" for e in log_events(tmp_path)))
        (tmp_path / "reload_ok").write_text("raise")        # a config error: refused, its message logged
        os.kill(sup, signal.SIGHUP)
        wait_for(lambda: [e for e in log_events(tmp_path) if e["event"] == "config reload refused"][1:])
        (tmp_path / "reload_ok").write_text("1")
        os.kill(sup, signal.SIGHUP)
        wait_for(lambda: hups(tmp_path, w) == {0: 2, 1: 2})  # the refused reloads sent nothing
        assert workers(tmp_path) == w  # nobody died of a SIGHUP
    finally:
        assert stop(sup) == 0
    events = [e["event"] for e in log_events(tmp_path)]
    assert events.count("config validated, reloading workers") == 2 and events.count("config reload refused") == 2
    refused = [e for e in log_events(tmp_path) if e["event"] == "config reload refused"]
    assert "error" not in refused[0] and "deployments[0].key_env" in refused[1]["error"]
    assert "config reload failed" not in events         # a config error is a refusal, not a crash of reload()


def test_crashing_target_is_logged_and_restarted_with_backoff(tmp_path):
    marker = tmp_path / "runs"

    def target(index):
        with open(marker, "a") as f:
            f.write("x")
        raise RuntimeError("boom")

    sup = start(tmp_path, n=1, target=target, max_backoff=0.2)
    try:
        wait_for(lambda: marker.exists() and len(marker.read_text()) >= 4)
    finally:
        assert stop(sup) == 0
    events = log_events(tmp_path)
    crashed = [e for e in events if e["event"] == "worker crashed"]
    assert crashed and crashed[0]["exc"] == "boom" and "RuntimeError" in crashed[0]["stack"]
    died = [e for e in events if e["event"] == "worker died"]
    assert died[0]["exit_code"] == 1
    assert died[0]["restart_in_s"] == 0.0 and died[1]["restart_in_s"] == 0.1  # backs off when it keeps dying
    assert all(d["restart_in_s"] <= 0.2 for d in died)


def test_target_return_value_is_the_exit_code(tmp_path):
    def target(index):
        if not (tmp_path / "once").exists():
            (tmp_path / "once").write_text("")
            return 7
        while True:
            time.sleep(0.05)

    sup = start(tmp_path, n=1, target=target)
    try:
        wait_for(lambda: any(e["event"] == "worker died" for e in log_events(tmp_path)))
    finally:
        assert stop(sup) == 0
    died = [e for e in log_events(tmp_path) if e["event"] == "worker died"]
    assert died[0]["exit_code"] == 7


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "200000 100000\n"}, 2),
    ({"cpu.max": "150000 100000\n"}, 2),
    ({"cpu.max": "50000 100000\n"}, 1),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu,cpuacct/cpu.cfs_quota_us": "100000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 1),
    ({"cpu.cfs_quota_us": "300000\n", "cpu.cfs_period_us": "100000\n"}, 3),
    ({}, None),
])
def test_available_cpus_with_fake_cgroup(tmp_path, files, expected):
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    affinity = len(os.sched_getaffinity(0))
    want = affinity if expected is None else max(1, min(affinity, expected))
    assert available_cpus(str(tmp_path)) == want


def test_available_cpus_on_this_machine():
    assert 1 <= available_cpus() <= len(os.sched_getaffinity(0))
