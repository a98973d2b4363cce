"""Build, once and outside any worker, everything a worker builds from a config, so that a config a worker would
refuse never reaches one.

A worker's Gateway.apply builds the routes (reading every deployment's provider key from its environment
variable) and the policy pipeline with fastgw.proxy.gateway.build; `check_usable` calls the same function and
throws the result away. `fastgw serve` calls it at start and on every SIGHUP before signalling the workers, `fastgw check-config`
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
    from fastgw.proxy.gateway import build

    run_dir = tempfile.mkdtemp(prefix="fastgw-check-")   # policies may create shared memory: not the real one
    try:
        _, pipeline = build(cfg, PolicyContext(Logger(), None, run_dir, "check", cfg), PLACEHOLDER_MOCK_URL)
        pipeline.close()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
