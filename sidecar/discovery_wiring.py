"""The discovery zones' parts of a running sidecar, made from its configuration: the zones'
shaping settings, the endpoint table's settings, the Cloud Map sources and the background work
(active probes, passive health, Cloud Map polling).

app.py imports this module, and through it the rest of discovery/, only when the configuration
has a discovery zone (a zone with a health check): a sidecar without one starts ~20 ms sooner
and holds none of it in memory (bench/NOTES.md, 2026-12-06). tests/test_discovery_wiring.py
checks that a plain configuration serves without importing any of it.
"""

from __future__ import annotations

import os
from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any

from sidecar import logs
from sidecar.config import Config
from sidecar.core.counters import Counters
from sidecar.discovery import passive_reader
from sidecar.discovery.cloudmap import CloudMapSource, learn_local_az, run_cloudmap
from sidecar.discovery.endpoints import EndpointTable, ProbeSettings
from sidecar.discovery.passive import PROBE_STRETCH, PassiveSettings
from sidecar.discovery.probes import run_probes
from sidecar.discovery.shaping import ShapeSettings
from sidecar.discovery.zone import DiscoveryZone

if TYPE_CHECKING:
    from sidecar.pipeline import Resolver


def cloudmap_sources(config: Config) -> dict[str, CloudMapSource]:
    """One Cloud Map source per discovery zone that asks for one. An endpoint URL from
    AWS_ENDPOINT_URL_SERVICEDISCOVERY / AWS_ENDPOINT_URL is passed explicitly, which also
    stops botocore from prefixing it with `data-`."""
    url = os.environ.get("AWS_ENDPOINT_URL_SERVICEDISCOVERY") or os.environ.get("AWS_ENDPOINT_URL")
    return {
        zone.name: CloudMapSource(zone.name, zone.cloudmap_namespace, endpoint_url=url or None)
        for zone in config.discovery_zones()
        if zone.cloudmap_namespace
    }


def discovery_zones(
    config: Config, cloudmap: Mapping[str, CloudMapSource]
) -> dict[str, DiscoveryZone]:
    """The pipeline's view of each discovery zone, by zone name."""
    return {
        zone.name: DiscoveryZone(
            ShapeSettings(
                max_answers=zone.max_answers,
                answer_ttl=config.discovery.answer_ttl,
                slow_start=config.discovery.slow_start,
                zone_affinity=config.discovery.zone_affinity == "prefer",
            ),
            cloudmap[zone.name].add_service if zone.name in cloudmap else None,
            negative_ttl=config.discovery.negative_ttl,
            synthesize_a=bool(zone.synthesize_a),
            registry=cloudmap.get(zone.name),
        )
        for zone in config.discovery_zones()
    }


def probe_settings(config: Config) -> ProbeSettings:
    return ProbeSettings(
        interval=config.discovery.probe_interval,
        timeout=config.discovery.probe_timeout,
        rise=config.discovery.rise,
        fall=config.discovery.fall,
        forget_after=config.discovery.forget_after,
        max_endpoints=config.discovery.max_endpoints,
        stretch=PROBE_STRETCH if config.discovery.passive_health == "on" else 1.0,
        max_per_second=config.discovery.max_probes_per_second,
    )


def passive_settings(config: Config) -> PassiveSettings:
    return PassiveSettings(
        interval=config.discovery.passive_interval,
        connect_timeout=config.discovery.passive_connect_timeout,
    )


def endpoint_table(config: Config, metrics: Counters, kept: EndpointTable | None) -> EndpointTable:
    """The endpoint table under `config`'s probe settings: `kept` (a reload keeps endpoint
    health), or a new one."""
    if kept is None:
        return EndpointTable(
            probe_settings(config),
            probes=metrics.endpoint_probes,
            passive_demotions=metrics.endpoint_passive_demotions,
        )
    kept.settings = probe_settings(config)
    return kept


def background_work(
    config: Config, resolver: Resolver, cloudmap: Mapping[str, CloudMapSource]
) -> list[Coroutine[Any, Any, None]]:
    """What runs beside the listeners for the discovery zones: active probes, passive health
    (where the kernel allows it), learning the local availability zone, Cloud Map polling."""
    table = resolver.endpoints
    assert table is not None  # a resolver with discovery zones has its endpoint table
    checks = {z.name: z.health_check for z in config.zones if z.health_check is not None}
    work: list[Coroutine[Any, Any, None]] = [
        run_probes(
            table,
            checks,
            timeout=config.discovery.probe_timeout,
            max_concurrent=config.discovery.max_probes,
            clock=resolver.clock,
        )
    ]
    if config.discovery.passive_health == "on":
        why_not = passive_reader.unavailable()
        if why_not is None:
            work.append(
                passive_reader.run_passive_health(
                    table, checks, passive_settings(config), resolver.clock
                )
            )
        else:
            logs.get().warning("passive health off", extra={"fields": {"reason": why_not}})
    if cloudmap and config.discovery.zone_affinity == "prefer":
        work.append(learn_local_az(table))
    for source in cloudmap.values():
        work.append(
            run_cloudmap(
                source,
                table,
                interval=config.discovery.cloudmap_interval,
                clock=resolver.clock,
                forget_after=config.discovery.forget_after,
            )
        )
    return work
