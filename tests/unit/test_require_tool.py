"""require_tool() and require_module(): a missing program or test-only module fails the test under CI and skips it elsewhere, saying how to install it."""
import pytest

from tests.conftest import require_module, require_tool


@pytest.fixture
def empty_path(tmp_path, monkeypatch):
    """A PATH on which no program exists (and one that does: `fake-tool`)."""
    tool = tmp_path / "bin" / "fake-tool"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tool.parent))
    return tool


def test_missing_tool_fails_under_ci(empty_path, monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"wrk is not installed: .*apt-get install wrk.*CI is set"):
        require_tool("wrk")


@pytest.mark.parametrize("ci", [None, ""])
def test_missing_tool_skips_without_ci(empty_path, monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)              # set but empty, as some shells export it: not CI
    with pytest.raises(pytest.skip.Exception, match=r"ss is not installed: .*apt-get install iproute2"):
        require_tool("ss")


def test_present_tool_is_its_path_even_under_ci(empty_path, monkeypatch):
    monkeypatch.setenv("CI", "1")
    assert require_tool("fake-tool") == str(empty_path)


def test_missing_module_fails_under_ci_and_skips_without(monkeypatch):
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match=r"no_such_module_x is not installed: pip install .*CI is set"):
        require_module("no_such_module_x")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match=r"atheris_missing_x is not installed"):
        require_module("atheris_missing_x")
    import json

    assert require_module("json") is json
