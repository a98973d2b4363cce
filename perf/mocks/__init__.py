"""The mock LLMs the benchmarks run against. Each serves the same canned OpenAI replies (perf/mocks/bodies/):
chat JSON with `usage`, chat SSE (100 chunks, usage chunk, [DONE]), embeddings and models.

  nginx     C-speed: nginx serving the files (perf/mocks/nginx-mock.conf); the default, so that the gateway,
            not the mock, is what gets measured
  fastgw    the built-in `fastgw mock` (Python; the demo mock)
  wiremock  WireMock itself, as in the seed benchmark (29,005 RPS on 16 vCPU), installed on demand with npm
            under perf/.work/ (Java 17 runs its jar); mappings in perf/mocks/wiremock/
"""
import glob
import os
import shutil
import subprocess
import sys

from perf.procs import Proc, pinned, wait_port

HERE = os.path.dirname(os.path.abspath(__file__))
BODIES = os.path.join(HERE, "bodies")
WORK_ROOT = os.path.join(os.path.dirname(HERE), ".work")  # git-ignored scratch space
KINDS = ("nginx", "fastgw", "wiremock")


def render(template_path, out_path, **values):
    """Fill {{NAME}} placeholders (nginx's own `$var` syntax stays untouched)."""
    with open(template_path) as f:
        text = f.read()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", str(value))
    if "{{" in text:
        raise ValueError(f"unfilled placeholder in {template_path}")
    with open(out_path, "w") as f:
        f.write(text)
    return out_path


def nginx_dirs(work):
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        os.makedirs(os.path.join(work, "tmp", sub), exist_ok=True)


def nginx_cmd(name, template, work, **values):
    """Render the config and return the command that runs nginx unprivileged in the foreground, with its own
    prefix, pid and logs under `work`."""
    nginx_dirs(work)
    conf = render(template, os.path.join(work, f"{name}.conf"), WORK=work, **values)
    subprocess.run(["nginx", "-t", "-q", "-p", work, "-c", conf, "-e", "stderr"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return ["nginx", "-p", work, "-c", conf, "-e", os.path.join(work, f"{name}.stderr.log")]


def start_nginx(name, template, work, cpu, **values):
    return Proc(name, pinned(nginx_cmd(name, template, work, **values), cpu), os.path.join(work, f"{name}.log"))


def wiremock_jar():
    """Install the npm package `wiremock` (it carries the standalone jar) under perf/.work/ once."""
    prefix = os.path.join(WORK_ROOT, "wiremock")
    pattern = os.path.join(prefix, "node_modules", "wiremock", "**", "*.jar")
    jars = glob.glob(pattern, recursive=True)
    if not jars:
        os.makedirs(prefix, exist_ok=True)
        print(f"installing WireMock with npm under {prefix} ...", file=sys.stderr)
        subprocess.run(["npm", "install", "--prefix", prefix, "--no-audit", "--no-fund", "wiremock@3"],
                       check=True, stdout=subprocess.DEVNULL)
        jars = glob.glob(pattern, recursive=True)
    if not jars:
        raise RuntimeError(f"no jar found under {prefix}/node_modules/wiremock")
    return jars[0]


def start_wiremock(work, host, port, cpu):
    """WireMock with the seed-like OpenAI mapping; its root dir is assembled under `work`."""
    jar = wiremock_jar()
    root = os.path.join(work, "wiremock-root")
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(os.path.join(HERE, "wiremock", "mappings"), os.path.join(root, "mappings"))
    shutil.copytree(BODIES, os.path.join(root, "__files"))
    cmd = ["java", "-jar", jar, "--bind-address", host, "--port", str(port), "--root-dir", root,
           "--disable-request-logging", "--no-request-journal", "--disable-banner",
           "--async-response-enabled", "true", "--container-threads", "64"]
    return Proc("mock-wiremock", pinned(cmd, cpu), os.path.join(work, "mock-wiremock.log"))


def fastgw_cmd(*args):
    """Run the fastgw CLI with this interpreter (works without the console script being installed)."""
    return [sys.executable, "-c", "import sys; from fastgw.runtime.cli import main; sys.exit(main())", *args]


def start_mock(kind, work, host, port, cpu):
    """Start the mock and return (Proc, description) once it accepts connections."""
    if kind == "nginx":
        proc = start_nginx("mock-nginx", os.path.join(HERE, "nginx-mock.conf"), work, cpu,
                           BODIES=BODIES, HOST=host, PORT=port)
        desc = f"nginx {nginx_version()} serving canned files, 1 worker"
        timeout = 10
    elif kind == "fastgw":
        proc = Proc("mock-fastgw", pinned(fastgw_cmd("mock", "--host", host, "--port", str(port)), cpu),
                    os.path.join(work, "mock-fastgw.log"))
        desc = "fastgw mock (built-in, Python)"
        timeout = 30
    elif kind == "wiremock":
        proc = start_wiremock(work, host, port, cpu)
        desc = "WireMock standalone (npm package `wiremock`), Java 17"
        timeout = 90
    else:
        raise ValueError(f"unknown mock {kind!r}; choose from {KINDS}")
    try:
        wait_port(host, port, proc, timeout)
    except Exception:
        proc.stop()
        raise
    return proc, desc


def nginx_version():
    out = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr
    return out.strip().split("/")[-1]
