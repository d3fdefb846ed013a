"""The console entry point: ``dns-sidecar [run] [flags]`` and ``dns-sidecar check-config FILE``.

A configuration error is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from sidecar.config import Config, build_arg_parser, load, load_file
from sidecar.errors import ConfigError

Command = Callable[[list[str]], int]


# Standard modules that the server's dependencies import only as optional extras and that
# the sidecar never uses: shutil's bz2/lzma archive support (pulled in by prometheus-client's
# exposition imports), and OpenSSL's hash module (hashlib and hmac fall back to Python's own
# implementations, which is all the sidecar's tokens and an optional boto3 need). Blocked
# before the server imports anything, they leave ~0.5 MiB of RSS out of the running sidecar
# (~28 MiB idle); an import of one of them raises ImportError, which all their importers expect.
UNUSED_MODULES = ("bz2", "lzma", "_hashlib")


def _leave_out_unused_modules() -> None:
    for name in UNUSED_MODULES:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # None: "not importable"


def _run(args: list[str]) -> int:
    """serve DNS (the default): dns-sidecar [run] [flags]"""
    config = load(args, os.environ)
    _leave_out_unused_modules()
    from sidecar.app import run  # lazy: check-config and --help need no event loop

    # SIGHUP reads the same sources again (the file may have changed).
    return run(config, reload=lambda: load(args, os.environ))


def _summary(config: Config) -> str:
    listen = ", ".join(str(hp) for hp in config.listen)
    upstreams = ", ".join(str(hp) for hp in config.upstreams)
    zones = ", ".join(zone.name for zone in config.zones) or "none"
    return f"listen {listen}; upstreams {upstreams} ({config.upstream_source}); zones {zones}"


def _check_config(args: list[str]) -> int:
    """check a config file and exit: dns-sidecar check-config FILE"""
    parser = argparse.ArgumentParser(
        prog="dns-sidecar check-config",
        description="Check a TOML config file (over the defaults) and exit: 0 if it is valid, "
        "2 with one line naming the bad key if not.",
    )
    parser.add_argument("file", metavar="FILE")
    path: str = parser.parse_args(args).file
    config = load_file(path, env=os.environ)
    print(f"ok: {path} ({_summary(config)})")
    return 0


def _healthcheck(args: list[str]) -> int:
    """exit 0 if the local sidecar answers DNS: dns-sidecar healthcheck [--address HOST:PORT]"""
    from sidecar.healthcheck import main as healthcheck  # lazy, like the app

    return healthcheck(args)


def _status(args: list[str]) -> int:
    """print the endpoint table of a running sidecar: dns-sidecar status [--json]"""
    from sidecar import status

    return status.main(args)


# Name -> (what it runs, what --help says). Help texts are strings here, not docstrings: the
# image runs with PYTHONOPTIMIZE=2, which drops docstrings.
COMMANDS: dict[str, tuple[Command, str]] = {
    "run": (_run, "serve DNS (the default): dns-sidecar [run] [flags]"),
    "check-config": (_check_config, "check a config file and exit: dns-sidecar check-config FILE"),
    "healthcheck": (
        _healthcheck,
        "exit 0 if the local sidecar answers DNS: dns-sidecar healthcheck [--address HOST:PORT]",
    ),
    "status": (
        _status,
        "print the endpoint table of a running sidecar: dns-sidecar status [--json]",
    ),
}


def _print_help() -> None:
    parser = build_arg_parser()
    parser.usage = "dns-sidecar [COMMAND] [flags]"
    lines = [f"  {name:<14} {text}" for name, (_cmd, text) in COMMANDS.items()]
    print(parser.format_help().rstrip() + "\n\ncommands:\n" + "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-h"], ["--help"]):
        _print_help()
        return 0
    known = COMMANDS.get(args[0]) if args else None
    command: Command = _run
    if known is not None:
        command, args = known[0], args[1:]
    try:
        return command(args)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    except SystemExit as e:  # argparse: --help, --version, a usage error
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
