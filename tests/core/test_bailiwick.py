"""Bailiwick and the cache's memory bound: records for other names are never cached, and the
cache's estimated bytes stay under max_bytes."""

from __future__ import annotations

import tracemalloc

import pytest
from dnslib import CNAME, DNAME, NS, QTYPE, RR, SOA, A, DNSRecord

from sidecar.core import bailiwick, wire
from sidecar.core.cache import CacheSettings, TtlCache
from sidecar.core.routing import name_to_wire

SOA_LOCAL = RR("local", QTYPE.SOA, rdata=SOA("ns.local", "hm.local", (1, 60, 60, 60, 30)), ttl=30)


def reply(
    qname: str,
    answers: tuple[RR, ...] = (),
    authority: tuple[RR, ...] = (),
    additional: tuple[RR, ...] = (),
    rcode: int = 0,
) -> bytes:
    record = DNSRecord.question(qname).reply()
    record.header.rcode = rcode
    for rr in answers:
        record.add_answer(rr)
    for rr in authority:
        record.add_auth(rr)
    for rr in additional:
        record.add_ar(rr)
    return bytes(record.pack())


def a(name: str, address: str = "192.0.2.1") -> RR:
    return RR(name, QTYPE.A, rdata=A(address), ttl=60)


def cname(name: str, target: str) -> RR:
    return RR(name, QTYPE.CNAME, rdata=CNAME(target), ttl=60)


def judged(qname: str, msg: bytes, zone: str = ".") -> bool:
    return bailiwick.in_bailiwick(
        msg, wire.parse_reply(msg), name_to_wire(qname), name_to_wire(zone)
    )


@pytest.mark.parametrize(
    ("qname", "msg", "zone"),
    [
        ("www.example.test", reply("www.example.test", (a("www.example.test"),)), "."),
        ("WWW.Example.TEST", reply("www.example.test", (a("www.EXAMPLE.test"),)), "."),
        (
            "www.example.test",
            reply(
                "www.example.test",
                (
                    a("cdn.example.net"),  # in any order
                    cname("www.example.test", "alias.example.test"),
                    cname("alias.example.test", "cdn.example.net"),
                ),
            ),
            ".",
        ),
        (
            "a.b.example.test",
            reply(
                "a.b.example.test",
                (
                    RR("b.example.test", QTYPE.DNAME, rdata=DNAME("c.example.test"), ttl=60),
                    cname("a.b.example.test", "a.c.example.test"),
                    a("a.c.example.test"),
                ),
            ),
            ".",
        ),
        ("gone.local", reply("gone.local", authority=(SOA_LOCAL,), rcode=3), "local"),
        (  # the enclosing zone's SOA above a configured zone that is deeper than the real one
            "x.svc.local",
            reply("x.svc.local", authority=(SOA_LOCAL,), rcode=3),
            "svc.local",
        ),
        (
            "srv.local",
            reply(
                "srv.local",
                (a("srv.local"),),
                (RR("local", QTYPE.NS, rdata=NS("ns.local"), ttl=60),),
                (a("ns.local"),),
            ),
            "local",
        ),
        (  # for the default upstreams everything is below the root: extras pass
            "www.example.test",
            reply("www.example.test", (a("www.example.test"),), additional=(a("ns.other.net"),)),
            ".",
        ),
    ],
)
def test_in_bailiwick(qname: str, msg: bytes, zone: str) -> None:
    assert judged(qname, msg, zone)


@pytest.mark.parametrize(
    ("qname", "msg", "zone"),
    [
        (  # the classic: an extra answer for a name nobody asked about
            "x.attacker.test",
            reply("x.attacker.test", (a("x.attacker.test"), a("www.bank.test", "6.6.6.6"))),
            ".",
        ),
        ("www.example.test", reply("www.example.test", (a("other.example.test"),)), "."),
        (  # a CNAME that does not start at the question
            "www.example.test",
            reply(
                "www.example.test",
                (cname("other.example.test", "www.bank.test"), a("www.bank.test", "6.6.6.6")),
            ),
            ".",
        ),
        (  # a DNAME at a name that is no ancestor of the chain
            "a.b.example.test",
            reply(
                "a.b.example.test",
                (
                    RR("bank.test", QTYPE.DNAME, rdata=DNAME("evil.test"), ttl=60),
                    a("a.b.example.test"),
                ),
            ),
            ".",
        ),
        (  # a plain A record at an ancestor is not allowed in the answer section
            "a.b.example.test",
            reply("a.b.example.test", (a("a.b.example.test"), a("example.test", "6.6.6.6"))),
            ".",
        ),
        (  # additional data outside the zone the question was routed by
            "srv.local",
            reply("srv.local", (a("srv.local"),), additional=(a("www.bank.test", "6.6.6.6"),)),
            "local",
        ),
        (  # authority for a sibling zone
            "srv.local",
            reply(
                "srv.local",
                (a("srv.local"),),
                (RR("bank.test", QTYPE.NS, rdata=NS("ns.evil.test"), ttl=60),),
            ),
            "local",
        ),
    ],
)
def test_out_of_bailiwick(qname: str, msg: bytes, zone: str) -> None:
    assert not judged(qname, msg, zone)


def test_unreadable_cname_target_is_out_of_bailiwick() -> None:
    msg = bytearray(reply("w.test", (cname("w.test", "x.test"),)))
    msg[-1] = 0xC0  # the target's last byte turned into half a pointer
    assert not judged("w.test", bytes(msg))


def test_at_or_below_matches_whole_labels() -> None:
    w = name_to_wire
    assert bailiwick.at_or_below(w("a.local"), w("local"))
    assert bailiwick.at_or_below(w("local"), w("local"))
    assert bailiwick.at_or_below(w("anything"), bailiwick.ROOT)
    assert not bailiwick.at_or_below(w("a.nonlocal"), w("local"))
    assert not bailiwick.at_or_below(w("local"), w("a.local"))


def query_key(name: str) -> bytes:
    return wire.parse_query(bytes(DNSRecord.question(name).pack())).key


class TestCache:
    def test_out_of_bailiwick_reply_is_served_once_but_not_cached(self) -> None:
        cache = TtlCache(CacheSettings())
        msg = reply("x.attacker.test", (a("x.attacker.test"), a("www.bank.test", "6.6.6.6")))
        key = query_key("x.attacker.test")
        entry = cache.store(key, msg, wire.parse_reply(msg), 100.0, False)
        assert entry.ttl == 0  # served to the clients waiting for it, with upstream TTLs
        assert cache.get(key, 100.0) is None and len(cache) == 0
        assert cache.get(query_key("www.bank.test"), 100.0) is None

    def test_zone_given_to_store_is_the_routing_zone(self) -> None:
        cache = TtlCache(CacheSettings())
        msg = reply("srv.local", (a("srv.local"),), additional=(a("www.bank.test"),))
        key = query_key("srv.local")
        cache.store(key, msg, wire.parse_reply(msg), 100.0, False, name_to_wire("local"))
        assert cache.get(key, 100.0) is None
        cache.store(key, msg, wire.parse_reply(msg), 100.0, False)  # routed by the root
        assert cache.get(key, 100.0) is not None


class TestMaxBytes:
    def test_bytes_are_counted_as_entries_come_and_go(self) -> None:
        cache = TtlCache(CacheSettings())
        keys = []
        for i in range(10):
            name = f"n{i}.example.test"
            msg = reply(name, (a(name),))
            keys.append(query_key(name))
            cache.store(keys[-1], msg, wire.parse_reply(msg), 100.0, False)
        costs = [entry.cost + len(key) for key, entry in cache._entries.items()]
        assert cache.bytes == sum(costs) and 250 < costs[0] < 400
        cache.get_stale(keys[0], 100.0 + 60 + 10**6)  # too old even for stale: removed
        assert cache.bytes == sum(costs[1:])

    def test_the_estimate_is_close_to_what_python_allocates(self) -> None:
        cache = TtlCache(CacheSettings(max_entries=5000))
        stored = []
        for i in range(2000):
            name = f"n{i}.example.test"
            msg = reply(name, (a(name), a(name, "10.0.0.2")))
            stored.append((query_key(name), msg, wire.parse_reply(msg)))
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for key, msg, walked in stored:
                cache.store(key, msg, walked, 100.0, False)
            allocated = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        keys = sum(len(key) for key, _msg, _walked in stored)  # allocated before, charged too
        assert 0.8 < cache.bytes / (allocated + keys) < 1.25

    def test_least_recently_used_evicted_to_stay_under_max_bytes(self) -> None:
        limit = 1 << 18
        cache = TtlCache(CacheSettings(max_bytes=limit))
        template = reply(
            "big000.example.test",
            tuple(a("big000.example.test", f"10.0.0.{i}") for i in range(60)),
        )
        stored = 0
        for i in range(400):
            name = f"big{i:03d}.example.test"
            msg = template.replace(b"big000", name[:6].encode())
            cache.store(query_key(name), msg, wire.parse_reply(msg), 100.0, False)
            stored += 1
            assert cache.bytes <= limit
        assert cache.counters.cache_evictions > 0 and len(cache) < stored
        last = query_key("big399.example.test")
        assert cache.get(last, 100.0) is not None  # the newest stays
        assert cache.get(query_key("big000.example.test"), 100.0) is None  # the oldest went
