"""`cache.max_bytes` holds for everything kept beside the cache: NSD serves 300 names of 32 A
records each (the same 32 loopback addresses), in a discovery zone (a TCP health check on a
port nothing listens on: every endpoint dead, answers fail open, each with its pool of 64
shaped orders, ~150 KB) and in a plain zone (8 rotated orders each); each name is asked three
times in a row over UDP (the third from a fast-path row), twice over. With
`--cache-max-bytes 1048576` the sidecar's resident memory (VmRSS from /proc) grows by at most
that budget plus 5 MB over its idle size (measured after one name was asked and probed, so
that every code path has run once)."""

from __future__ import annotations

import time

import dns.message
import dns.query
import pytest

from tests.fakes.nsd import NsdServer, free_port, loopback_host, running_nsd
from tests.integration.conftest import Sidecar, StartSidecar
from tests.integration.test_hostile import rss_mb

pytestmark = pytest.mark.integration

NAMES = 300
ADDRESSES = 32
BUDGET = 1 << 20
ZONE = "svc.test"


def zone_text() -> str:
    lines = [
        f"$ORIGIN {ZONE}.",
        "$TTL 300",
        "@ IN SOA ns hostmaster 1 3600 600 86400 30",
        "@ IN NS ns",
        "ns IN A 127.0.0.1",
    ]
    for name in ["warm", *(f"n{i}" for i in range(NAMES))]:
        lines += [f"{name} IN A 127.0.40.{j + 1}" for j in range(ADDRESSES)]
    return "\n".join(lines) + "\n"


def ask(sc: Sidecar, label: str) -> bool:
    """Ask for `label` three times in a row (the third from a fast-path row): all answered?"""
    answered = 0
    for _ in range(3):
        query = dns.message.make_query(f"{label}.{ZONE}.", "A", use_edns=0, payload=4096)
        reply = dns.query.udp(query, sc.addr, port=sc.port, timeout=3.0)
        answered += len(reply.answer[0]) == ADDRESSES
    return answered == 3


@pytest.fixture(scope="module")
def nsd_many(tmp_path_factory: pytest.TempPathFactory) -> NsdServer:
    with running_nsd({f"{ZONE}.": zone_text()}, tmp_path_factory.mktemp("nsd-many")) as nsd:
        yield nsd  # type: ignore[misc]


@pytest.mark.parametrize("zone", ["discovery", "plain"])
def test_pools_and_rows_stay_within_cache_max_bytes(
    sidecar: StartSidecar, nsd_many: NsdServer, zone: str
) -> None:
    dead_port = free_port(loopback_host(3))
    discovery = ["--health-check", f"{ZONE}=tcp:{dead_port}", "--endpoint-probe-interval", "5"]
    sc = sidecar(
        "--upstream",
        nsd_many.address,
        *(discovery if zone == "discovery" else []),
        "--cache-max-bytes",
        str(BUDGET),
    )
    ask(sc, "warm")  # idle, but with every code path run once (the probes too)
    time.sleep(1.5)
    idle = rss_mb(sc)
    answered = 0
    for _round in range(2):
        for i in range(NAMES):
            answered += ask(sc, f"n{i}")
    time.sleep(0.5)
    grown = rss_mb(sc) - idle
    print(f"idle {idle:.1f} MB, after {idle + grown:.1f} MB, grown {grown:.1f} MB")
    assert answered == 2 * NAMES
    assert grown <= BUDGET / 2**20 + 5, f"idle {idle:.1f} MB, grown {grown:.1f} MB"
