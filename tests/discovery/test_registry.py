"""Answers made from the Cloud Map registry (discovery/registry.py), read back by dnspython."""

from __future__ import annotations

import dns.message
import dns.rcode
from dnslib import AAAA, QTYPE, RR, SOA, SRV, A, DNSRecord

from sidecar.core import wire
from sidecar.core.routing import name_to_wire
from sidecar.discovery.registry import (
    Instance,
    Listing,
    availability_zones,
    instances_of,
    registry_reply,
)

NAME = "resource-server.local"
WIRE = name_to_wire(NAME)


def upstream(qtype: str, addresses: list[str], rcode: int = 0, ttl: int = 60) -> bytes:
    reply = DNSRecord.question(NAME, qtype).reply()
    reply.header.rcode = rcode
    for address in addresses:
        rdata = AAAA(address) if ":" in address else A(address)
        reply.add_answer(RR(NAME, getattr(QTYPE, qtype), rdata=rdata, ttl=ttl))
    if not addresses:
        reply.add_auth(RR("local", QTYPE.SOA, rdata=SOA("ns.local", "h.local", (1, 2, 3, 4, 60))))
    return bytes(reply.pack())


def listing(*instances: Instance) -> Listing:
    return Listing(tuple(instances), 0.0)


def twelve() -> Listing:
    return listing(
        *(Instance(f"task-{i:02d}", f"10.0.0.{i}", port=8000 + i, az="a") for i in range(1, 13))
    )


def answered(msg: bytes) -> dns.message.Message:
    return dns.message.from_wire(msg)


def made(msg: bytes, qtype: int, got: Listing | None, negative_ttl: int = 5) -> object:
    return registry_reply(msg, wire.parse_reply(msg), qtype, WIRE, got, negative_ttl)


def test_every_registered_instance_replaces_route53s_eight() -> None:
    msg = upstream("A", [f"10.0.0.{i}" for i in (1, 3, 4, 5, 7, 8, 10, 12)])
    result = made(msg, wire.TYPE_A, twelve())
    assert result is not None and result.kind == "merged"  # type: ignore[attr-defined]
    reply = answered(result.msg)  # type: ignore[attr-defined]
    addresses = sorted(rr.address for rrset in reply.answer for rr in rrset)
    assert addresses == sorted(f"10.0.0.{i}" for i in range(1, 13))
    assert reply.answer[0].ttl == 60  # the DNS answer's TTL
    assert reply.id == answered(msg).id and reply.rcode() == dns.rcode.NOERROR
    assert sorted(result.added) == sorted(  # type: ignore[attr-defined]
        (f"10.0.0.{i}", None) for i in (2, 6, 9, 11)
    )
    cached = wire.parse_reply(result.msg)  # type: ignore[attr-defined]
    assert [r.section for r in cached.records] == [0] * 12


def test_a_deregistered_instance_leaves_even_while_dns_lists_it() -> None:
    msg = upstream("A", ["10.0.0.1", "10.0.0.2"])
    result = made(msg, wire.TYPE_A, listing(Instance("t1", "10.0.0.1")))
    assert result is not None
    assert [rr.address for rr in answered(result.msg).answer[0]] == ["10.0.0.1"]  # type: ignore[attr-defined]
    assert result.added == ()  # type: ignore[attr-defined]


def test_no_listing_an_empty_one_or_the_same_addresses_leave_the_reply_as_it_came() -> None:
    msg = upstream("A", ["10.0.0.1", "10.0.0.2"])
    same = listing(Instance("t1", "10.0.0.1"), Instance("t2", "10.0.0.2"))
    assert made(msg, wire.TYPE_A, None) is None
    assert made(msg, wire.TYPE_A, listing()) is None
    assert made(msg, wire.TYPE_A, same) is None
    assert made(msg, wire.TYPE_AAAA, same) is None  # no IPv6 instance: DNS stands


def test_nxdomain_and_nodata_are_not_believed_while_live_instances_are_listed() -> None:
    live = listing(
        Instance("t1", "10.0.0.1", health="HEALTHY"),
        Instance("t2", "10.0.0.2", health="UNHEALTHY"),
        Instance("t3", "10.0.0.3"),  # UNKNOWN counts as live
    )
    for rcode in (dns.rcode.NXDOMAIN, dns.rcode.NOERROR):
        result = made(upstream("A", [], rcode), wire.TYPE_A, live, negative_ttl=5)
        assert result is not None and result.kind == "negative_replaced"  # type: ignore[attr-defined]
        reply = answered(result.msg)  # type: ignore[attr-defined]
        assert reply.rcode() == dns.rcode.NOERROR and not reply.authority
        assert sorted(rr.address for rr in reply.answer[0]) == ["10.0.0.1", "10.0.0.3"]
        assert reply.answer[0].ttl == 5
    dead = listing(Instance("t2", "10.0.0.2", health="UNHEALTHY"))
    assert made(upstream("A", [], dns.rcode.NXDOMAIN), wire.TYPE_A, dead) is None


def test_a_cname_answer_or_a_servfail_is_left_alone() -> None:
    reply = DNSRecord.question(NAME, "A").reply()
    reply.add_answer(*RR.fromZone(f"{NAME} 60 CNAME other.local."))
    msg = bytes(reply.pack())
    assert made(msg, wire.TYPE_A, twelve()) is None
    assert made(upstream("A", [], dns.rcode.SERVFAIL), wire.TYPE_A, twelve()) is None


def test_srv_answers_carry_every_instance_with_its_port_and_address() -> None:
    reply = DNSRecord.question(NAME, "SRV").reply()
    reply.add_answer(RR(NAME, QTYPE.SRV, rdata=SRV(1, 1, 8001, f"task-01.{NAME}"), ttl=30))
    reply.add_ar(RR(f"task-01.{NAME}", QTYPE.A, rdata=A("10.0.0.1"), ttl=30))
    msg = bytes(reply.pack())
    both = Instance("task-13", "10.0.0.13", "2001:db8::13", port=9000)
    result = made(msg, 33, listing(*twelve().instances, both))
    assert result is not None
    parsed = answered(result.msg)  # type: ignore[attr-defined]
    srv = sorted((rr.port, rr.target.to_text()) for rr in parsed.answer[0])
    assert len(srv) == 13 and srv[0] == (8001, f"task-01.{NAME}.")
    owners = {(str(rrset.name), rr.address) for rrset in parsed.additional for rr in rrset}
    assert {(f"task-13.{NAME}.", "10.0.0.13"), (f"task-13.{NAME}.", "2001:db8::13")} <= owners
    assert {rr.address for rrset in parsed.additional for rr in rrset} == {
        *(f"10.0.0.{i}" for i in range(1, 14)),
        "2001:db8::13",
    }
    assert ("10.0.0.13", 9000) in result.added  # type: ignore[attr-defined]
    assert ("10.0.0.1", 8001) not in result.added  # type: ignore[attr-defined]
    # The records the cache walks: 13 SRV answers, 14 additional addresses.
    walked = wire.parse_reply(result.msg)  # type: ignore[attr-defined]
    assert [r.section for r in walked.records].count(2) == 14


def test_instances_are_read_from_discover_instances() -> None:
    raw = [
        {
            "InstanceId": "b",
            "HealthStatus": "UNKNOWN",
            "Attributes": {
                "AWS_INSTANCE_IPV4": "10.0.0.2",
                "AWS_INSTANCE_PORT": "8080",
                "AVAILABILITY_ZONE": "us-east-1b",
            },
        },
        {
            "InstanceId": "a",
            "HealthStatus": "HEALTHY",
            "Attributes": {"AWS_INSTANCE_IPV6": "2001:DB8::1"},
        },
        {"InstanceId": "c", "HealthStatus": "HEALTHY", "Attributes": {"AWS_INSTANCE_PORT": "1"}},
        {"InstanceId": "d", "Attributes": {"AWS_INSTANCE_IPV4": "::1", "AWS_INSTANCE_PORT": "x"}},
    ]
    got = instances_of(raw)
    assert got == (
        Instance("a", None, "2001:db8::1", None, "HEALTHY", None),
        Instance("b", "10.0.0.2", None, 8080, None, "us-east-1b"),
    )
    assert availability_zones(got) == {"10.0.0.2": "us-east-1b"}
