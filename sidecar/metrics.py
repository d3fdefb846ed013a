"""Every metric of the sidecar, declared once.

The query path counts in plain integers and lists (`Metrics`), a few nanoseconds each; the
Prometheus families are built from them only when /metrics is scraped (`SidecarCollector`).
That keeps the cost of metrics on a cache hit to a couple of increments and one bisect.
Label values are bounded: query types are a fixed list plus "other", rcodes are names,
upstreams and zones come from the configuration, endpoint addresses from discovery answers
(their number is capped by the endpoint table).
"""

from __future__ import annotations

import platform
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from sidecar import __version__

NAMESPACE = "dns_sidecar"
SOURCES = ("cache", "upstream", "stale", "local")
DROP_REASONS = ("malformed", "refused", "overload")
UPSTREAM_ERRORS = ("timeout", "refused", "mismatch", "truncated", "network")
# Cache hits take microseconds, misses milliseconds to seconds: one set of buckets for both.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
QTYPE_NAMES = {
    1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA",
    33: "SRV", 35: "NAPTR", 43: "DS", 48: "DNSKEY", 64: "SVCB", 65: "HTTPS", 255: "ANY",
    257: "CAA",
}  # fmt: skip
RCODE_NAMES = (
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "YXDOMAIN", "YXRRSET",
    "NXRRSET", "NOTAUTH", "NOTZONE", "DSOTYPENI", "RCODE12", "RCODE13", "RCODE14", "RCODE15",
)  # fmt: skip


class Histogram:
    """A histogram of plain numbers: observe() is one bisect and two additions."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def add_quick(self, count: int, seconds: float) -> None:
        """`count` observations, `seconds` in all, each below the first bound."""
        self.counts[0] += count
        self.total += seconds

    def move_from_first(self, counts: list[int]) -> None:
        """Observations added with add_quick that belong in later buckets: counts[k] of them in
        bucket k (their seconds are in the total already). Never more than the first bucket
        holds, so no bucket goes down."""
        for bucket, count in enumerate(counts):
            if bucket and count:
                moved = min(count, self.counts[0])
                self.counts[0] -= moved
                self.counts[bucket] += moved

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs ending with +Inf, as the exposition wants them."""
        out = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out


@dataclass
class Metrics:
    """The counters the query path writes to; one instance per process, kept across reloads."""

    requests: dict[str, defaultdict[int, int]] = field(
        default_factory=lambda: {"udp": defaultdict(int), "tcp": defaultdict(int)}
    )
    responses: dict[str, list[int]] = field(
        default_factory=lambda: {source: [0] * 16 for source in SOURCES}
    )
    durations: dict[str, Histogram] = field(
        default_factory=lambda: {source: Histogram() for source in SOURCES}
    )
    cache_hits: list[int] = field(default_factory=lambda: [0, 0])  # [success, denial]
    cache_misses: int = 0
    prefetches: int = 0
    served_stale: int = 0
    coalesced: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    upstream_durations: dict[tuple[str, str], Histogram] = field(default_factory=dict)
    upstream_errors: defaultdict[tuple[str, str], int] = field(
        default_factory=lambda: defaultdict(int)
    )

    def answered(self, source: str, reply: bytes, seconds: float) -> None:
        self.responses[source][reply[3] & 0x0F] += 1
        self.durations[source].observe(seconds)

    def upstream_reply(self, upstream: str, rcode: int, seconds: float) -> None:
        key = (upstream, RCODE_NAMES[rcode & 0x0F])
        histogram = self.upstream_durations.get(key)
        if histogram is None:
            histogram = self.upstream_durations[key] = Histogram()
        histogram.observe(seconds)

    def upstream_error(self, upstream: str, reason: str) -> None:
        self.upstream_errors[(upstream, reason)] += 1


@dataclass
class Gauges:
    """What is read from the running server at scrape time (it changes on reload)."""

    cache_entries: Callable[[], tuple[int, int]]  # (positive, negative)
    cache_evictions: Callable[[], int]
    upstream_health: Callable[[], Iterable[tuple[str, bool]]]
    # (zone, address, healthy or None while unknown, latency seconds or None)
    endpoints: Callable[[], Iterable[tuple[str, str, bool | None, float | None]]]
    endpoint_probes: Callable[[], Iterable[tuple[str, str, int]]]  # (zone, result, count)
    answers_shaped: Callable[[], Iterable[tuple[str, str, int]]]  # (zone, action, count)
    # Counts kept elsewhere (the UDP fast path's rows) are added to the metrics first.
    before_scrape: Callable[[], None] = lambda: None


def _name(short: str) -> str:
    return f"{NAMESPACE}_{short}"


class SidecarCollector(Collector):
    def __init__(self, metrics: Metrics, gauges: Gauges) -> None:
        self.metrics = metrics
        self.gauges = gauges

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        g = self.gauges
        g.before_scrape()

        requests = CounterMetricFamily(
            _name("requests"), "DNS queries received.", labels=["proto", "type"]
        )
        for proto, by_type in m.requests.items():
            folded: defaultdict[str, int] = defaultdict(int)
            for qtype, count in list(by_type.items()):
                folded[QTYPE_NAMES.get(qtype, "other")] += count
            for type_name, count in sorted(folded.items()):
                requests.add_metric([proto, type_name], count)
        yield requests

        responses = CounterMetricFamily(
            _name("responses"), "DNS responses sent.", labels=["rcode", "source"]
        )
        durations = HistogramMetricFamily(
            _name("request_duration_seconds"),
            "Time from receiving a query to sending its response.",
            labels=["source"],
        )
        for source in SOURCES:
            for rcode, count in enumerate(m.responses[source]):
                if count:
                    responses.add_metric([RCODE_NAMES[rcode], source], count)
            histogram = m.durations[source]
            durations.add_metric([source], histogram.buckets(), histogram.total)
        yield responses
        yield durations

        hits = CounterMetricFamily(
            _name("cache_hits"), "Queries answered from a fresh cache entry.", labels=["type"]
        )
        hits.add_metric(["success"], m.cache_hits[0])
        hits.add_metric(["denial"], m.cache_hits[1])
        yield hits
        yield CounterMetricFamily(
            _name("cache_misses"), "Queries the cache could not answer.", value=m.cache_misses
        )
        positive, negative = g.cache_entries()
        entries = GaugeMetricFamily(
            _name("cache_entries"), "Entries in the cache.", labels=["type"]
        )
        entries.add_metric(["success"], positive)
        entries.add_metric(["denial"], negative)
        yield entries
        yield CounterMetricFamily(
            _name("cache_evictions"),
            "Entries evicted because the cache was full.",
            value=g.cache_evictions(),
        )
        yield CounterMetricFamily(
            _name("cache_prefetch"), "Background refreshes of popular entries.", value=m.prefetches
        )
        yield CounterMetricFamily(
            _name("cache_served_stale"),
            "Answers served from expired entries (RFC 8767).",
            value=m.served_stale,
        )
        yield CounterMetricFamily(
            _name("coalesced"),
            "Cache misses that waited for an identical upstream query already in flight.",
            value=m.coalesced,
        )

        upstream_durations = HistogramMetricFamily(
            _name("upstream_request_duration_seconds"),
            "Round-trip time of upstream queries that got a reply.",
            labels=["upstream", "rcode"],
        )
        for (server, rcode_name), histogram in sorted(m.upstream_durations.items()):
            upstream_durations.add_metric(
                [server, rcode_name], histogram.buckets(), histogram.total
            )
        yield upstream_durations
        errors = CounterMetricFamily(
            _name("upstream_errors"),
            "Upstream attempts that failed, and replies ignored.",
            labels=["upstream", "reason"],
        )
        for (server, reason), count in sorted(m.upstream_errors.items()):
            errors.add_metric([server, reason], count)
        yield errors
        healthy = GaugeMetricFamily(
            _name("upstream_healthy"),
            "1 while an upstream is up, 0 while down.",
            labels=["upstream"],
        )
        for server, is_up in g.upstream_health():
            healthy.add_metric([server], 1.0 if is_up else 0.0)
        yield healthy

        endpoint_healthy = GaugeMetricFamily(
            _name("endpoint_healthy"),
            "Health of a discovery endpoint: 1 healthy, 0 unhealthy (absent while unknown).",
            labels=["zone", "address"],
        )
        endpoint_latency = GaugeMetricFamily(
            _name("endpoint_latency_seconds"),
            "Smoothed probe round-trip time of a discovery endpoint.",
            labels=["zone", "address"],
        )
        for zone, address, up, latency in g.endpoints():
            if up is not None:
                endpoint_healthy.add_metric([zone, address], 1.0 if up else 0.0)
            if latency is not None:
                endpoint_latency.add_metric([zone, address], latency)
        yield endpoint_healthy
        yield endpoint_latency
        probes = CounterMetricFamily(
            _name("endpoint_probes"),
            "Health probes of discovery endpoints.",
            labels=["zone", "result"],
        )
        for zone, result, count in g.endpoint_probes():
            probes.add_metric([zone, result], count)
        yield probes
        shaped = CounterMetricFamily(
            _name("answers_shaped"),
            "Discovery answers shaped, by what was done to them.",
            labels=["zone", "action"],
        )
        for zone, action, count in g.answers_shaped():
            shaped.add_metric([zone, action], count)
        yield shaped

        dropped = CounterMetricFamily(
            _name("dropped"), "Queries dropped or refused before any lookup.", labels=["reason"]
        )
        for reason in DROP_REASONS:
            dropped.add_metric([reason], m.dropped[reason])
        yield dropped
        info = GaugeMetricFamily(
            _name("build_info"), "Version of the sidecar.", labels=["version", "python"]
        )
        info.add_metric([__version__, platform.python_version()], 1.0)
        yield info


def registry(metrics: Metrics, gauges: Gauges) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=reg)
    reg.register(SidecarCollector(metrics, gauges))
    return reg
