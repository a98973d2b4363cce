"""`make system-deps` installs every program the tests run (a clean Debian machine passes under CI), and only
what is missing. Run for real with stub apt-get/sudo on a PATH we control: nothing is installed here."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import INSTALL_HINTS, require_tool

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["redis-server", "redis-tools", "nginx-light", "wrk", "curl", "iproute2", "clang"]


def makefile_tools() -> dict:
    """{command: Debian package} from the Makefile's SYSTEM_TOOLS."""
    (line,) = [l for l in (ROOT / "Makefile").read_text().splitlines() if l.startswith("SYSTEM_TOOLS")]
    return dict(pair.split(":") for pair in line.split("=", 1)[1].split())


def test_every_tool_a_test_requires_is_installed_by_make():
    used = set()
    for path in (ROOT / "tests").rglob("*.py"):
        used |= set(re.findall(r'require_(?:tool|module)\("([^"]+)"\)', path.read_text()))
    used -= {"fake-tool", "make", "no_such_module_x", "atheris_missing_x", "json"}   # the helpers' own tests;
    # make runs the Makefile itself
    assert used and used <= set(INSTALL_HINTS), used - set(INSTALL_HINTS)
    from_apt = {name: re.search(r"apt-get install (\S+)\)", hint).group(1)
                for name, hint in INSTALL_HINTS.items() if "make system-deps" in hint}
    assert makefile_tools() == from_apt
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    test_extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    for name in used - from_apt.keys():                 # the others come from pip: `make install` ([test] extras)
        package = re.search(r"pip install (\S+)\)", INSTALL_HINTS[name]).group(1)
        assert any(re.match(re.escape(package) + r"\b", dep) for dep in test_extras), (name, package)


@pytest.fixture
def stub_path(tmp_path):
    """A PATH holding only `id`, a recording apt-get and a pass-through sudo; add_tool() puts a fake program on it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "apt-get.calls"
    (bin_dir / "id").symlink_to(shutil.which("id"))     # coreutils: always there
    for name, body in (("apt-get", f'echo "$*" >> {calls}\n'), ("sudo", 'exec "$@"\n')):
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)

    def add_tool(name):
        (bin_dir / name).write_text("#!/bin/sh\n")
        (bin_dir / name).chmod(0o755)

    def run():
        make = require_tool("make")
        calls.unlink(missing_ok=True)
        env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
        res = subprocess.run([make, "-s", "-C", str(ROOT), "system-deps"], env=env, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        return calls.read_text().splitlines() if calls.exists() else []

    return add_tool, run


def test_a_clean_machine_gets_every_package(stub_path):
    _, run = stub_path
    assert run() == ["update -qq", "install -y -qq " + " ".join(PACKAGES)]


def test_only_missing_packages_are_installed(stub_path):
    add_tool, run = stub_path
    for name in ("redis-server", "redis-cli", "nginx", "wrk", "ss", "clang"):
        add_tool(name)
    assert run() == ["update -qq", "install -y -qq curl"]
    add_tool("curl")
    assert run() == []                                  # all present: apt-get is not even updated
