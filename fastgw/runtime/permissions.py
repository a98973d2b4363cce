"""Files whose permissions undo the gateway's access control, warned about when it starts (one line per file).

Anyone on the host who can write the config file can send the traffic (and the provider keys) elsewhere; who can
write a policy file, or add one to the policies folder, can give themselves a consumer key. Who can change a
deployment's CA file decides whom the provider keys are sent to. A policy or config file that holds a password (a Redis
URL's) gives it away to whoever can read it. The keys themselves are never in files (a provider's comes from an
environment variable, a consumer's is stored as its SHA-256 digest), so there is no key file to check.

Only warned about, never refused: a container may run with a loose umask on a read-only image.
"""
from __future__ import annotations

import glob
import os
import re
import stat

from fastgw.runtime.config import Config

_PASSWORD_IN_URL = re.compile(rb"://[^/@:\s\"']*:[^/@\s\"']+@|[?&][a-z_]*password=[^&\s\"']")


def loose_files(cfg: Config) -> list[tuple[str, str]]:
    """(path, what is wrong) for each file or folder of `cfg` with permissions looser than it needs."""
    found = []
    if os.path.isfile(cfg.source):             # else the embedded default or --upstream: no file
        found += _check(cfg.source, "config file", secret=_holds_password(cfg.source))   # resources_redis
    if cfg.policies_dir and os.path.isdir(cfg.policies_dir):
        found += _check(cfg.policies_dir, "policies folder")
        for path in sorted(glob.glob(os.path.join(cfg.policies_dir, "*.toml"))):
            found += _check(path, "policy file", secret=_holds_password(path))
    for ca in sorted({d.ca_file for m in cfg.models for d in m.deployments if d.ca_file}):
        found += _check(ca, "CA file")
    return found


def warn_loose_files(cfg: Config, log) -> None:
    for path, problem in loose_files(cfg):
        log.warning("loose file permissions", file=path, problem=problem)


def _check(path: str, what: str, secret: bool = False) -> list[tuple[str, str]]:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return []                              # missing: the config checks say so
    if mode & stat.S_IWOTH:
        verb = "add a policy file to it" if stat.S_ISDIR(mode) else "change it"
        return [(path, f"{what} is world-writable (mode {stat.S_IMODE(mode):o}): anyone on this host can {verb}")]
    if secret and mode & (stat.S_IRWXG | stat.S_IRWXO):
        return [(path, f"{what} holds a password and is open to group or others (mode {stat.S_IMODE(mode):o}); "
                       "chmod 600 it")]
    return []


def _holds_password(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return _PASSWORD_IN_URL.search(f.read()) is not None
    except OSError:
        return False
