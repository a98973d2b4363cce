"""The benchmark suite itself works end to end: a very short run of `direct`, `nginx` and `proxy` produces a
complete, sane result; `compare` passes a result against itself and fails a slowed one (synthetic and real).
Speed is never judged here: only that the figures exist, are consistent, and that a regression is caught."""
import copy
import json
import os

import pytest

from perf import compare, report
from perf import run as perf_run
from tests.conftest import require_tool


@pytest.fixture(scope="module", autouse=True)
def load_tools():
    """wrk makes the load and nginx is the yardstick: every test here runs them (before the module's result)."""
    require_tool("wrk")
    require_tool("nginx")

SHORT = dict(duration=2, warmup=1, connections=4)


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("perf-results"))


@pytest.fixture(scope="module")
def result(results_dir):
    return perf_run.run(["proxy"], results_dir=results_dir, argv=["run", "proxy"], **SHORT)


def test_result_is_complete_and_sane(result):
    sc = result["scenarios"]
    # `proxy` pulls in its references automatically: the mock's ceiling and the nginx yardstick
    assert list(sc) == ["direct", "nginx", "proxy"]
    for name, entry in sc.items():
        s = entry["summary"]
        assert s["requests"] > 0, name
        assert s["errors_total"] == 0, (name, entry["samples"][0]["error_detail"])
        assert s["rps"] > 0 and 0 < s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"], name
        assert entry["samples"][0]["bytes_per_req"] > 1000, name   # the canned chat reply came back
        if name != "direct":
            assert s["cpu_us_per_req"] > 0 and s["peak_rss_mb"] > 0, name
            assert s["rps_vs_direct"] > 0, name
            assert entry["projected_rps_12cpu"] == pytest.approx(12e6 / s["cpu_us_per_req"])
            assert entry["saturates_baseline"] == (entry["projected_rps_12cpu"] >= 29005.51)
        else:
            assert s.get("cpu_us_per_req") is None
    proxy = sc["proxy"]["summary"]
    assert proxy["cpu_vs_nginx"] == pytest.approx(proxy["cpu_us_per_req"] / sc["nginx"]["summary"]["cpu_us_per_req"])
    meta = result["meta"]
    for key in ("cpu_model", "cpus_online", "kernel", "python", "git_commit", "date", "pinning", "mock_description"):
        assert meta[key], key
    assert meta["versions"]["nginx"] and meta["versions"]["wrk"]


def test_result_files_written(result, results_dir):
    with open(result["files"]["json"]) as f:
        on_disk = json.load(f)
    assert on_disk["scenarios"].keys() == result["scenarios"].keys()
    md = open(os.path.join(results_dir, "latest.md")).read()
    assert md == report.markdown(on_disk)
    for name in ("direct", "nginx", "proxy"):
        assert f"| {name} |" in md
    assert "vs nginx" in md and "12-CPU projection" in md


def test_compare_passes_identical_and_fails_synthetic_slowdown(result, tmp_path, capsys):
    base = tmp_path / "baseline.json"
    base.write_text(json.dumps(result))
    assert compare.main(str(base), str(base)) == 0

    slow = copy.deepcopy(result)
    s = slow["scenarios"]["proxy"]["summary"]
    s["cpu_us_per_req"] *= 1.5
    s["cpu_vs_nginx"] *= 1.5
    slow_path = tmp_path / "slow.json"
    slow_path.write_text(json.dumps(slow))
    assert compare.main(str(slow_path), str(base)) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "cpu_us_per_req" in out

    # within the 10% floor: not a regression
    slight = copy.deepcopy(result)
    slight["scenarios"]["proxy"]["summary"]["cpu_us_per_req"] *= 1.05
    slight_path = tmp_path / "slight.json"
    slight_path.write_text(json.dumps(slight))
    assert compare.main(str(slight_path), str(base)) == 0


def test_compare_uses_learned_noise(result):
    base = copy.deepcopy(result)
    cand = copy.deepcopy(result)
    cand["scenarios"]["proxy"]["summary"]["cpu_us_per_req"] *= 1.3
    assert compare.compare(cand, base)[1]                      # 30% worse, no noise known: regression
    base["scenarios"]["proxy"]["summary"]["noise"]["cpu_us_per_req"] = 0.12
    regressions = compare.compare(cand, base)[1]                # 3 x 12% noise tolerates 30%
    assert not [r for r in regressions if r[1] == "cpu_us_per_req"]


def test_compare_catches_a_really_slowed_gateway(result, results_dir, tmp_path):
    """A real run of the gateway under tracemalloc + the debug allocator (the product unchanged) must fail."""
    slowed = perf_run.run(["proxy"], references=False, results_dir=results_dir,
                          python_opts=perf_run.SLOWED_PYTHON_OPTS, env=perf_run.SLOWED_ENV, variant="slowed",
                          **SHORT)
    assert slowed["scenarios"]["proxy"]["summary"]["requests"] > 0
    assert compare.main(slowed["files"]["json"], result["files"]["json"]) == 1


def test_policies_brings_its_base_and_is_judged_against_it():
    # The bar for policies is a multiple of proxy's CPU: proxy runs right before it in every repeat,
    # and each repeat's ratio comes from that neighbouring pair.
    from perf.scenarios import with_references
    assert [s.name for s in with_references(["policies"])] == ["direct", "nginx", "proxy", "policies"]
    samples = {"direct": [{"rps": 100.0}] * 2, "nginx": [{"rps": 80.0, "cpu_us_per_req": 20.0}] * 2,
               "proxy": [{"rps": 60.0, "cpu_us_per_req": 25.0}, {"rps": 60.0, "cpu_us_per_req": 40.0}],
               "policies": [{"rps": 50.0, "cpu_us_per_req": 30.0}, {"rps": 50.0, "cpu_us_per_req": 44.0}]}
    perf_run.add_ratios(samples)
    assert [s["cpu_vs_base"] for s in samples["policies"]] == [pytest.approx(1.2), pytest.approx(1.1)]
    assert "cpu_vs_base" not in samples["proxy"][0]
    summary = perf_run.summarize([{**s, "requests": 1000, "errors": 0} for s in samples["policies"]])
    assert summary["cpu_vs_base"] == pytest.approx(1.15)
    entry = {"via": "fastgw", "base": "proxy", "summary": {**summary, "errors_total": 0}}
    assert any("1.15× `proxy`" in v and "met" in v for v in report._verdicts({"policies": entry}))


def test_pair_measures_a_scenario_against_its_base_in_turns(tmp_path):
    # `perf pair`: both gateways up, loaded in turn; every slice is a real wrk run against a real gateway, and
    # the ratio is the policies slice's CPU per request over the proxy slice's of the same pair.
    from perf import pair
    if perf_run.SCENARIOS["policies"].unavailable:
        pytest.skip(perf_run.SCENARIOS["policies"].unavailable)
    res = pair.run_pair("policies", pairs=2, slice_s=1, warmup=1, connections=4, results_dir=str(tmp_path),
                        argv=["pair", "--pairs", "2"])
    assert [list(row) for row in res["samples"]] == [["proxy", "policies"], ["policies", "proxy"]]
    for row, ratio in zip(res["samples"], res["ratios"]):
        for s in row.values():
            assert s["requests"] > 100 and s["errors"] == 0 and 0 < s["cpu_us_per_req"] < 10_000
        assert ratio == pytest.approx(row["policies"]["cpu_us_per_req"] / row["proxy"]["cpu_us_per_req"])
    md = (tmp_path / "pair-policies-proxy-latest.md").read_text()
    assert f"**{res['median_ratio']:.2f}×**" in md and "target ≤ 1.3×" in md
    assert json.loads((tmp_path / "pair-policies-proxy-latest.json").read_text())["ratios"] == res["ratios"]
    with pytest.raises(SystemExit):
        pair.run_pair("proxy")             # proxy has no base: it needs --against
    with pytest.raises(SystemExit):
        pair.run_pair("proxy", against="direct")   # the mock alone has no gateway CPU


def test_paced_stream_runs_beside_nginx_on_the_built_in_mock(tmp_path):
    # A paced stream (one SSE event per write, from the built-in mock whatever --mock says) brings its direct
    # and nginx references; streams cut at wrk's end count as the fraction received (stream equivalents).
    res = perf_run.run(["paced-stream"], results_dir=str(tmp_path), argv=["run", "paced-stream"], **SHORT)
    assert list(res["scenarios"]) == ["direct-paced-stream", "nginx-paced-stream", "paced-stream"]
    assert "built-in" in res["meta"]["mock_description"]
    for name, entry in res["scenarios"].items():
        sample = entry["samples"][0]
        assert entry["mock"] == "fastgw" and sample["errors"] == 0, (name, sample["error_detail"])
        assert sample["whole_reply_bytes"] > 100 * 200, name       # 100 content events, each ~240 bytes
        # proxies re-chunk what they read, so a stream's bytes vary by a few per event: equivalents are ±3%
        assert sample["requests"] >= 0.97 * sample["completed_requests"] > 0, name
    fastgw, nginx = (res["scenarios"][n]["summary"] for n in ("paced-stream", "nginx-paced-stream"))
    assert fastgw["cpu_vs_nginx"] == pytest.approx(fastgw["cpu_us_per_req"] / nginx["cpu_us_per_req"])
    # filed apart from the default set's latest.*, which `compare` reads
    assert (tmp_path / "paced-latest.md").exists() and not (tmp_path / "latest.md").exists()


def test_pair_a_paced_stream_against_nginx(tmp_path):
    from perf import pair
    res = pair.run_pair("paced-stream", against="nginx-paced-stream", pairs=2, slice_s=1, warmup=1, connections=4,
                        results_dir=str(tmp_path), argv=["pair", "paced-stream", "--against", "nginx-paced-stream"])
    for row in res["samples"]:
        for s in row.values():
            assert s["requests"] > 0 and s["errors"] == 0 and s["cpu_us_per_req"] > 0
    assert (tmp_path / "pair-paced-stream-nginx-paced-stream-latest.md").exists()
