"""Configuration: the model, one table of settings, and the three sources that fill it.

Precedence, highest first: CLI flags > ``DNS_SIDECAR_*`` environment > TOML file > defaults.
Every setting is one row of ``SETTINGS``; the file walker, the environment reader, the CLI
parser, the defaults and the error messages are all driven by that table, so a new setting is
one new row (plus its field on the model).

Everything is checked at start and any problem raises ``ConfigError(key, value, allowed)``
where ``key`` is spelled the way the operator wrote it: the dotted file key (``cache.max_ttl``),
the environment variable (``DNS_SIDECAR_CACHE_MAX_TTL``) or the flag (``--max-ttl``).

Sans-IO apart from reading the TOML file (and resolv.conf, through ``sidecar.resolv_conf``).

The modules, each with one job: ``model`` (what a configuration is), ``names`` (zone names and
misspelt keys), ``kinds`` and ``zone_kinds`` (how each value is read and checked), ``settings``
(the table), ``sources`` (file, environment and flags, each into a layer) and ``loading`` (the
layers into a Config). Other modules import from here, not from those.
"""

from sidecar.config.loading import build, load, load_file, value_from_sources
from sidecar.config.model import (
    GROUPS,
    Config,
    DiscoverySettings,
    HealthCheck,
    TcpSettings,
    UpstreamSettings,
    Zone,
)
from sidecar.config.settings import (
    ECS_METADATA_ENV,
    ECS_RESOLVER,
    ENV_CONFIG,
    KNOWN_ENV,
    SETTINGS,
    SETTINGS_BY_KEY,
    ZONE_OPTION_SETTINGS,
    Setting,
)
from sidecar.config.sources import (
    Layer,
    build_arg_parser,
    cli_layer,
    env_layer,
    file_layer,
    read_toml,
)

__all__ = [
    "ECS_METADATA_ENV",
    "ECS_RESOLVER",
    "ENV_CONFIG",
    "GROUPS",
    "KNOWN_ENV",
    "SETTINGS",
    "SETTINGS_BY_KEY",
    "ZONE_OPTION_SETTINGS",
    "Config",
    "DiscoverySettings",
    "HealthCheck",
    "Layer",
    "Setting",
    "TcpSettings",
    "UpstreamSettings",
    "Zone",
    "build",
    "build_arg_parser",
    "cli_layer",
    "env_layer",
    "file_layer",
    "load",
    "load_file",
    "read_toml",
    "value_from_sources",
]
