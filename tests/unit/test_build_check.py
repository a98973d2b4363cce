"""`import fastgw` fails loudly, saying how to build, when a compiled module is missing: no slow fallback."""
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_import_without_built_extensions_says_how_to_build(tmp_path):
    # A source tree with the .py and .pyx files but none of the compiled modules.
    shutil.copytree(os.path.join(ROOT, "fastgw"), tmp_path / "fastgw",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "FASTGW_SKIP_BUILD_CHECK"}
    env["PYTHONPATH"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", "import fastgw"], cwd=tmp_path, env=env, capture_output=True,
                       text=True)
    assert r.returncode != 0
    assert "compiled modules are not built" in r.stderr
    assert "pip install -e ." in r.stderr and "fastgw.protocol.http" in r.stderr and "fastgw.proxy.client" in r.stderr


def test_import_with_built_extensions_works():
    env = {k: v for k, v in os.environ.items() if k != "FASTGW_SKIP_BUILD_CHECK"}
    r = subprocess.run([sys.executable, "-c", "import fastgw, fastgw.proxy.client; print(fastgw.__version__)"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
