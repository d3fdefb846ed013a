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
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from sidecar import __version__
from sidecar.core.counters import (
    DROP_REASONS,
    QTYPE_NAMES,
    RCODE_NAMES,
    SOURCES,
    Counters,
    Snapshot,
)

NAMESPACE = "dns_sidecar"


def _name(short: str) -> str:
    return f"{NAMESPACE}_{short}"


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
        errors = CounterMetricFamily(
            _name("upstream_errors"),
            "Upstream attempts that failed, and replies ignored.",
            labels=["upstream", "reason"],
        )
        for (server, reason), count in sorted(m.upstream_errors.items()):
            errors.add_metric([server, reason], count)
        yield errors
        packets = CounterMetricFamily(
            _name("upstream_packets_sent"),
            "Packets sent to each upstream (a TCP query counts as 5), the packet budget's count.",
            labels=["upstream"],
        )
        for server, count in sorted(m.upstream_packets.items()):
            packets.add_metric([server], count)
        yield packets
        denials = CounterMetricFamily(
            _name("upstream_budget_denials"),
            "Upstream attempts not sent: the packet budget was spent (client or background).",
            labels=["work"],
        )
        for work, count in m.budget_denials.items():
            denials.add_metric([work], count)
        yield denials
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
        probes = CounterMetricFamily(
            _name("endpoint_probes"),
            "Health probes of discovery endpoints.",
            labels=["zone", "result"],
        )
        for (zone, result), count in sorted(m.endpoint_probes.items()):
            probes.add_metric([zone, result], count)
        yield probes
        demotions = CounterMetricFamily(
            _name("endpoint_passive_demotions"),
            "Discovery endpoints made unhealthy by the application's stalled connections.",
            labels=["zone"],
        )
        for zone, count in sorted(m.endpoint_passive_demotions.items()):
            demotions.add_metric([zone], count)
        yield demotions
        shaped = CounterMetricFamily(
            _name("answers_shaped"),
            "Discovery answers shaped, by what was done to them.",
            labels=["zone", "action"],
        )
        for (zone, action), count in sorted(m.answers_shaped.items()):
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


def registry(metrics: Counters, snapshot: Callable[[], Snapshot]) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=reg)
    reg.register(SidecarCollector(metrics, snapshot))
    return reg
