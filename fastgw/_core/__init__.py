"""Compiled hot path of fastgw (Cython). Sans-IO: nothing here touches a socket, the loop or a policy.

There is no slow pure-Python fallback: `import fastgw` fails loudly when an extension is not built.
"""
import importlib
import os

# Every compiled module a working install must have: the sans-IO core, the connection glue above it, and
# the compiled paths of built-in policies.
MODULES = ("fastgw._core.http", "fastgw._core.sse", "fastgw._core.tokens", "fastgw._core.bucket",
           "fastgw._core.jsonpeek", "fastgw.exchange", "fastgw.gateway", "fastgw.connection", "fastgw.router",
           "fastgw.stats", "fastgw.linebuf", "fastgw.policies.auth_lookup",
           "fastgw.policies.ratelimit_admission")


def check_built() -> None:
    root = os.path.dirname(os.path.dirname(__file__))
    # In a source checkout, check the modules whose .pyx is present (a module under construction has
    # none yet); in an installed wheel no .pyx ships, so every module is required.
    sources = {n for n in MODULES if os.path.exists(os.path.join(root, *n.split(".")[1:]) + ".pyx")}
    required = sources or set(MODULES)
    missing = []
    for name in sorted(required):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            missing.append(f"{name} ({exc})")
    if missing:
        raise ImportError(
            "fastgw's compiled modules are not built: "
            + "; ".join(missing)
            + ". Build them with `pip install -e .` (or `python setup.py build_ext --inplace`) "
            "from the repository root; Cython and a C compiler are needed."
        )
