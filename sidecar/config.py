"""Configuration: the model, one table of settings, and the three sources that fill it.

Precedence, highest first: CLI flags > ``DNS_SIDECAR_*`` environment > TOML file > defaults.
Every setting is one row of ``SETTINGS``; the file walker, the environment reader, the CLI
parser, the defaults and the error messages are all driven by that table, so a new setting is
one new row (plus its field on the model).

Everything is checked at start and any problem raises ``ConfigError(key, value, allowed)``
where ``key`` is spelled the way the operator wrote it: the dotted file key (``cache.max_ttl``),
the environment variable (``DNS_SIDECAR_CACHE_MAX_TTL``) or the flag (``--max-ttl``).

Sans-IO apart from reading the TOML file (and resolv.conf, through ``sidecar.resolv_conf``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import ipaddress
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Generic, TypeVar

from sidecar import __version__
from sidecar.addresses import DNS_PORT, HostPort, covers, is_wildcard, parse_hostport
from sidecar.core.access import DEFAULT_ALLOW, IpNetwork, parse_networks
from sidecar.core.cache import CacheSettings
from sidecar.errors import ConfigError
from sidecar.resolv_conf import DEFAULT_PATH as DEFAULT_RESOLV_CONF
from sidecar.resolv_conf import original_nameservers, our_nameserver

ENV_PREFIX = "DNS_SIDECAR_"
ENV_CONFIG = "DNS_SIDECAR_CONFIG"
ECS_METADATA_ENV = "ECS_CONTAINER_METADATA_URI_V4"
ECS_RESOLVER = "169.254.169.253"
TTL_LIMIT = 2**31 - 1  # RFC 2181 section 8

T = TypeVar("T")

_NO_ENV: Mapping[str, str] = MappingProxyType({})
DEFAULT_ALLOW_NETWORKS = parse_networks(DEFAULT_ALLOW)


# --------------------------------------------------------------------------------------------
# The model


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
    health_check: HealthCheck | None = None  # set: a discovery zone, its answers are shaped
    max_answers: int | None = None  # discovery zones: keep only the first N after shaping
    cloudmap_namespace: str | None = None  # discovery zones: also ask Cloud Map for health

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {"upstreams": [str(hp) for hp in self.upstreams]}
        for name in ("policy", "health_check", "max_answers", "cloudmap_namespace"):
            value = getattr(self, name)
            if value is not None:
                out[name] = str(value) if isinstance(value, HealthCheck) else value
        return out


@dataclass(frozen=True, slots=True)
class Config:
    listen: tuple[HostPort, ...]
    upstreams: tuple[HostPort, ...]
    upstream_source: str  # "configured" | "ecs" | "resolv.conf"
    zones: tuple[Zone, ...]
    cache: CacheSettings = field(default_factory=CacheSettings)
    attempt_timeout: float = 1.0
    query_timeout: float = 4.0
    tcp_idle_timeout: float = 10.0
    tcp_max_connections: int = 256
    tcp_message_timeout: float = 2.0
    log_format: str = "json"
    log_level: str = "info"
    upstream_policy: str = "sequential"
    upstream_max_fails: int = 2
    upstream_probe_name: str = "."
    upstream_probe_interval: float = 1.0
    upstream_max_inflight: int = 1000
    max_pending: int = 4096
    udp_reader_thread: bool = True  # a thread reads each UDP socket and answers hits itself
    drain_seconds: float = 2.0
    metrics_listen: HostPort = HostPort("127.0.0.1", 9153)  # noqa: RUF009  # frozen
    log_queries: float = 0.0
    discovery_probe_interval: float = 1.0
    discovery_probe_timeout: float = 0.5
    discovery_rise: int = 2
    discovery_fall: int = 2
    discovery_forget_after: float = 300.0
    discovery_answer_ttl: int = 5
    discovery_max_probes: int = 64
    discovery_max_endpoints: int = 4096
    discovery_cloudmap_interval: float = 10.0
    workers: int = 1
    allow: tuple[IpNetwork, ...] = DEFAULT_ALLOW_NETWORKS
    rate_limit: int = 0  # queries per second per client over UDP; 0: off
    manage_resolv_conf: bool = False  # rewrite resolv.conf to us at start, restore at exit
    resolv_conf_path: str = DEFAULT_RESOLV_CONF

    def describe(self) -> dict[str, object]:
        """A JSON-able summary for the start-up log line."""
        summary: dict[str, object] = {
            "listen": [str(hp) for hp in self.listen],
            "upstreams": [str(hp) for hp in self.upstreams],
            "upstream_source": self.upstream_source,
            "zones": {z.name: z.describe() for z in self.zones},
            "cache": dataclasses.asdict(self.cache),
            "allow": [str(net) for net in self.allow],
        }
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            summary.setdefault(f.name, str(value) if isinstance(value, HostPort) else value)
        return summary

    def routing(self) -> tuple[object, ...]:
        """What decides where a question goes; a reload that keeps it keeps the cache."""
        return (self.upstreams, self.zones, self.upstream_policy)


# --------------------------------------------------------------------------------------------
# Addresses and names


def normalize_zone_name(text: str, key: str) -> str:
    """Lowercase, drop one trailing dot, and check it is a DNS name other than the root."""
    name = text.strip().lower()
    if name.endswith("."):
        name = name[:-1]
    allowed = (
        "a DNS name such as 'local' or 'svc.example.com': labels of 1..63 letters, digits, "
        "'-' or '_', at most 253 characters; the root '.' is not a zone (use upstreams)"
    )
    if not name or len(name) > 253:
        raise ConfigError(key, text, allowed)
    for label in name.split("."):
        if not 1 <= len(label) <= 63:
            raise ConfigError(key, text, allowed)
        if not all(c.isascii() and (c.isalnum() or c in "-_") for c in label):
            raise ConfigError(key, text, allowed)
    return name


# --------------------------------------------------------------------------------------------
# Kinds of value: each knows how to read itself from TOML and from text (env var, flag)


class Kind:
    """How one setting is parsed and checked; values are kept as ``Any`` in the generic layers."""

    metavar = "VALUE"
    allowed = ""
    separator = ","  # joins the values of a repeated CLI flag
    nargs: str | None = None  # argparse nargs of the flag ("?": the value may be left out)
    const: str | None = None  # the flag's value when it is given without one

    def from_toml(self, value: object, key: str) -> Any:
        if not isinstance(value, str):
            raise ConfigError(key, value, self.allowed)
        return self.from_text(value, key)

    def from_text(self, text: str, key: str) -> Any:
        raise NotImplementedError

    def merge(self, lower: Any, higher: Any) -> Any:
        """Combine a lower layer's value with a higher one's; by default the higher wins."""
        return higher

    def finish(self, value: Any) -> Any:
        """Turn the layered value into the model's field value."""
        return value

    def show(self, value: Any) -> str:
        """Display a value (a default) in help text."""
        return str(value)


class IntRange(Kind):
    metavar = "N"

    def __init__(self, lo: int, hi: int, note: str = "") -> None:
        self.lo, self.hi = lo, hi
        self.allowed = f"an integer {lo}..{hi}" + (f" ({note})" if note else "")

    def check(self, value: int, shown: object, key: str) -> int:
        if not self.lo <= value <= self.hi:
            raise ConfigError(key, shown, self.allowed)
        return value

    def from_toml(self, value: object, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, self.allowed)
        return self.check(value, value, key)

    def from_text(self, text: str, key: str) -> int:
        try:
            number = int(text.strip())
        except ValueError:
            raise ConfigError(key, text, self.allowed) from None
        return self.check(number, text, key)


class FloatRange(Kind):
    metavar = "SECONDS"

    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi
        self.allowed = f"a number of seconds {lo}..{hi}"

    def check(self, value: float, shown: object, key: str) -> float:
        if not (math.isfinite(value) and self.lo <= value <= self.hi):
            raise ConfigError(key, shown, self.allowed)
        return value

    def from_toml(self, value: object, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, value, self.allowed)
        return self.check(float(value), value, key)

    def from_text(self, text: str, key: str) -> float:
        try:
            number = float(text.strip())
        except ValueError:
            raise ConfigError(key, text, self.allowed) from None
        return self.check(number, text, key)


class Choice(Kind):
    def __init__(self, *choices: str) -> None:
        self.choices = choices
        self.metavar = "{" + ",".join(choices) + "}"
        self.allowed = "one of " + ", ".join(choices)

    def from_text(self, text: str, key: str) -> str:
        value = text.strip().lower()
        if value not in self.choices:
            raise ConfigError(key, text, self.allowed)
        return value


class DomainName(Kind):
    """A DNS name, '.' for the root; stored in the text form with a trailing dot."""

    metavar = "NAME"
    allowed = "a DNS name such as '.' or 'health.example.com.'"

    def from_text(self, text: str, key: str) -> str:
        if text.strip() in (".", ""):
            if not text.strip():
                raise ConfigError(key, text, self.allowed)
            return "."
        return normalize_zone_name(text, key) + "."

    def show(self, value: Any) -> str:
        return str(value)


class ItemList(Kind, Generic[T]):
    """A non-empty list of distinct items, each read by ``parse_item(text, key)``.

    TOML: a list of strings; text (env var, flag): comma-separated, blank items skipped (so a
    trailing comma is harmless). One kind for every list setting, so they all agree on the
    form, on duplicates and on the messages naming the key the operator wrote.
    """

    def __init__(
        self, parse_item: Callable[[str, str], T], *, metavar: str, allowed: str, empty: str
    ) -> None:
        self.parse_item = parse_item
        self.metavar = metavar
        self.allowed = allowed
        self.empty = empty  # the message for a list with no items

    def parse_items(self, items: Sequence[str], shown: object, key: str) -> tuple[T, ...]:
        result: list[T] = []
        for item in items:
            value = self.parse_item(item, key)
            if value in result:
                raise ConfigError(key, item, f"{value} is listed twice")
            result.append(value)
        if not result:
            raise ConfigError(key, shown, self.empty)
        return tuple(result)

    def from_toml(self, value: object, key: str) -> tuple[T, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, value, self.allowed)
        return self.parse_items(value, value, key)

    def from_text(self, text: str, key: str) -> tuple[T, ...]:
        items = [item for item in text.split(",") if item.strip()]
        return self.parse_items(items, text, key)

    def show(self, value: Any) -> str:
        return ",".join(str(item) for item in value)


class AddressList(ItemList[HostPort]):
    """Addresses with optional ports (listen, upstreams); an upstream cannot be a wildcard."""

    def __init__(self, default_port: int, *, upstream: bool) -> None:
        self.default_port = default_port
        self.upstream = upstream
        example = '["10.0.0.2", "[fd00::2]:53"]' if upstream else '["127.0.0.1:53", "[::1]:53"]'
        super().__init__(
            self.parse_address,
            metavar="HOST[:PORT]" if upstream else "HOST:PORT",
            allowed="a list of IP addresses with optional ports, e.g. " + example,
            empty="at least one address is needed",
        )

    def parse_address(self, text: str, key: str) -> HostPort:
        hp = parse_hostport(text, self.default_port, key)
        if self.upstream and is_wildcard(hp.host):
            raise ConfigError(key, text, "an upstream cannot be an unspecified address")
        return hp


NETWORKS_ALLOWED = (
    'a list of networks such as ["10.0.0.0/8", "fd00::/8", "127.0.0.1"]; '
    '["0.0.0.0/0", "::/0"] allows everyone'
)


def parse_network(item: str, key: str) -> IpNetwork:
    """A network in CIDR form, a bare address being one host. Host bits set are an error that
    names the network probably meant: 10.0.0.1/8 is more likely a typo than 10.0.0.0/8."""
    text = item.strip()
    with contextlib.suppress(ValueError):
        return ipaddress.ip_network(text)
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ConfigError(key, item, NETWORKS_ALLOWED) from None
    raise ConfigError(key, item, f"host bits are set (did you mean {loose}?)")


class NetworkList(ItemList[IpNetwork]):
    """Client networks (allow)."""

    def __init__(self) -> None:
        super().__init__(
            parse_network,
            metavar="CIDR",
            allowed=NETWORKS_ALLOWED,
            empty="at least one network is needed; " + NETWORKS_ALLOWED,
        )


class Address(Kind):
    """One address with a port; the port defaults to `default_port`."""

    metavar = "HOST:PORT"

    def __init__(self, default_port: int) -> None:
        self.default_port = default_port
        self.allowed = f"an IP address with an optional port (default {default_port})"

    def from_text(self, text: str, key: str) -> HostPort:
        return parse_hostport(text, self.default_port, key)


class Bool(Kind):
    """true/false (TOML booleans; in text also 1/0, yes/no, on/off); a bare flag means true."""

    metavar = "BOOL"
    allowed = "true or false"
    nargs = "?"
    const = "true"
    words: ClassVar[dict[str, bool]] = {
        **dict.fromkeys(("true", "1", "yes", "on"), True),
        **dict.fromkeys(("false", "0", "no", "off"), False),
    }

    def from_toml(self, value: object, key: str) -> bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, self.allowed)
        return value

    def from_text(self, text: str, key: str) -> bool:
        value = self.words.get(text.strip().lower())
        if value is None:
            raise ConfigError(key, text, self.allowed)
        return value

    def show(self, value: Any) -> str:
        return "true" if value else "false"


class FilePath(Kind):
    """An absolute file path (not checked for existence here)."""

    metavar = "PATH"
    allowed = "an absolute path, e.g. /etc/resolv.conf"

    def from_text(self, text: str, key: str) -> str:
        path = text.strip()
        if not path.startswith("/") or "\0" in path:
            raise ConfigError(key, text, self.allowed)
        return path


class HealthCheckSpec(Kind):
    metavar = "tcp:PORT|http:PORT/PATH"
    allowed = "tcp:PORT or http:PORT/PATH, e.g. tcp:8080 or http:8080/health (port 1..65535)"

    def from_text(self, text: str, key: str) -> HealthCheck:
        kind, _, rest = text.strip().partition(":")
        port_text, slash, path = rest.partition("/")
        if kind not in ("tcp", "http") or not port_text.isdigit() or (kind == "tcp" and slash):
            raise ConfigError(key, text, self.allowed)
        port = int(port_text)
        if not 1 <= port <= 65535 or any(c.isspace() for c in path):
            raise ConfigError(key, text, self.allowed)
        return HealthCheck(kind, port, "/" + path)


class CloudMapNamespace(Kind):
    """TOML: {namespace = "local"}; text: the namespace name."""

    metavar = "NAMESPACE"
    allowed = 'a Cloud Map namespace name, in TOML {namespace = "local"}'

    def from_toml(self, value: object, key: str) -> str:
        if isinstance(value, dict):
            unknown = sorted(set(value) - {"namespace"})
            if unknown:
                raise _unknown_key(f"{key}.{unknown[0]}", value[unknown[0]], ["namespace"])
            value = value.get("namespace")
        if not isinstance(value, str):
            raise ConfigError(key, value, self.allowed)
        return self.from_text(value, key)

    def from_text(self, text: str, key: str) -> str:
        name = text.strip().rstrip(".")
        if not name:
            raise ConfigError(key, text, self.allowed)
        return normalize_zone_name(name, key)


class PerZone(Kind):
    """A value per zone: ZONE=VALUE (CLI, repeatable), ZONE=VALUE;ZONE=VALUE (env), or a TOML
    table {zone = value}. Layers merge by zone, like zones."""

    separator = ";"

    def __init__(self, inner: Kind) -> None:
        self.inner = inner
        self.metavar = f"ZONE={inner.metavar}"
        self.allowed = f"ZONE={inner.metavar}, several separated by ';'"

    def from_toml(self, value: object, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ConfigError(key, value, "a table {zone = value}")
        return {
            normalize_zone_name(zone, f"{key}.{zone}"): self.inner.from_toml(v, f"{key}.{zone}")
            for zone, v in value.items()
        }

    def from_text(self, text: str, key: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part in text.split(";"):
            if not part.strip():
                continue
            zone, eq, value = part.partition("=")
            if not eq:
                raise ConfigError(key, part, self.allowed)
            out[normalize_zone_name(zone, key)] = self.inner.from_text(value, key)
        return out

    def merge(self, lower: Any, higher: Any) -> Any:
        return {**lower, **higher}

    def show(self, value: Any) -> str:
        return "none"


_HEALTH_CHECK = HealthCheckSpec()
_MAX_ANSWERS = IntRange(1, 64)
_CLOUDMAP = CloudMapNamespace()


# The keys of a [zones.NAME] table: one row per key, so zone tables can grow (health_check...).
_ZONE_UPSTREAMS = AddressList(DNS_PORT, upstream=True)
_POLICY = Choice("sequential", "random", "fastest")
ZONE_KEYS: dict[str, Kind] = {
    "upstreams": _ZONE_UPSTREAMS,
    "policy": _POLICY,
    "health_check": _HEALTH_CHECK,
    "max_answers": _MAX_ANSWERS,
    "cloudmap": _CLOUDMAP,
}
# zone table key -> Zone field, where they differ
ZONE_FIELDS: dict[str, str] = {"cloudmap": "cloudmap_namespace"}
# Settings that are folded into the zones rather than being Config fields of their own.
ZONE_OPTION_SETTINGS = ("health_checks", "max_answers", "cloudmap")

# A layered zones value: normalized name -> (zone, the key it came from).
ZoneMap = dict[str, tuple[Zone, str]]


def _quote_key(name: str) -> str:
    return f'"{name}"' if "." in name or not name else name


class Zones(Kind):
    """Per-domain upstreams.

    TOML: ``[zones.NAME]`` tables. Text: ``local=10.0.0.2:53,10.0.0.3;corp.example=10.1.0.2``.
    Layers merge by zone name: a higher layer replaces a same-named zone and keeps the others.
    """

    metavar = "ZONE=HOST[:PORT][,HOST[:PORT]...]"
    separator = ";"
    allowed = "zones as NAME=HOST[:PORT][,HOST[:PORT]...], several separated by ';'"

    def from_toml(self, value: object, key: str) -> ZoneMap:
        if not isinstance(value, dict):
            raise ConfigError(key, value, "a table of zones, e.g. [zones.local] upstreams = [...]")
        zones: ZoneMap = {}
        for raw_name, table in value.items():
            zone_key = f"{key}.{_quote_key(raw_name)}"
            if not isinstance(table, dict):
                raise ConfigError(zone_key, table, "a table with upstreams = [...]")
            name = normalize_zone_name(raw_name, zone_key)
            fields: dict[str, Any] = {}
            for sub, sub_value in table.items():
                sub_key = f"{zone_key}.{_quote_key(sub)}"
                kind = ZONE_KEYS.get(sub)
                if kind is None:
                    hint = ""
                    if isinstance(sub_value, dict):
                        hint = '; quote zone names that contain dots: [zones."svc.example.com"]'
                    raise _unknown_key(sub_key, sub_value, sorted(ZONE_KEYS), hint)
                fields[ZONE_FIELDS.get(str(sub), str(sub))] = kind.from_toml(sub_value, sub_key)
            if "upstreams" not in fields and "health_check" not in fields:
                raise ConfigError(
                    f"{zone_key}.upstreams",
                    None,
                    "a zone needs upstreams, or a health_check (a discovery zone that uses the "
                    "default upstreams)",
                )
            fields.setdefault("upstreams", ())
            self._add(zones, Zone(name=name, **fields), f"{zone_key}.upstreams", zone_key)
        return zones

    def from_text(self, text: str, key: str) -> ZoneMap:
        zones: ZoneMap = {}
        for part in text.split(";"):
            if not part.strip():
                continue
            raw_name, eq, upstreams = part.partition("=")
            if not eq or not upstreams.strip(","):
                raise ConfigError(key, part, self.allowed)
            name = normalize_zone_name(raw_name, key)
            zone = Zone(name, _ZONE_UPSTREAMS.from_text(upstreams, key))
            self._add(zones, zone, key, key)
        return zones

    @staticmethod
    def _add(zones: ZoneMap, zone: Zone, source: str, key: str) -> None:
        if zone.name in zones:
            raise ConfigError(key, zone.name, "the same zone is given twice")
        zones[zone.name] = (zone, source)

    def merge(self, lower: ZoneMap, higher: ZoneMap) -> ZoneMap:
        return {**lower, **higher}

    def finish(self, value: ZoneMap) -> tuple[Zone, ...]:
        return tuple(zone for zone, _ in value.values())

    def show(self, value: Any) -> str:
        return "none"


# --------------------------------------------------------------------------------------------
# The table of settings


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting: its file key, CLI flag, kind, default and help; the env var is derived."""

    key: str  # dotted TOML key; "cache.x" -> Config.cache.x, "tcp.x" -> Config.tcp_x
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
            "memory the cache may use, estimated per entry (least recently used go first)"),
    Setting("upstream.policy", "--upstream-policy", _POLICY, "sequential",
            "order of a zone's upstreams: as given, shuffled, or by smoothed RTT"),
    Setting("upstream.max_fails", "--max-fails", IntRange(1, 100), 2,
            "failures in a row that mark an upstream down"),
    Setting("upstream.probe_name", "--probe-name", DomainName(), ".",
            "name asked (type NS) to see whether a down upstream is back"),
    Setting("upstream.probe_interval", "--probe-interval", FloatRange(0.1, 300), 1.0,
            "seconds between probes of a down upstream"),
    Setting("upstream.max_inflight", "--max-inflight", IntRange(1, 100_000), 1000,
            "most distinct upstream queries in flight; beyond, SERVFAIL at once"),
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
    Setting("health_checks", "--health-check", PerZone(_HEALTH_CHECK), {},
            "make ZONE a discovery zone: probe its endpoints so, shape its A/AAAA answers",
            repeat=True),
    Setting("max_answers", "--max-answers", PerZone(_MAX_ANSWERS), {},
            "discovery zones: keep only the first N addresses after shaping", repeat=True),
    Setting("cloudmap", "--cloudmap", PerZone(_CLOUDMAP), {},
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
    Setting("discovery.max_probes", "--max-endpoint-probes", IntRange(1, 4096), 64,
            "endpoint probes running at once"),
    Setting("discovery.max_endpoints", "--max-endpoints", IntRange(1, 100_000), 4096,
            "endpoints tracked at most (least recently seen forgotten first)"),
    Setting("discovery.cloudmap_interval", "--cloudmap-interval", FloatRange(1, 3600), 10.0,
            "seconds between Cloud Map health refreshes (doubled on throttling)"),
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
_GROUPS: frozenset[str] = frozenset(s.key.rsplit(".", 1)[0] for s in SETTINGS if "." in s.key)

# A layer: setting key -> (parsed value, the key as the operator spelled it).
Layer = dict[str, tuple[Any, str]]


def _unknown_key(key: str, value: object, known: Sequence[str], hint: str = "") -> ConfigError:
    import difflib  # lazy: only an error needs it

    name = key.rsplit(".", 1)[-1] if not key.startswith(ENV_PREFIX) else key
    close = difflib.get_close_matches(name, known, n=1)
    what = "unknown variable" if key.startswith(ENV_PREFIX) else "unknown key"
    if close:
        return ConfigError(key, value, f"{what} (did you mean {close[0]}?){hint}")
    return ConfigError(key, value, f"{what}; known: {', '.join(known)}{hint}")


# --------------------------------------------------------------------------------------------
# The three sources


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
        elif key in _GROUPS:
            if not isinstance(value, dict):
                raise ConfigError(key, value, f"a table: [{key}]")
            layer.update(file_layer(value, key + "."))
        else:
            known = sorted(
                {k[len(prefix) :].split(".")[0] for k in SETTINGS_BY_KEY if k.startswith(prefix)}
            )
            raise _unknown_key(key, value, known)
    return layer


def env_layer(env: Mapping[str, str]) -> Layer:
    """The ``DNS_SIDECAR_*`` variables; an empty one counts as unset, an unknown one is an error."""
    layer: Layer = {}
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        if name not in KNOWN_ENV:
            raise _unknown_key(name, env[name], sorted(KNOWN_ENV))
        setting = SETTINGS_BY_ENV.get(name)
        if setting is None or not env[name].strip():
            continue
        layer[setting.key] = (setting.kind.from_text(env[name], name), name)
    return layer


def build_arg_parser() -> argparse.ArgumentParser:
    """The flags of ``dns-sidecar [run]``, one per setting plus --config and --version."""
    parser = argparse.ArgumentParser(
        prog="dns-sidecar",
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


# --------------------------------------------------------------------------------------------
# Putting the layers together


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
        if zone.health_check is None and (zone.max_answers or zone.cloudmap_namespace):
            key = options["max_answers" if zone.max_answers else "cloudmap_namespace"][1]
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

    cache = CacheSettings(
        **{k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("cache.")}
    )
    if cache.max_ttl < cache.min_ttl:
        raise ConfigError(
            source["cache.max_ttl"],
            cache.max_ttl,
            f"must be >= min_ttl ({cache.min_ttl}, from {source['cache.min_ttl']})",
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

    others = {
        k.replace(".", "_"): v
        for k, v in values.items()
        if not k.startswith("cache.") and k not in ("listen", "upstreams")
    }
    others["resolv_conf_path"] = resolv_conf
    others["zones"] = _with_zone_options(
        values["zones"],
        {
            "health_check": (values.pop("health_checks"), source["health_checks"]),
            "max_answers": (values.pop("max_answers"), source["max_answers"]),
            "cloudmap_namespace": (values.pop("cloudmap"), source["cloudmap"]),
        },
    )
    for name in ZONE_OPTION_SETTINGS:
        del others[name]
    return Config(
        listen=listen, upstreams=upstreams, upstream_source=upstream_source, cache=cache, **others
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
