"""The configuration model: what a loaded configuration is, apart from how it was read.

Frozen dataclasses, so a running sidecar can hold one and compare it with a reloaded one
(``routing()``); they know nothing of TOML, variables or flags, and every value in them has
been checked already. Their defaults agree with the SETTINGS table (a test holds them to it),
so a Config built in code, as the tests and the benchmark do, means the same as one loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sidecar.addresses import HostPort
from sidecar.core.access import DEFAULT_ALLOW, IpNetwork, parse_networks
from sidecar.core.cache import CacheSettings
from sidecar.resolv_conf import DEFAULT_PATH as DEFAULT_RESOLV_CONF

DEFAULT_ALLOW_NETWORKS = parse_networks(DEFAULT_ALLOW)


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """How discovery endpoints are probed: `tcp:PORT` (a connect succeeds) or `http:PORT/PATH`
    (a GET answers 2xx or 3xx)."""

    kind: str
    port: int
    path: str = "/"

    def __str__(self) -> str:
        return f"tcp:{self.port}" if self.kind == "tcp" else f"http:{self.port}{self.path}"


@dataclass(frozen=True, slots=True)
class Zone:
    """A domain (lowercase, no trailing dot) whose questions go to their own upstreams."""

    name: str
    upstreams: tuple[HostPort, ...]
    policy: str | None = None  # None: the global upstream.policy
    answer_order: str | None = None  # None: the global answer_order
    health_check: HealthCheck | None = None  # set: a discovery zone, its answers are shaped
    max_answers: int | None = None  # discovery zones: keep only the first N after shaping
    cloudmap_namespace: str | None = None  # discovery zones: also ask Cloud Map for health
    synthesize_a: bool | None = None  # discovery zones: A/AAAA from the SRV targets' addresses

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {"upstreams": [str(hp) for hp in self.upstreams]}
        for name in (
            "policy", "answer_order", "health_check", "max_answers", "cloudmap_namespace",
            "synthesize_a",
        ):  # fmt: skip
            value = getattr(self, name)
            if value is not None:
                out[name] = str(value) if isinstance(value, HealthCheck) else value
        return out


@dataclass(frozen=True, slots=True)
class TcpSettings:
    """Client TCP connections (``[tcp]``): how long they may idle, how many, how slow."""

    idle_timeout: float = 10.0
    max_connections: int = 256
    message_timeout: float = 2.0


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """How upstreams are chosen and watched (``[upstream]``)."""

    policy: str = "sequential"  # zones without a policy of their own use this one
    max_fails: int = 2
    probe_name: str = "."
    probe_interval: float = 1.0
    max_inflight: int = 1000
    max_packets_per_second: int = 900  # 0: no budget (core/packet_budget.py)


@dataclass(frozen=True, slots=True)
class DiscoverySettings:
    """How the endpoints of discovery zones are probed and their answers shaped
    (``[discovery]``)."""

    probe_interval: float = 1.0
    probe_timeout: float = 0.5
    rise: int = 2
    fall: int = 2
    forget_after: float = 300.0
    answer_ttl: int = 5
    negative_ttl: int = 5
    slow_start: float = 0.0
    zone_affinity: str = "prefer"
    max_probes: int = 64
    max_probes_per_second: float = 200.0
    max_endpoints: int = 4096
    cloudmap_interval: float = 10.0
    passive_health: str = "on"  # "on" | "off"
    passive_interval: float = 0.25
    passive_connect_timeout: float = 1.0


# The settings groups: a dotted key "group.name" is field "name" of Config.group, whose type
# is this. Loading builds each group from its keys; a test holds the table and these together.
GROUPS: dict[str, type[Any]] = {
    "cache": CacheSettings,
    "tcp": TcpSettings,
    "upstream": UpstreamSettings,
    "discovery": DiscoverySettings,
}


@dataclass(frozen=True, slots=True)
class Config:
    """A whole configuration: the settings without a group, then one field per group."""

    listen: tuple[HostPort, ...]
    upstreams: tuple[HostPort, ...]
    upstream_source: str  # "configured" | "ecs" | "resolv.conf"
    zones: tuple[Zone, ...]
    cache: CacheSettings = field(default_factory=CacheSettings)
    tcp: TcpSettings = field(default_factory=TcpSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    discovery: DiscoverySettings = field(default_factory=DiscoverySettings)
    attempt_timeout: float = 1.0
    query_timeout: float = 4.0
    log_format: str = "json"
    log_level: str = "info"
    max_pending: int = 4096
    udp_reader_thread: bool = True  # a thread reads each UDP socket and answers hits itself
    drain_seconds: float = 2.0
    metrics_listen: HostPort = HostPort("127.0.0.1", 9153)  # noqa: RUF009  # frozen
    log_queries: float = 0.0
    workers: int = 1
    allow: tuple[IpNetwork, ...] = DEFAULT_ALLOW_NETWORKS
    rate_limit: int = 0  # queries per second per client over UDP; 0: off
    answer_order: str = "rotate"  # "rotate" | "upstream"; a zone may set its own
    manage_resolv_conf: bool = False  # rewrite resolv.conf to us at start, restore at exit
    resolv_conf_path: str = DEFAULT_RESOLV_CONF

    def discovery_zones(self) -> tuple[Zone, ...]:
        """The discovery zones: those with a health check, whose answers are shaped. Without
        one, no discovery module is imported (sidecar/discovery_wiring.py)."""
        return tuple(zone for zone in self.zones if zone.health_check is not None)

    def describe(self) -> dict[str, object]:
        """A JSON-able summary for the start-up log line; each group is a nested object."""
        summary: dict[str, object] = {
            "listen": [str(hp) for hp in self.listen],
            "upstreams": [str(hp) for hp in self.upstreams],
            "upstream_source": self.upstream_source,
            "zones": {z.name: z.describe() for z in self.zones},
            "allow": [str(net) for net in self.allow],
        }
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in GROUPS:
                value = dataclasses.asdict(value)
            elif isinstance(value, HostPort):
                value = str(value)
            summary.setdefault(f.name, value)
        return summary

    def routing(self) -> tuple[object, ...]:
        """What decides where a question goes; a reload that keeps it keeps the cache."""
        return (self.upstreams, self.zones, self.upstream.policy)
