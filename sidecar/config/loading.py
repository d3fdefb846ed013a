"""Loading: the layers merged over the defaults, checked across settings, built into a Config.

Precedence, highest first: flags > ``DNS_SIDECAR_*`` environment > TOML file > defaults. Checks
that involve more than one setting run here, after the merge, because the settings involved may
come from different layers (``--min-ttl`` against a file's ``max_ttl``); the error names where
each value came from. Upstreams nobody configured are chosen here too: the ECS resolver, or the
nameservers of resolv.conf that are not ourselves.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from sidecar.addresses import DNS_PORT, HostPort, covers
from sidecar.config.model import GROUPS, Config, Zone
from sidecar.config.names import ENV_PREFIX
from sidecar.config.settings import (
    ECS_METADATA_ENV,
    ECS_RESOLVER,
    ENV_CONFIG,
    SETTINGS,
    SETTINGS_BY_KEY,
    ZONE_OPTION_SETTINGS,
)
from sidecar.config.sources import (
    Layer,
    build_arg_parser,
    cli_layer,
    env_layer,
    file_layer,
    read_toml,
)
from sidecar.config.zone_kinds import ZoneMap
from sidecar.errors import ConfigError
from sidecar.resolv_conf import DEFAULT_PATH as DEFAULT_RESOLV_CONF
from sidecar.resolv_conf import original_nameservers, our_nameserver

_NO_ENV: Mapping[str, str] = MappingProxyType({})


def _merge(layers: Sequence[Layer]) -> Layer:
    merged: Layer = {}
    for layer in layers:
        for key, (value, source) in layer.items():
            if key in merged:
                value = SETTINGS_BY_KEY[key].kind.merge(merged[key][0], value)
            merged[key] = (value, source)
    return merged


def _default_upstreams(
    listen: Sequence[HostPort], env: Mapping[str, str], resolv_conf: str, *, managed: bool = False
) -> tuple[tuple[HostPort, ...], str]:
    """Upstreams when none are configured.

    Normally the ECS resolver on ECS, else the first usable nameserver of resolv.conf. With
    ``managed`` (manage_resolv_conf) resolv.conf comes first and all its usable nameservers
    are taken (from the original it carries when we rewrote it before), then the ECS resolver.
    """
    on_ecs = bool(env.get(ECS_METADATA_ENV))
    if on_ecs and not managed:
        return (HostPort(ECS_RESOLVER, DNS_PORT),), "ecs"
    usable: list[HostPort] = []
    for ns in original_nameservers(resolv_conf):
        if ns not in usable and not any(
            covers(ours, ns, wildcard_covers_all=True) for ours in listen
        ):
            usable.append(ns)
    if usable:
        return (tuple(usable) if managed else (usable[0],)), "resolv.conf"
    if on_ecs:
        return (HostPort(ECS_RESOLVER, DNS_PORT),), "ecs"
    raise ConfigError(
        "upstreams",
        "",
        f"no upstream given and no usable nameserver in {resolv_conf} (one that is not our own "
        f"listen address); set upstreams, {ENV_PREFIX}UPSTREAMS or --upstream",
    )


def _check_no_loop(
    upstreams: Sequence[HostPort], listen: Sequence[HostPort], key: str, listen_key: str
) -> None:
    for hp in upstreams:
        for ours in listen:
            if covers(ours, hp, wildcard_covers_all=False):
                raise ConfigError(
                    key,
                    str(hp),
                    f"this is our own listen address {ours} ({listen_key}): forwarding to "
                    "ourselves would loop",
                )


def _with_zone_options(
    zones: tuple[Zone, ...], options: Mapping[str, tuple[Mapping[str, Any], str]]
) -> tuple[Zone, ...]:
    """Zones with the per-zone flags applied (--health-check, --max-answers, --cloudmap); a
    flag may name a zone that has no table of its own: it then uses the default upstreams."""
    by_name = {zone.name: zone for zone in zones}
    for field_name, (per_zone, _key) in options.items():
        for name, value in per_zone.items():
            zone = by_name.get(name) or Zone(name, ())
            by_name[name] = dataclasses.replace(zone, **{field_name: value})
    for zone in by_name.values():
        if zone.cloudmap_namespace and importlib.util.find_spec("boto3") is None:
            raise ConfigError(
                options["cloudmap_namespace"][1],
                zone.cloudmap_namespace,
                "Cloud Map needs boto3: pip install 'ecs-dns-sidecar[cloudmap]'",
            )
        discovery_only = ("max_answers", "cloudmap_namespace", "synthesize_a")
        given = [name for name in discovery_only if getattr(zone, name)]
        if zone.health_check is None and given:
            key = options[given[0]][1]
            raise ConfigError(
                key, zone.name, "only for a discovery zone: give it a health check too"
            )
    return tuple(by_name.values())


def build(layers: Sequence[Layer], env: Mapping[str, str], resolv_conf: str) -> Config:
    """Merge the layers (lowest first) over the defaults; check across settings."""
    merged = _merge(layers)
    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    for s in SETTINGS:
        value, source[s.key] = merged.get(s.key, (s.default, s.key))
        values[s.key] = s.kind.finish(value)

    if values["cache.max_ttl"] < values["cache.min_ttl"]:
        raise ConfigError(
            source["cache.max_ttl"],
            values["cache.max_ttl"],
            f"must be >= min_ttl ({values['cache.min_ttl']}, from {source['cache.min_ttl']})",
        )
    if values["query_timeout"] < values["attempt_timeout"]:
        raise ConfigError(
            source["query_timeout"],
            values["query_timeout"],
            f"must be >= attempt_timeout ({values['attempt_timeout']}, "
            f"from {source['attempt_timeout']})",
        )

    listen: tuple[HostPort, ...] = values["listen"]
    upstreams: tuple[HostPort, ...] | None = values["upstreams"]
    if "resolv_conf_path" in merged:
        resolv_conf = values["resolv_conf_path"]
    managed: bool = values["manage_resolv_conf"]
    if managed:
        our_nameserver(listen, source["manage_resolv_conf"])  # port 53, or a config error
    if upstreams is None:
        upstreams, upstream_source = _default_upstreams(listen, env, resolv_conf, managed=managed)
    else:
        upstream_source = "configured"
    _check_no_loop(upstreams, listen, source["upstreams"], source["listen"])
    zone_map: ZoneMap = merged.get("zones", ({}, ""))[0]
    for zone, zone_key in zone_map.values():
        _check_no_loop(zone.upstreams, listen, zone_key, source["listen"])

    zones = _with_zone_options(
        values["zones"],
        {
            "health_check": (values["health_checks"], source["health_checks"]),
            "max_answers": (values["max_answers"], source["max_answers"]),
            "cloudmap_namespace": (values["cloudmap"], source["cloudmap"]),
            "synthesize_a": (values["synthesize_a"], source["synthesize_a"]),
        },
    )
    fields: dict[str, Any] = {
        key: value
        for key, value in values.items()
        if "." not in key and key not in ("listen", "upstreams", "zones", *ZONE_OPTION_SETTINGS)
    }
    fields["resolv_conf_path"] = resolv_conf
    for group, settings_type in GROUPS.items():
        prefix = group + "."
        fields[group] = settings_type(
            **{key[len(prefix) :]: v for key, v in values.items() if key.startswith(prefix)}
        )
    return Config(
        listen=listen, upstreams=upstreams, upstream_source=upstream_source, zones=zones, **fields
    )


def load(
    argv: Sequence[str], env: Mapping[str, str], *, resolv_conf: str = DEFAULT_RESOLV_CONF
) -> Config:
    """The configuration of a run: ``argv`` are the run flags (argparse exits on unknown flags)."""
    args = build_arg_parser().parse_args(list(argv))
    layers: list[Layer] = []
    path = args.config or env.get(ENV_CONFIG, "").strip()
    if path:
        layers.append(file_layer(read_toml(path)))
    layers.append(env_layer(env))
    layers.append(cli_layer(args))
    return build(layers, env, resolv_conf)


def value_from_sources(key: str, env: Mapping[str, str], config_path: str | None = None) -> Any:
    """One setting as the running sidecar sees it from its file and environment (not its
    flags): for the helper commands (healthcheck, status) that run beside it."""
    value = SETTINGS_BY_KEY[key].default
    path = config_path or env.get(ENV_CONFIG, "").strip()
    layers = [file_layer(read_toml(path))] if path else []
    layers.append(env_layer(env))
    for layer in layers:
        if key in layer:
            value = layer[key][0]
    return SETTINGS_BY_KEY[key].kind.finish(value)


def load_file(
    path: str, *, env: Mapping[str, str] = _NO_ENV, resolv_conf: str = DEFAULT_RESOLV_CONF
) -> Config:
    """The configuration of one file over the defaults (for check-config).

    ``env`` is only consulted for upstream defaulting (``ECS_CONTAINER_METADATA_URI_V4``);
    ``DNS_SIDECAR_*`` variables are not layered on top.
    """
    return build([file_layer(read_toml(path))], env, resolv_conf)
