"""Zone data for NSD and the query files for dnsperf, the same for every server under test.

Zones (all served by one NSD on loopback; every TTL is an hour, so nothing expires mid-run):
- `bench.example`: `h000000` .. `h<N-1>` with one A record each (the cache-hit and growth names),
  and a wildcard under `miss.bench.example` answering any unique name (the miss workload);
- `burst.example`: a wildcard, reached through the counting proxy (the coalescing test);
- `local`: a discovery zone, `svc000` .. with four A records each, drawn from a small pool of
  loopback addresses that have real TCP listeners (the shaped-answer test).
A record data is in 127.0.0.0/8: nothing is ever sent to it except the sidecar's health probes
of the discovery pool.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

BENCH_ZONE = "bench.example"
MISS_ZONE = "miss.bench.example"
BURST_ZONE = "burst.example"
DISCOVERY_ZONE = "local"
TTL = 3600
ANSWERS_PER_SERVICE = 4


def hit_name(i: int) -> str:
    return f"h{i:06d}.{BENCH_ZONE}"


def service_name(i: int) -> str:
    return f"svc{i:03d}.{DISCOVERY_ZONE}"


def _soa(origin: str) -> list[str]:
    return [
        f"$ORIGIN {origin}.",
        f"$TTL {TTL}",
        f"@ IN SOA ns.{origin}. hostmaster.{origin}. 1 3600 600 86400 60",
        f"@ IN NS ns.{origin}.",
        "ns IN A 127.0.0.53",
    ]


def bench_zone(names: int) -> str:
    lines = _soa(BENCH_ZONE)
    for i in range(names):
        # 127.1.x.y: answer data only, never contacted.
        lines.append(f"h{i:06d} IN A 127.1.{i // 250 % 250}.{i % 250 + 1}")
    lines.append("*.miss IN A 127.2.0.1")
    return "\n".join(lines) + "\n"


def burst_zone() -> str:
    return "\n".join([*_soa(BURST_ZONE), "* IN A 127.2.0.2"]) + "\n"


def discovery_zone(services: int, pool: Sequence[str]) -> str:
    lines = _soa(DISCOVERY_ZONE)
    for i in range(services):
        for k in range(ANSWERS_PER_SERVICE):
            lines.append(f"svc{i:03d} IN A {pool[(i + k) % len(pool)]}")
    return "\n".join(lines) + "\n"


def write_query_file(path: Path, names: Iterable[str]) -> Path:
    """A dnsperf data file: one `NAME A` line per query."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for name in names:
            f.write(f"{name} A\n")
    return path


def hit_names(count: int, start: int = 0) -> list[str]:
    return [hit_name(i) for i in range(start, start + count)]


def mixed_names(hits: int, queries: int, miss_every: int, tag: str) -> list[str]:
    """`queries` names: every `miss_every`-th a unique name under the miss wildcard, the rest
    cycling through the first `hits` cached names."""
    out: list[str] = []
    for i in range(queries):
        if i % miss_every == miss_every - 1:
            out.append(f"{tag}-{i:07d}.{MISS_ZONE}")
        else:
            out.append(hit_name(i % hits))
    return out
