"""Build, once and outside any worker, everything a worker builds from a config, so that a config a worker would
refuse never reaches one.

A worker's Gateway.apply builds the routes (reading every deployment's provider key from its environment
variable) and the policy pipeline; `check_usable` calls the same Router and load_pipeline and throws the result
away. `fastgw serve` calls it at start and on every SIGHUP before signalling the workers, `fastgw check-config`
calls it too: a config the supervisor accepts is one the workers accept.
"""
from __future__ import annotations

import shutil
import tempfile

from fastgw.runtime.config import Config

# Any address will do: the routes are built to be checked, never used.
PLACEHOLDER_MOCK_URL = "http://127.0.0.1:1/v1"


def check_usable(cfg: Config) -> None:
    """Raises ConfigError (naming the file and the field) when a worker could not apply `cfg`."""
    from fastgw.observability.logs import Logger
    from fastgw.policies.api import PolicyContext
    from fastgw.policies.pipeline import load_pipeline
    from fastgw.routing.router import Router

    Router(cfg, mock_url=PLACEHOLDER_MOCK_URL)
    if not cfg.policies_dir:
        return
    run_dir = tempfile.mkdtemp(prefix="fastgw-check-")   # policies may create shared memory: not the real one
    try:
        load_pipeline(cfg, PolicyContext(Logger(), None, run_dir, "check", cfg)).close()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
