"""The compiled modules the fuzzers drive, built a second time for fuzzing: clang with
-fsanitize=address,fuzzer-no-link, into build/fuzz-native/<key>/ (never next to the sources, so the
normal build and the other engineers' imports are untouched).

fuzzer-no-link adds libFuzzer's coverage counters and comparison hooks to the C that Cython generates, so
libFuzzer (inside atheris) is guided by the parsers' own branches, not only by the Python around them;
address adds AddressSanitizer, so a read or write outside a buffer (these parsers run with bounds checks
off) stops the run at once. Both runtimes come from atheris' asan_with_fuzzer.so, which must be loaded
first: `child_env()` sets LD_PRELOAD for the fuzzing process, and PYTHONMALLOC=malloc so every Python
object is a separate allocation ASan can guard (pymalloc's arenas would hide an overflow into a neighbour).

`install()` (in the fuzzing process) makes `import fastgw.protocol.http` and the others load the
instrumented builds; everything else comes from the normal build.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The compiled modules under fuzz (stream cimports sse, so both are built).
MODULES = ["fastgw.protocol.http", "fastgw.protocol.sse", "fastgw.protocol.jsonpeek", "fastgw.providers.stream",
           "fastgw.protocol.websocket"]
CFLAGS = ["-O1", "-g", "-fno-omit-frame-pointer", "-fPIC", "-fsanitize=address,fuzzer-no-link", "-w"]
# As setup.py: the files' own `# cython:` lines decide bounds checking (off: what ships is what is fuzzed).
DIRECTIVES = {"boundscheck": False, "wraparound": False, "cdivision": True, "embedsignature": True}

_ENV_FLAG = "FASTGW_FUZZ_NATIVE"      # set in the fuzzing process: the build dir to load modules from


def _sources(module: str) -> Path:
    return ROOT / (module.replace(".", "/") + ".pyx")


def _key() -> str:
    """What the build depends on: the .pyx/.pxd sources, the flags, clang's and Cython's versions."""
    import Cython

    h = hashlib.sha256()
    for path in sorted((ROOT / "fastgw").rglob("*.p[xy]d")) + sorted((ROOT / "fastgw").rglob("*.pyx")):
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    h.update(repr((CFLAGS, DIRECTIVES, Cython.__version__, sys.version)).encode())
    h.update(subprocess.run([clang(), "--version"], capture_output=True, check=True).stdout)
    return h.hexdigest()[:16]


def clang() -> str:
    path = shutil.which("clang")
    if path is None:
        raise RuntimeError("clang is not installed: `make system-deps` (apt-get install clang)")
    return path


def runtime() -> Path:
    """atheris' libFuzzer + AddressSanitizer runtime (shipped in its wheel, beside the package)."""
    import atheris

    path = Path(atheris.path()) / "asan_with_fuzzer.so"
    if not path.exists():
        raise RuntimeError(f"{path} is missing: reinstall atheris (pip install atheris)")
    return path


def build(log=print) -> Path:
    """The directory of the instrumented modules, built now if the sources changed (about 30 s of CPU)."""
    from Cython.Build import cythonize

    out = ROOT / "build" / "fuzz-native" / _key()
    if (out / "done").exists():
        return out
    log(f"fuzz: building the instrumented extensions into {out.relative_to(ROOT)} (clang, ASan, coverage)")
    csrc = out / "c"
    cythonize([str(_sources(m).relative_to(ROOT)) for m in MODULES], build_dir=str(csrc.relative_to(ROOT)),
              language_level=3, compiler_directives=DIRECTIVES, quiet=True, force=True)
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    include = sysconfig.get_paths()["include"]

    def compile_one(module):
        c_file = csrc / (module.replace(".", "/") + ".c")
        target = out / (module.replace(".", "/") + suffix)
        target.parent.mkdir(parents=True, exist_ok=True)
        cmd = [clang(), "-shared", *CFLAGS, f"-I{include}", str(c_file), "-o", str(target)]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            raise RuntimeError(f"clang failed on {c_file}:\n{done.stderr[-3000:]}")

    old = os.getcwd()
    os.chdir(ROOT)
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(compile_one, MODULES))
    finally:
        os.chdir(old)
    (out / "done").write_text("\n".join(MODULES) + "\n")
    return out


def child_env(build_dir: Path | None) -> dict:
    """The environment of a fuzzing process: the instrumented modules and their runtime, or neither."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if build_dir is None:
        env.pop(_ENV_FLAG, None)
        return env
    env[_ENV_FLAG] = str(build_dir)
    env["LD_PRELOAD"] = str(runtime())
    env["PYTHONMALLOC"] = "malloc"
    # Python never frees some memory at exit (not a leak to report); a bounded quarantine keeps RSS flat.
    env["ASAN_OPTIONS"] = "detect_leaks=0:quarantine_size_mb=64:allocator_may_return_null=1:symbolize=1"
    return env


class _Finder:
    """A meta path finder that answers the instrumented builds for MODULES."""

    def __init__(self, build_dir: Path):
        self.build_dir = build_dir

    def find_spec(self, name, path=None, target=None):
        if name not in MODULES:
            return None
        file = self.build_dir / (name.replace(".", "/") + importlib.machinery.EXTENSION_SUFFIXES[0])
        return importlib.util.spec_from_file_location(name, file)


def install() -> bool:
    """In a fuzzing process started with child_env(build_dir): load MODULES from that build. Returns whether
    the instrumented builds are in use. Must run before anything imports them."""
    build_dir = os.environ.get(_ENV_FLAG)
    if not build_dir:
        return False
    loaded = [m for m in MODULES if m in sys.modules]
    if loaded:
        raise RuntimeError(f"{loaded} were imported before the instrumented builds were installed")
    sys.meta_path.insert(0, _Finder(Path(build_dir)))
    return True


def instrumented(module) -> bool:
    """Whether a module object is one of the instrumented builds."""
    build_dir = os.environ.get(_ENV_FLAG)
    return bool(build_dir) and str(getattr(module, "__file__", "")).startswith(build_dir)
