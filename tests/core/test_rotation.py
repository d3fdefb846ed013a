"""Rotated pools without sockets: which answers get one, evenness, CNAMEs, charges, retirement."""

from __future__ import annotations

import random
from collections import Counter

from dnslib import AAAA, CNAME, QTYPE, RR, A, DNSRecord

from sidecar.core import wire
from sidecar.core.cache import VARIANT_OVERHEAD, CacheSettings, Entry, TtlCache
from sidecar.core.rotation import MAX_ORDERS, Rotator, address_rrset
from sidecar.core.routing import name_to_wire
from tests.native import attributes

NAME = "web.example"


def query(name: str = NAME, qtype: str = "A") -> bytes:
    return bytes(DNSRecord.question(name, qtype).pack())


def reply(addresses: list[str], *, cname: str | None = None, qtype: str = "A") -> bytes:
    record = DNSRecord.question(NAME, qtype).reply()
    owner = NAME
    if cname is not None:
        record.add_answer(RR(NAME, QTYPE.CNAME, rdata=CNAME(cname), ttl=60))
        owner = cname
    for address in addresses:
        rdata = AAAA(address) if ":" in address else A(address)
        record.add_answer(RR(owner, getattr(QTYPE, qtype), rdata=rdata, ttl=60))
    return bytes(record.pack())


class Setup:
    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.cache = TtlCache(CacheSettings(max_bytes=max_bytes))
        self.rotator = Rotator(random.Random(5), self.cache.charge)
        self.cache.on_retire = self.rotator.retire

    def store(self, msg: bytes, now: float = 100.0, qtype: str = "A") -> tuple[bytes, Entry]:
        q = wire.parse_query(query(qtype=qtype))
        walked = wire.parse_reply(msg)
        entry = self.cache.store(q.key, msg, walked, now, False)
        self.rotator.rotate(q.key, entry, msg, walked, False, now)
        return q.key, entry

    def answers(self, key: bytes, entry: Entry, asks: int, now: float = 100.0) -> list[list[str]]:
        pool = self.rotator.of(key, entry)
        assert pool is not None
        data = query()
        q = wire.parse_query(data)
        return [
            [str(rr.rdata) for rr in DNSRecord.parse(pool.render(data, q, now, 4096, 60)).rr]
            for _ in range(asks)
        ]


def test_one_address_gets_no_pool_and_no_charge() -> None:
    s = Setup()
    key, entry = s.store(reply(["192.0.2.1"]))
    assert s.rotator.of(key, entry) is None and len(s.rotator) == 0
    assert s.cache.charged(key) == 0


def test_three_addresses_come_first_in_turn_each_a_third_of_the_time() -> None:
    s = Setup()
    addresses = ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
    key, entry = s.store(reply(addresses))
    answers = s.answers(key, entry, 300)
    assert Counter(answer[0] for answer in answers) == dict.fromkeys(addresses, 100)
    for answer in answers:  # a rotation of the upstream's order, every address in it
        start = addresses.index(answer[0])
        assert answer == addresses[start:] + addresses[:start]


def test_a_cname_chain_stays_first_and_aaaa_rotates_too() -> None:
    s = Setup()
    addresses = ["2001:db8::1", "2001:db8::2"]
    key, entry = s.store(reply(addresses, cname="backend.example", qtype="AAAA"), qtype="AAAA")
    pool = s.rotator.of(key, entry)
    assert pool is not None
    data = query(qtype="AAAA")
    q = wire.parse_query(data)
    firsts: Counter[str] = Counter()
    for _ in range(10):
        parsed = DNSRecord.parse(pool.render(data, q, 100.0, 4096, 60))
        assert parsed.rr[0].rtype == QTYPE.CNAME and len(parsed.rr) == 3
        firsts[str(parsed.rr[1].rdata)] += 1
    assert firsts == dict.fromkeys(addresses, 5)


def test_more_addresses_than_orders_move_on_so_each_gets_its_turn_first() -> None:
    s = Setup()
    addresses = [f"192.0.2.{i}" for i in range(1, 33)]
    key, entry = s.store(reply(addresses))
    pool = s.rotator.of(key, entry)
    assert pool is not None and len(pool.variants) == MAX_ORDERS
    firsts: Counter[str] = Counter()
    for second in range(32):  # one move a second: a full turn in 32 s
        for answer in s.answers(key, entry, MAX_ORDERS, now=100.0 + second):
            firsts[answer[0]] += 1
            assert sorted(answer) == sorted(addresses)
    assert firsts == dict.fromkeys(addresses, MAX_ORDERS)


def test_records_whose_names_could_be_pointed_into_are_left_in_order() -> None:
    msg = reply(["192.0.2.1", "192.0.2.2"])
    walked = wire.parse_reply(msg)
    assert address_rrset(msg, walked) == (0, 2)
    # The same reply with the first record's owner name written out, not compressed.
    first = walked.records[0]
    owner = name_to_wire(NAME)
    uncompressed = msg[: first.start] + owner + msg[first.start + 2 :]
    assert address_rrset(uncompressed, wire.parse_reply(uncompressed)) is None


def test_a_mixed_or_negative_answer_gets_no_pool() -> None:
    s = Setup()
    record = DNSRecord.question(NAME).reply()
    record.add_answer(RR(NAME, QTYPE.A, rdata=A("192.0.2.1"), ttl=60))
    record.add_answer(RR(NAME, QTYPE.CNAME, rdata=CNAME("x.example"), ttl=60))
    key, entry = s.store(bytes(record.pack()))
    assert s.rotator.of(key, entry) is None


def test_the_pool_is_charged_to_its_key_and_goes_when_the_entry_retires() -> None:
    s = Setup()
    key, entry = s.store(reply(["192.0.2.1", "192.0.2.2", "192.0.2.3"]))
    pool = s.rotator.of(key, entry)
    variant = VARIANT_OVERHEAD + len(entry.body)
    assert pool is not None and s.cache.charged(key) > pool.cost > 3 * variant
    assert s.cache.bytes == entry.cost + len(key) + s.cache.charged(key)
    s.store(reply(["192.0.2.9"]))  # replaced by a one-address answer
    assert len(s.rotator) == 0 and s.cache.charged(key) == 0
    (only,) = s.cache._entries.values()
    assert s.cache.bytes == only.cost + len(key)


def test_the_cached_entry_is_never_written_to() -> None:
    s = Setup()
    key, entry = s.store(reply(["192.0.2.1", "192.0.2.2"]))
    before = {slot: getattr(entry, slot) for slot in attributes(Entry)}
    s.answers(key, entry, 5)
    assert {slot: getattr(entry, slot) for slot in attributes(Entry)} == before
