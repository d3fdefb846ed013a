"""`cache.max_bytes` holds for everything kept beside the cache: NSD serves 300 names of 32 A
records each (the same 32 loopback addresses), in a discovery zone (a TCP health check on a
port nothing listens on: every endpoint dead, answers fail open, each with its pool of 64
shaped orders, ~150 KB) and in a plain zone (8 rotated orders each); each name is asked three
times in a row over UDP (the third from a fast-path row), twice over. With
`--cache-max-bytes 1048576` the sidecar's resident memory (VmRSS from /proc) grows by at most
that budget plus 5 MB over its idle size (measured after one name was asked and probed, so
that every code path has run once)."""

from __future__ import annotations

import socket
import time

import dns.message
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
    """Ask for `label` three times in a row (the third from a fast-path row): all answered
    with every address? The answer count is read from the reply's header: parsing 32
    records with dnspython took ~3 ms a reply here, most of the test's time; that the
    records themselves are right is other tests' business (test_answer_order.py)."""
    query = dns.message.make_query(f"{label}.{ZONE}.", "A", use_edns=0, payload=4096)
    answered = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(3.0)
        client.connect((sc.addr, sc.port))
        for qid in range(3):
            query.id = qid
            client.send(query.to_wire())
            reply = client.recv(65535)
            answered += (
                reply[:2] == qid.to_bytes(2, "big")  # its ID
                and reply[3] & 0x0F == 0  # NOERROR
                and reply[6:8] == ADDRESSES.to_bytes(2, "big")  # ANCOUNT: every address
            )
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
