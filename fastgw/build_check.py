"""`import fastgw` fails loudly when a compiled module is not built: there is no slow pure-Python fallback."""
import importlib
import os

# Every compiled module a working install must have; setup.py builds every .pyx under fastgw/.
MODULES = (
    "fastgw.protocol.http", "fastgw.protocol.sse", "fastgw.protocol.jsonpeek", "fastgw.protocol.websocket",
    "fastgw.tokens.estimate",
    "fastgw.providers.base", "fastgw.providers.openai",
    "fastgw.proxy.exchange", "fastgw.proxy.gateway", "fastgw.proxy.phases", "fastgw.proxy.upstream",
    "fastgw.proxy.relay", "fastgw.proxy.client", "fastgw.proxy.realtime",
    "fastgw.routing.router",
    "fastgw.observability.stats", "fastgw.observability.linebuf", "fastgw.observability.accounting",
    "fastgw.policies.auth.lookup", "fastgw.policies.ratelimit.admission", "fastgw.policies.ratelimit.bucket",
    "fastgw.runtime.shm", "fastgw.routing.breaker", "fastgw.cache.key", "fastgw.cache.store", "fastgw.cache.cache",
)


def check_built() -> None:
    package = os.path.dirname(os.path.abspath(__file__))
    # In a source checkout, check the modules whose .pyx is present (a module under construction has
    # none yet); in an installed wheel no .pyx ships, so every module is required.
    sources = {n for n in MODULES if os.path.exists(os.path.join(package, *n.split(".")[1:]) + ".pyx")}
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
