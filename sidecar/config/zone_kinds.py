"""The kinds of the zone settings: ``[zones.NAME]`` tables, ``--zone``, and the per-zone
options (``--health-check``, ``--max-answers``, ``--cloudmap``).

Apart from the plain kinds because they build the model's Zone and HealthCheck, and because a
zone is the one value that arrives in pieces: a table in the file, or a zone's upstreams from
one source and its health check from another, merged by zone name across the layers.
"""

from __future__ import annotations

from typing import Any

from sidecar.addresses import DNS_PORT
from sidecar.config.kinds import AddressList, Bool, Choice, IntRange, Kind
from sidecar.config.model import HealthCheck, Zone
from sidecar.config.names import normalize_zone_name, unknown_key
from sidecar.errors import ConfigError


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
                raise unknown_key(f"{key}.{unknown[0]}", value[unknown[0]], ["namespace"])
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


# One instance of each, shared by the [zones.NAME] keys below and the settings table (the
# per-zone flags, upstream.policy), so a value reads and fails alike wherever it is written.
HEALTH_CHECK = HealthCheckSpec()
MAX_ANSWERS = IntRange(1, 64)
CLOUDMAP = CloudMapNamespace()
ZONE_UPSTREAMS = AddressList(DNS_PORT, upstream=True)
POLICY = Choice("sequential", "random", "fastest")
ANSWER_ORDER = Choice("rotate", "upstream")
SYNTHESIZE_A = Bool()

# The keys of a [zones.NAME] table: one row per key, so zone tables can grow (health_check...).
ZONE_KEYS: dict[str, Kind] = {
    "upstreams": ZONE_UPSTREAMS,
    "policy": POLICY,
    "answer_order": ANSWER_ORDER,
    "health_check": HEALTH_CHECK,
    "max_answers": MAX_ANSWERS,
    "cloudmap": CLOUDMAP,
    "synthesize_a": SYNTHESIZE_A,
}
# zone table key -> Zone field, where they differ
ZONE_FIELDS: dict[str, str] = {"cloudmap": "cloudmap_namespace"}

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
                    raise unknown_key(sub_key, sub_value, sorted(ZONE_KEYS), hint)
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
            zone = Zone(name, ZONE_UPSTREAMS.from_text(upstreams, key))
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
