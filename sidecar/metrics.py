"""Every metric of the sidecar, declared once.

The query path counts in plain integers and lists (`core.counters.Counters`), a few
nanoseconds each; the Prometheus families are built from them only when /metrics is scraped
(`SidecarCollector`).
That keeps the cost of metrics on a cache hit to a couple of increments and one bisect.
Label values are bounded: query types are a fixed list plus "other", rcodes are names,
upstreams and zones come from the configuration, endpoint addresses from discovery answers
(their number is capped by the endpoint table).
"""

from __future__ import annotations

import platform
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator

from sidecar import __version__
from sidecar.core.counters import (
    DROP_REASONS,
    QTYPE_NAMES,
    RCODE_NAMES,
    SOURCES,
    Counters,
    Snapshot,
)
from sidecar.prometheus_lean import (
    Collector,
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    ProcessCollector,
)

NAMESPACE = "dns_sidecar"


def _name(short: str) -> str:
    return f"{NAMESPACE}_{short}"


def _counter(
    short: str, documentation: str, labels: list[str], counts: Iterable[tuple[object, int]]
) -> CounterMetricFamily:
    """A labelled counter family from (label value or tuple of them, count) pairs, sorted."""
    family = CounterMetricFamily(_name(short), documentation, labels=labels)
    for key, count in sorted(counts, key=lambda item: str(item[0])):
        family.add_metric(list(key) if isinstance(key, tuple) else [str(key)], count)
    return family


class SidecarCollector(Collector):
    def __init__(self, metrics: Counters, snapshot: Callable[[], Snapshot]) -> None:
        self.metrics = metrics
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        g = self.snapshot()  # first: it brings the counters up to date too

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
        positive, negative = g.cache_entries
        entries = GaugeMetricFamily(
            _name("cache_entries"), "Entries in the cache.", labels=["type"]
        )
        entries.add_metric(["success"], positive)
        entries.add_metric(["denial"], negative)
        yield entries
        yield CounterMetricFamily(
            _name("cache_evictions"),
            "Entries evicted because the cache was full.",
            value=m.cache_evictions,
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
        yield _counter(
            "upstream_errors",
            "Upstream attempts that failed, and replies ignored.",
            ["upstream", "reason"],
            m.upstream_errors.items(),
        )
        yield _counter(
            "upstream_packets_sent",
            "Packets sent to each upstream (a TCP query counts as 5), the packet budget's count.",
            ["upstream"],
            m.upstream_packets.items(),
        )
        yield _counter(
            "upstream_budget_denials",
            "Upstream attempts not sent: the packet budget was spent (client or background).",
            ["work"],
            m.budget_denials.items(),
        )
        healthy = GaugeMetricFamily(
            _name("upstream_healthy"),
            "1 while an upstream is up, 0 while down.",
            labels=["upstream"],
        )
        for server, is_up in g.upstream_health:
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
        for zone, address, up, latency in g.endpoints:
            if up is not None:
                endpoint_healthy.add_metric([zone, address], 1.0 if up else 0.0)
            if latency is not None:
                endpoint_latency.add_metric([zone, address], latency)
        yield endpoint_healthy
        yield endpoint_latency
        yield _counter(
            "endpoint_probes",
            "Health probes of discovery endpoints.",
            ["zone", "result"],
            m.endpoint_probes.items(),
        )
        yield _counter(
            "endpoint_passive_demotions",
            "Discovery endpoints made unhealthy by the application's stalled connections.",
            ["zone"],
            m.endpoint_passive_demotions.items(),
        )
        yield _counter(
            "registry_answers",
            "Upstream replies in discovery zones replaced by an answer made from the Cloud Map "
            "registry (merged: its addresses changed; negative_replaced: NXDOMAIN or empty "
            "while Cloud Map lists live instances).",
            ["zone", "kind"],
            m.registry_answers.items(),
        )
        yield _counter(
            "cloudmap_calls",
            "Cloud Map calls by API and outcome (ok, throttled, not_found, error).",
            ["zone", "api", "outcome"],
            m.cloudmap_calls.items(),
        )
        registry_age = GaugeMetricFamily(
            _name("cloudmap_refresh_age_seconds"),
            "Seconds since Cloud Map last confirmed a service's instances (a good refresh).",
            labels=["zone", "service"],
        )
        for zone, service, age in g.registry_ages:
            registry_age.add_metric([zone, service], age)
        yield registry_age
        yield _counter(
            "answers_shaped",
            "Discovery answers shaped, by what was done to them.",
            ["zone", "action"],
            m.answers_shaped.items(),
        )

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


def registry(metrics: Counters, snapshot: Callable[[], Snapshot]) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=reg)
    reg.register(SidecarCollector(metrics, snapshot))
    return reg
