"""The plain counters every stage of the query path counts into: integers, lists and
histograms of plain numbers, a few nanoseconds an increment. One `Counters` per process, kept
across reloads; sidecar/metrics.py turns it into Prometheus families at scrape time. No I/O.

Label values are bounded: query types are a fixed list plus "other", rcodes are names,
upstreams and zones come from the configuration.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from dataclasses import dataclass, field

SOURCES = ("cache", "upstream", "stale", "local")
DROP_REASONS = ("malformed", "refused", "overload", "reset", "kernel")
# Why an upstream's attempt failed (forwarding.py's failure rule; errors.py's reasons), and two
# events that are no failure of the attempt: a truncated UDP reply (asked again over TCP) and a
# datagram that matched no query of ours (mismatch).
UPSTREAM_ERRORS = (
    "timeout", "servfail", "refused", "notauth", "formerr", "notimp", "rcode", "unreadable",
    "unreachable", "network", "truncated", "mismatch",
)  # fmt: skip
# Whose attempt the packet budget denied: a client's miss, or background work (prefetch,
# refresh ahead, probes of down upstreams), which is denied first.
BUDGET_WORK = ("client", "background")
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

    def observe(self, value: float, times: int = 1) -> None:
        """`times` observations of `value`."""
        self.counts[bisect_left(self.bounds, value)] += times
        self.total += value * times

    def add_quick(self, count: int, seconds: float) -> None:
        """`count` observations, `seconds` in all, each below the first bound."""
        self.counts[0] += count
        self.total += seconds

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs ending with +Inf, as the exposition wants them."""
        out = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out


@dataclass
class Counters:
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
    cache_evictions: int = 0
    prefetches: int = 0
    served_stale: int = 0
    coalesced: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    upstream_durations: dict[tuple[str, str], Histogram] = field(default_factory=dict)
    upstream_errors: defaultdict[tuple[str, str], int] = field(
        default_factory=lambda: defaultdict(int)
    )
    # Packets sent to each upstream (core/packet_budget.py's count: a TCP query is several).
    upstream_packets: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    # Attempts the packet budget denied, by the work they were for.
    budget_denials: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BUDGET_WORK, 0))
    answers_shaped: dict[tuple[str, str], int] = field(default_factory=dict)  # (zone, action)
    endpoint_probes: dict[tuple[str, str], int] = field(default_factory=dict)  # (zone, result)
    endpoint_passive_demotions: dict[str, int] = field(default_factory=dict)  # zone
    # Answers made from the Cloud Map registry instead of the upstream's, by (zone, kind):
    # merged (a positive answer's addresses changed), negative_replaced.
    registry_answers: dict[tuple[str, str], int] = field(default_factory=dict)
    # Cloud Map calls by (zone, api, outcome)
    cloudmap_calls: dict[tuple[str, str, str], int] = field(default_factory=dict)

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


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The gauges: what the running state holds at scrape time, read from its owners (the
    counters above are what happened; these are what is)."""

    cache_entries: tuple[int, int]  # (positive, negative)
    upstream_health: list[tuple[str, bool]]  # (upstream, up)
    # (zone, address, healthy or None while unknown, latency seconds or None)
    endpoints: list[tuple[str, str, bool | None, float | None]]
    # (zone, service, seconds since Cloud Map last confirmed its instances)
    registry_ages: list[tuple[str, str, float]] = field(default_factory=list)
