"""The table of settings: one row per setting drives the TOML file, the environment, the
flags, --help and the error messages.

A row names the dotted file key; the environment variable is derived from it and the flag is
given, so an operator moving a setting from a file to a task definition or a command line
finds it under the name they expect, and a new setting is one new row plus its model field.
Keys with a dot are settings of a group: ``tcp.idle_timeout`` is ``[tcp] idle_timeout`` in the
file, ``DNS_SIDECAR_TCP_IDLE_TIMEOUT`` in the environment and ``Config.tcp.idle_timeout`` in the
model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sidecar.addresses import DNS_PORT, HostPort
from sidecar.config.kinds import (
    Address,
    AddressList,
    Bool,
    Choice,
    DomainName,
    FilePath,
    FloatRange,
    IntRange,
    Kind,
    NetworkList,
)
from sidecar.config.model import DEFAULT_ALLOW_NETWORKS
from sidecar.config.names import ENV_PREFIX
from sidecar.config.zone_kinds import (
    ANSWER_ORDER,
    CLOUDMAP,
    HEALTH_CHECK,
    MAX_ANSWERS,
    POLICY,
    SYNTHESIZE_A,
    PerZone,
    Zones,
)
from sidecar.resolv_conf import DEFAULT_PATH as DEFAULT_RESOLV_CONF

ENV_CONFIG = "DNS_SIDECAR_CONFIG"
ECS_METADATA_ENV = "ECS_CONTAINER_METADATA_URI_V4"  # set in every ECS container
ECS_RESOLVER = "169.254.169.253"  # the Route 53 Resolver, from any VPC
TTL_LIMIT = 2**31 - 1  # RFC 2181 section 8

# Settings that are folded into the zones rather than being Config fields of their own.
ZONE_OPTION_SETTINGS = ("health_checks", "max_answers", "cloudmap", "synthesize_a")


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting: its file key, CLI flag, kind, default and help; the env var is derived."""

    key: str  # dotted TOML key; "group.x" -> Config.group.x (model.GROUPS), "x" -> Config.x
    flag: str
    kind: Kind
    default: Any
    help: str
    repeat: bool = False  # the flag may be given several times
    default_text: str | None = None  # how the default is described, when not kind.show(default)

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper().replace(".", "_")

    @property
    def shown_default(self) -> str:
        return self.default_text or self.kind.show(self.default)


_LOCALHOST_53 = (HostPort("127.0.0.1", DNS_PORT),)

# fmt: off
SETTINGS: tuple[Setting, ...] = (
    Setting("listen", "--listen", AddressList(DNS_PORT, upstream=False), _LOCALHOST_53,
            "addresses to serve DNS on (UDP and TCP)", repeat=True),
    Setting("upstreams", "--upstream", AddressList(DNS_PORT, upstream=True), None,
            "resolvers to forward to, tried in order", repeat=True,
            default_text=f"{ECS_RESOLVER} on ECS, else the first nameserver in resolv.conf"),
    Setting("zones", "--zone", Zones(), {}, "send a domain and its subdomains to own upstreams",
            repeat=True),
    Setting("attempt_timeout", "--attempt-timeout", FloatRange(0.05, 30), 1.0,
            "timeout of one attempt at one upstream"),
    Setting("query_timeout", "--query-timeout", FloatRange(0.1, 60), 4.0,
            "deadline for answering one client query, at least attempt_timeout"),
    Setting("log_format", "--log-format", Choice("json", "text"), "json", "log line format"),
    Setting("log_level", "--log-level", Choice("debug", "info", "warning", "error"), "info",
            "lowest level logged"),
    Setting("cache.max_entries", "--cache-max-entries", IntRange(1, 10_000_000), 100_000,
            "most answers kept in the cache (least recently used go first)"),
    Setting("cache.min_ttl", "--min-ttl", IntRange(0, TTL_LIMIT), 0,
            "cache answers at least this many seconds"),
    Setting("cache.max_ttl", "--max-ttl", IntRange(1, TTL_LIMIT), 86_400,
            "cache answers at most this many seconds, at least min_ttl"),
    Setting("cache.max_negative_ttl", "--max-negative-ttl", IntRange(0, TTL_LIMIT), 60,
            "cache NXDOMAIN/NODATA at most this many seconds"),
    Setting("cache.servfail_ttl", "--servfail-ttl", IntRange(0, 300, "0 turns it off"), 5,
            "cache upstream failures this many seconds (RFC 9520)"),
    Setting("tcp.idle_timeout", "--tcp-idle-timeout", FloatRange(0.5, 600), 10.0,
            "close idle client TCP connections after this many seconds"),
    Setting("tcp.max_connections", "--tcp-max-connections", IntRange(1, 65535), 256,
            "most client TCP connections open at once"),
    Setting("tcp.message_timeout", "--tcp-message-timeout", FloatRange(0.1, 60), 2.0,
            "a TCP message must arrive whole within this many seconds of its length prefix"),
    Setting("cache.prefetch_percent", "--prefetch-percent", IntRange(0, 50, "0 turns it off"),
            10, "refresh a popular answer when less than this % of its TTL is left"),
    Setting("cache.max_stale", "--max-stale", IntRange(0, TTL_LIMIT, "0 turns it off"), 86_400,
            "serve expired answers this many seconds past expiry when upstreams fail"),
    Setting("cache.stale_answer_after", "--stale-answer-after", FloatRange(0.0, 60), 1.8,
            "seconds a client waits for the upstream before it gets a stale answer"),
    Setting("cache.stale_ttl", "--stale-ttl", IntRange(1, 3600), 30, "TTL of stale answers"),
    Setting("cache.max_bytes", "--cache-max-bytes", IntRange(1 << 20, 1 << 40), 64 << 20,
            "memory the cache may use, estimated per entry with its rows and pools (least "
            "recently used go first)"),
    Setting("answer_order", "--answer-order", ANSWER_ORDER, "rotate",
            "order of 2+ A/AAAA records in cached answers: rotated on each ask, or as the "
            "upstream sent it (a zone table may set its own; discovery zones shape theirs)"),
    Setting("upstream.policy", "--upstream-policy", POLICY, "sequential",
            "order of a zone's upstreams: as given, shuffled, or by smoothed RTT"),
    Setting("upstream.max_fails", "--max-fails", IntRange(1, 100), 2,
            "failures in a row that mark an upstream down"),
    Setting("upstream.probe_name", "--probe-name", DomainName(), ".",
            "name asked (type NS) to see whether a down upstream is back"),
    Setting("upstream.probe_interval", "--probe-interval", FloatRange(0.1, 300), 1.0,
            "seconds between probes of a down upstream"),
    Setting("upstream.max_inflight", "--max-inflight", IntRange(1, 100_000), 1000,
            "most distinct upstream queries in flight; beyond, SERVFAIL at once"),
    Setting("upstream.max_packets_per_second", "--max-packets-per-second",
            IntRange(0, 1_000_000, "0 turns it off"), 900,
            "packets per second sent to all upstreams, shared by the workers (the VPC "
            "resolver drops above 1024 per network interface); beyond, stale or SERVFAIL"),
    Setting("max_pending", "--max-pending", IntRange(1, 1_000_000), 4096,
            "most client queries per listener waiting for an upstream; beyond, SERVFAIL"),
    Setting("udp_reader_thread", "--udp-reader-thread", Bool(), True,
            "a thread reads each UDP socket and answers cache hits itself; false: the event "
            "loop reads them (one thread, ~20% fewer hits per second)"),
    Setting("drain_seconds", "--drain-seconds", FloatRange(0.0, 60), 2.0,
            "after SIGTERM, keep answering this long (not ready) before closing"),
    Setting("metrics_listen", "--metrics-listen", Address(9153), HostPort("127.0.0.1", 9153),
            "HTTP address of /metrics, /health, /ready and /debug/endpoints"),
    Setting("log_queries", "--log-queries", FloatRange(0.0, 1.0), 0.0,
            "share of queries logged, one line each (0 off, 1 all)"),
    Setting("health_checks", "--health-check", PerZone(HEALTH_CHECK), {},
            "make ZONE a discovery zone: probe its endpoints so, shape its A/AAAA answers",
            repeat=True),
    Setting("max_answers", "--max-answers", PerZone(MAX_ANSWERS), {},
            "discovery zones: keep only the first N addresses after shaping", repeat=True),
    Setting("synthesize_a", "--synthesize-a", PerZone(SYNTHESIZE_A), {},
            "discovery zones: answer A/AAAA for a name that has only SRV records with its "
            "live targets' addresses (host mode, fixed ports)", repeat=True),
    Setting("cloudmap", "--cloudmap", PerZone(CLOUDMAP), {},
            "discovery zones: merge Cloud Map health of NAMESPACE (needs boto3)", repeat=True),
    Setting("discovery.probe_interval", "--endpoint-probe-interval", FloatRange(0.1, 60), 1.0,
            "seconds between probes of one endpoint (with +-20% jitter)"),
    Setting("discovery.probe_timeout", "--endpoint-probe-timeout", FloatRange(0.01, 30), 0.5,
            "timeout of one endpoint probe"),
    Setting("discovery.rise", "--endpoint-rise", IntRange(1, 10), 2,
            "successful probes in a row that make an unhealthy endpoint healthy"),
    Setting("discovery.fall", "--endpoint-fall", IntRange(1, 10), 2,
            "failed probes in a row that make a healthy endpoint unhealthy"),
    Setting("discovery.forget_after", "--endpoint-forget-after", FloatRange(1, 86_400), 300.0,
            "forget an endpoint no answer has mentioned for this many seconds"),
    Setting("discovery.answer_ttl", "--answer-ttl", IntRange(1, 3600), 5,
            "TTL cap of shaped answers, so clients follow health changes"),
    Setting("discovery.slow_start", "--slow-start", FloatRange(0, 3600), 0.0,
            "discovery zones: seconds over which a newly named endpoint's share of first "
            "places ramps up (0: off); endpoints named together ramp together"),
    Setting("discovery.zone_affinity", "--zone-affinity", Choice("off", "prefer"), "prefer",
            "discovery zones with Cloud Map: first places to endpoints in the task's own "
            "availability zone while it has enough live ones for its share (docs/discovery.md)"),
    Setting("discovery.negative_ttl", "--discovery-negative-ttl", IntRange(0, 3600), 5,
            "discovery zones: cap on caching NXDOMAIN and empty answers (0: not cached), so a "
            "service that briefly had no records during a deploy is found again soon"),
    Setting("discovery.max_probes", "--max-endpoint-probes", IntRange(1, 4096), 64,
            "endpoint probes running at once"),
    Setting("discovery.max_probes_per_second", "--max-endpoint-probes-per-second",
            FloatRange(0, 100_000), 200.0,
            "endpoint probes started per second at most (0: no limit); beyond it endpoints "
            "are probed less often than probe_interval"),
    Setting("discovery.max_endpoints", "--max-endpoints", IntRange(1, 100_000), 4096,
            "endpoints tracked at most (least recently seen forgotten first)"),
    Setting("discovery.cloudmap_interval", "--cloudmap-interval", FloatRange(1, 3600), 10.0,
            "seconds between Cloud Map health refreshes (doubled on throttling)"),
    Setting("discovery.passive_health", "--passive-health", Choice("on", "off"), "on",
            "read the application's TCP connections to discovery endpoints (socket "
            "diagnostics, nothing sent) to demote stalled endpoints and measure latency"),
    Setting("discovery.passive_interval", "--passive-interval", FloatRange(0.05, 10), 0.25,
            "seconds between reads of the application's connections (passive health)"),
    Setting("discovery.passive_connect_timeout", "--passive-connect-timeout",
            FloatRange(0.1, 30), 1.0,
            "an application connect unanswered this long demotes its endpoint (passive health)"),
    Setting("workers", "--workers", IntRange(1, 64), 1,
            "processes serving the same addresses (SO_REUSEPORT), each with its own cache"),
    Setting("allow", "--allow", NetworkList(), DEFAULT_ALLOW_NETWORKS,
            "client networks served (CIDR); others get REFUSED over UDP, a closed TCP "
            "connection", repeat=True, default_text="loopback, RFC 1918, RFC 6598, link-local, "
            "fc00::/7"),
    Setting("rate_limit", "--rate-limit", IntRange(0, 1_000_000, "0 turns it off"), 0,
            "UDP queries per second per client (token bucket); beyond it they are dropped"),
    Setting("manage_resolv_conf", "--manage-resolv-conf", Bool(), False,
            "at start point resolv.conf at our first listen address (port 53), taking its "
            "nameservers as upstreams if none are given; put it back at exit (awsvpc, Fargate)"),
    Setting("resolv_conf_path", "--resolv-conf-path", FilePath(), DEFAULT_RESOLV_CONF,
            "the resolv.conf read for default upstreams and rewritten by manage_resolv_conf"),
)
# fmt: on

SETTINGS_BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}
SETTINGS_BY_ENV: dict[str, Setting] = {s.env: s for s in SETTINGS}
KNOWN_ENV: frozenset[str] = frozenset({ENV_CONFIG, *SETTINGS_BY_ENV})
# Dotted prefixes that are TOML tables holding settings ("cache", "tcp").
TABLES: frozenset[str] = frozenset(s.key.rsplit(".", 1)[0] for s in SETTINGS if "." in s.key)
