"""The fuzz targets in the test command: every committed corpus input (seeds and the regression cases of past
findings) replayed through its harness, then each target fuzzed for a short time in the instrumented build
(FASTGW_FUZZ_SECONDS each, 8 by default; FASTGW_FUZZ_JOBS at once, 2); a finding fails the test with the input
and its traceback. The long run is `python -m tests.fuzz run --seconds N` (tests/fuzz/__init__.py)."""
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import require_module, require_tool
from tests.fuzz import TARGETS, native
from tests.fuzz.__main__ import CORPUS, OUT, fuzz, replay

SECONDS = int(os.environ.get("FASTGW_FUZZ_SECONDS", "8"))
JOBS = int(os.environ.get("FASTGW_FUZZ_JOBS", "2"))


@pytest.mark.parametrize("target", TARGETS)
def test_corpus_replays(target):
    files = sorted((CORPUS / target).iterdir())
    assert files, f"no seed corpus for {target}: `python -m tests.fuzz seeds`"
    failures = replay(target, files)
    assert not failures, "\n".join(f"--- {path}\n{tb}" for path, tb in failures)


@pytest.fixture(scope="module")
def brief_runs():
    """Every target fuzzed SECONDS, JOBS at a time (most of a run is the start: imports, the corpus)."""
    require_tool("clang")
    require_module("atheris")
    build = native.build()
    shutil.rmtree(OUT / "pytest", ignore_errors=True)      # each run starts from the committed corpus alone
    with ThreadPoolExecutor(JOBS) as pool:
        return dict(zip(TARGETS, pool.map(lambda t: fuzz(t, SECONDS, OUT / "pytest", build), TARGETS)))


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_briefly(target, brief_runs):
    result = brief_runs[target]
    log = Path(result["log"]).read_text(errors="replace")
    assert result["ok"], (f"fuzzing {target} found an input that fails (saved as {result['crashes']}; replay it "
                          f"with `python -m tests.fuzz replay {target} FILE`):\n{log[-6000:]}")
    assert result["runs"] > 0, log[-3000:]
