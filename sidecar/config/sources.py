"""The three sources, each read into a layer: the TOML file, the ``DNS_SIDECAR_*`` environment
and the command-line flags (whose parser is built here, from the same table).

A layer maps a setting's key to its parsed value and the name the operator used for it, so a
check made later, across settings, can still name the right key, variable or flag. Nothing is
merged here: every source is read and checked on its own.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

from sidecar import __version__
from sidecar.config.names import ENV_PREFIX, unknown_key
from sidecar.config.settings import (
    ENV_CONFIG,
    KNOWN_ENV,
    SETTINGS,
    SETTINGS_BY_ENV,
    SETTINGS_BY_KEY,
    TABLES,
)
from sidecar.errors import ConfigError

# A layer: setting key -> (parsed value, the key as the operator spelled it).
Layer = dict[str, tuple[Any, str]]


def read_toml(path: str) -> dict[str, Any]:
    """Read a TOML file; an unreadable or malformed file is a ConfigError on key ``config``."""
    import tomllib  # lazy: most sidecars run from flags and the environment alone

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError("config", path, f"cannot read the file: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        message = " ".join(str(e).split())
        raise ConfigError("config", path, f"not valid TOML: {message}") from None


def file_layer(doc: Mapping[str, Any], prefix: str = "") -> Layer:
    """The settings of a parsed TOML document; unknown keys at any depth are errors."""
    layer: Layer = {}
    for name, value in doc.items():
        key = prefix + name
        setting = SETTINGS_BY_KEY.get(key)
        if setting is not None:
            layer[key] = (setting.kind.from_toml(value, key), key)
        elif key in TABLES:
            if not isinstance(value, dict):
                raise ConfigError(key, value, f"a table: [{key}]")
            layer.update(file_layer(value, key + "."))
        else:
            known = sorted(
                {k[len(prefix) :].split(".")[0] for k in SETTINGS_BY_KEY if k.startswith(prefix)}
            )
            raise unknown_key(key, value, known)
    return layer


def env_layer(env: Mapping[str, str]) -> Layer:
    """The ``DNS_SIDECAR_*`` variables; an empty one counts as unset, an unknown one is an error."""
    layer: Layer = {}
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        if name not in KNOWN_ENV:
            raise unknown_key(name, env[name], sorted(KNOWN_ENV))
        setting = SETTINGS_BY_ENV.get(name)
        if setting is None or not env[name].strip():
            continue
        layer[setting.key] = (setting.kind.from_text(env[name], name), name)
    return layer


HELP_WIDTH = 100  # columns of --help when COLUMNS does not say


def help_formatter(prog: str) -> argparse.HelpFormatter:
    """argparse makes a formatter for every add_argument (to check its metavar), and its own
    asks the terminal's size each time, importing shutil (and with it bz2 and lzma, before
    cli.py can leave them out): ~4 ms of every start. Help is wrapped at COLUMNS instead."""
    columns = os.environ.get("COLUMNS", "")
    width = int(columns) if columns.isdigit() and int(columns) > 20 else HELP_WIDTH
    return argparse.HelpFormatter(prog, width=width - 2)  # as shutil's width, less 2


def build_arg_parser() -> argparse.ArgumentParser:
    """The flags of ``dns-sidecar [run]``, one per setting plus --config and --version."""
    parser = argparse.ArgumentParser(
        prog="dns-sidecar",
        formatter_class=help_formatter,
        description="A DNS caching proxy sidecar for Amazon ECS tasks. Each flag overrides its "
        "environment variable, which overrides the config file.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config", metavar="FILE", help=f"TOML config file (env {ENV_CONFIG})", default=None
    )
    for s in SETTINGS:
        parser.add_argument(
            s.flag,
            dest=s.key,
            metavar=s.kind.metavar,
            action="append" if s.repeat else "store",
            nargs=s.kind.nargs,
            const=s.kind.const,
            default=None,
            help=f"{s.help}{'; repeatable' if s.repeat else ''} "
            f"(env {s.env}; default: {s.shown_default})".replace("%", "%%"),
        )
    return parser


def cli_layer(args: argparse.Namespace) -> Layer:
    """The settings given as flags; values are parsed here so errors name the flag."""
    layer: Layer = {}
    given = vars(args)
    for s in SETTINGS:
        raw = given.get(s.key)
        if raw is None:
            continue
        text = s.kind.separator.join(raw) if isinstance(raw, list) else raw
        layer[s.key] = (s.kind.from_text(text, s.flag), s.flag)
    return layer
