"""answer_order end to end: a name with three A records in a plain zone, served by NSD, asked
300 times by dnspython over UDP (after the first asks the fast path's rows answer) and over
TCP (the cache): every address comes first about a third of the time. With
`--answer-order upstream` the order never changes."""

from __future__ import annotations

from collections import Counter

import dns.message
import dns.query
import dns.rdatatype
import pytest

from tests.fakes.nsd import NsdServer
from tests.integration.conftest import Sidecar, StartSidecar

pytestmark = pytest.mark.integration

NAME = "resource-server.local."
ADDRESSES = ("10.0.0.1", "10.0.0.2", "10.0.0.3")  # its A records in LOCAL_ZONE
ASKS = 300


def first_addresses(sc: Sidecar, transport: str, asks: int = ASKS) -> Counter[str]:
    ask = dns.query.udp if transport == "udp" else dns.query.tcp
    firsts: Counter[str] = Counter()
    for _ in range(asks):
        reply = ask(dns.message.make_query(NAME, "A"), sc.addr, port=sc.port, timeout=2.0)
        (rrset,) = [r for r in reply.answer if r.rdtype == dns.rdatatype.A]
        order = [rdata.address for rdata in rrset]  # the wire order, as dnspython read it
        assert sorted(order) == list(ADDRESSES)
        firsts[order[0]] += 1
    return firsts


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_each_of_three_addresses_comes_first_about_a_third_of_the_time(
    sidecar: StartSidecar, nsd_local: NsdServer, transport: str
) -> None:
    sc = sidecar("--upstream", nsd_local.address)
    firsts = first_addresses(sc, transport)
    assert set(firsts) == set(ADDRESSES), firsts
    assert min(firsts.values()) >= 60, firsts  # evenly: 100 each, give or take the start


def test_answer_order_upstream_keeps_one_order(sidecar: StartSidecar, nsd_local: NsdServer) -> None:
    sc = sidecar("--upstream", nsd_local.address, "--answer-order", "upstream")
    firsts = first_addresses(sc, "udp", 50) + first_addresses(sc, "tcp", 20)
    assert len(firsts) == 1, firsts
