"""Command line: `fastgw serve | mock | check-config | hash-key`, and `fastgw --version`."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

from fastgw import __version__
from fastgw.runtime import config
from fastgw.observability.logs import Logger


def _run_dir() -> str:
    """A directory shared by the workers (metrics snapshots, shared-memory buckets): on tmpfs when there is one."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="fastgw-", dir=base)


def _config_loader(args) -> callable:
    """A function that loads the config the way the command line says; used at start and on every SIGHUP."""

    def load() -> config.Config:
        if args.upstream:
            cfg = config.single_upstream(args.upstream, args.upstream_key_env or "")
            config.apply_env(cfg, os.environ)
        else:
            cfg = config.load(args.config)
        s = cfg.server
        overridden = False
        for name in ("host", "port", "workers", "access_log"):
            value = getattr(args, name)
            if value is not None:
                setattr(s, name, value)
                overridden = True
        if overridden:
            config.check(cfg)       # e.g. --port now equal to the admin port
        return cfg

    return load


def cmd_serve(args) -> int:
    from fastgw.runtime.permissions import warn_loose_files
    from fastgw.runtime.preflight import check_usable
    from fastgw.runtime.supervisor import Supervisor, available_cpus
    from fastgw.runtime.worker import run_worker

    log = Logger()
    load = _config_loader(args)
    try:
        cfg = load()
        check_usable(cfg)
    except config.ConfigError as exc:
        print(f"fastgw: {exc}", file=sys.stderr)
        return 2
    n = cfg.server.workers or available_cpus()
    run_dir = _run_dir()
    # The config in force: what a new or restarted worker starts with, and (published in run_dir) what every
    # worker applies on SIGHUP. Only a config that passed check_usable ever gets here.
    state = {"cfg": cfg}
    config.publish(cfg, run_dir)

    def reload() -> bool:
        """Raises ConfigError (the supervisor logs it, the workers are not signalled) for a config they would refuse."""
        new = load()
        check_usable(new)   # what the workers would do with it, done here first
        warn_loose_files(new, log)
        config.publish(new, run_dir)
        state["cfg"] = new
        return True

    def target(index: int) -> int:
        return run_worker(index, state["cfg"], lambda: config.in_force(run_dir), run_dir, log.bind(index))

    log.info("fastgw starting", version=__version__, workers=n, host=cfg.server.host, port=cfg.server.port,
             config=cfg.source)
    warn_loose_files(cfg, log)
    try:
        return Supervisor(n, target, drain_timeout=cfg.server.drain_timeout + cfg.server.shutdown_delay,
                          reload=reload, log=log).run()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def cmd_mock(args) -> int:
    from fastgw.devtools.mock import run_mock

    return run_mock(args.host, args.port)


def cmd_check_config(args) -> int:
    try:
        cfg = config.load(args.file)
        from fastgw.runtime.preflight import check_usable

        check_usable(cfg)
    except config.ConfigError as exc:
        print(f"fastgw: {exc}", file=sys.stderr)
        return 2
    print(f"{args.file}: ok ({len(cfg.models)} models)")
    return 0


def cmd_hash_key(args) -> int:
    from fastgw.policies.auth.policy import hash_key_main

    return hash_key_main(args.key)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fastgw", description="An OpenAI-compatible AI gateway.")
    ap.add_argument("--version", action="version", version=f"fastgw {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gateway (no arguments: a built-in mock upstream, no keys needed)")
    s.add_argument("--config", help="TOML config file (default: $FASTGW_CONFIG or the embedded default)")
    s.add_argument("--workers", type=int, help="worker processes (default: the CPUs this process may use)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--access-log", dest="access_log", help='"-" (stdout), a file, or "off"')
    s.add_argument("--upstream", help="proxy every model to this OpenAI-compatible base URL (no config file)")
    s.add_argument("--upstream-key-env", help="environment variable holding the --upstream key")
    s.set_defaults(func=cmd_serve)

    m = sub.add_parser("mock", help="run the built-in mock OpenAI upstream alone")
    m.add_argument("--host", default="127.0.0.1")
    m.add_argument("--port", type=int, default=9000)
    m.set_defaults(func=cmd_mock)

    c = sub.add_parser("check-config", help="validate a config file and its policies")
    c.add_argument("file")
    c.set_defaults(func=cmd_check_config)

    h = sub.add_parser("hash-key", help="print the hash of an API key (or of each stdin line; --new makes a key)")
    h.add_argument("key", nargs=argparse.REMAINDER)
    h.set_defaults(func=cmd_hash_key)

    args = ap.parse_args(argv)
    if args.command == "serve" and args.upstream and args.config:
        ap.error("--upstream and --config exclude each other")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
