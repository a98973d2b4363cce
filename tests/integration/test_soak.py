"""`python -m perf.soak` end to end, very short (the hour-long run is by hand: perf/README.md): it starts a
2-worker gateway and the mock, loads and samples both workers, judges every series and writes its JSON, Markdown
and SVG. Too short to judge growth; the isolation and back-to-idle verdicts hold even so."""
import json
import os
import xml.etree.ElementTree as ET

import pytest

from perf import soak

pytestmark = pytest.mark.timeout(180)


def test_a_short_soak_samples_judges_and_writes_its_result(tmp_path):
    logged = []
    result = soak.run(0.15, rate=300, users=16, interval=1, results_dir=str(tmp_path), argv=["--minutes", "0.15"],
                      log=logged.append)
    run = result["run"]
    assert len(run["samples"]) >= 8 and all(len(s["workers"]) == 2 for s in run["samples"][1:])
    assert run["load"]["answered"] > 1000 and run["load"]["streams"] > 100
    assert any(k.endswith("/aborted") for k in run["load"]["outcomes"])    # clients that left
    assert any(k == "reset/broken" for k in run["load"]["outcomes"])       # a fault upstream
    verdicts = {v["series"]: v for v in result["judgement"]["verdicts"]}
    assert verdicts["isolation"]["ok"] and verdicts["idle"]["ok"], verdicts
    assert set(verdicts) == {"rss_mb", "fds", "upstream_connections", "client_connections", "asyncio_tasks",
                             "idle", "isolation"}
    stem = os.path.basename(result["files"])
    assert stem.startswith("soak-")
    for name in (stem, "soak-latest"):
        with open(tmp_path / f"{name}.json") as f:
            saved = json.load(f)
        assert saved["command"] == "python -m perf.soak --minutes 0.15" and saved["judgement"]["verdicts"]
        md = (tmp_path / f"{name}.md").read_text()
        assert f"]({stem}.svg)" in md and "| worker RSS (MB) | 1 |" in md
        ET.parse(tmp_path / f"{name}.svg")                                   # well-formed
