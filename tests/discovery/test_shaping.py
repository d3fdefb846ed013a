"""Answer shaping without sockets: filtering, fail-open, weighted order, max answers, TTL."""

from __future__ import annotations

import random
import struct
from collections import Counter

import dns.message
import dns.name
import pytest
from dnslib import CNAME, QTYPE, RR, A, DNSRecord

from sidecar.core import wire
from sidecar.core.cache import CacheSettings, TtlCache
from sidecar.discovery.endpoints import EndpointTable
from sidecar.discovery.shaping import (
    ShapedAnswer,
    ShapeSettings,
    exact_shares,
    shape,
    weighted_order,
    weights,
)

NAME = "resource-server.local"
ADDRESSES = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]


def reply(addresses: list[str] = ADDRESSES, ttl: int = 60, cname: bool = False) -> bytes:
    record = DNSRecord.question(NAME).reply()
    owner = NAME
    if cname:
        owner = "task.local"
        record.add_answer(RR(NAME, QTYPE.CNAME, rdata=CNAME(owner), ttl=ttl))
    for address in addresses:
        record.add_answer(RR(owner, QTYPE.A, rdata=A(address), ttl=ttl))
    return bytes(record.pack())


def shaped_answer(
    table: EndpointTable, settings: ShapeSettings | None = None, msg: bytes | None = None
) -> tuple[ShapedAnswer, wire.Query, bytes]:
    settings = settings or ShapeSettings()
    msg = msg or reply()
    query = bytes(DNSRecord.question(NAME).pack())
    q = wire.parse_query(query)
    walked = wire.parse_reply(msg)
    entry = TtlCache(CacheSettings()).store(q.key, msg, walked, 100.0, False)
    rng = random.Random(3)
    shaped = shape(entry, msg, walked, "local", False, table, settings, rng, {}, 100.0)
    assert shaped is not None
    return shaped, q, query


def set_health(table: EndpointTable, health: dict[str, tuple[bool, float]]) -> None:
    for endpoint in table.due(100.0):
        ok, latency = health[endpoint.address]
        table.probed(endpoint, ok, latency if ok else None, 100.0)


def firsts(shaped: ShapedAnswer, q: wire.Query, query: bytes, n: int = 400) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(n):
        answer = DNSRecord.parse(shaped.render(query, q, 101.0, 4096, 59))
        addresses = [str(rr.rdata) for rr in answer.rr if rr.rtype == QTYPE.A]
        seen[addresses[0]] += 1
    return seen


def test_weights_fall_steeply_with_latency_beyond_the_slack() -> None:
    w = weights([0.0001, 0.008, 0.012, 0.0805, 0.030], slack=0.010, scale=0.005, steepness=3.0)
    assert w[0] == w[1] == 1.0  # probe noise within ~10 ms is not a reason to herd
    assert 0.3 < w[2] < 0.5  # 2 ms past the slack
    assert w[3] < 0.001  # 80 ms slower is almost never first
    assert w[4] < 0.01  # 30 ms slower is rarely first
    assert weights([0.001, 0.003, None], 0.010, 0.005, 3.0)[2] == 1.0  # unknown: the median
    # Relative slack for slow services: 25% of the best.
    assert weights([0.200, 0.240], 0.010, 0.005, 3.0) == [1.0, 1.0]
    assert weights([0.200, 0.300], 0.010, 0.005, 3.0)[1] < 0.01


def test_weighted_order_draws_every_item_once() -> None:
    rng = random.Random(5)
    order = weighted_order([1, 2, 3], [1.0, 1.0, 1.0], rng)
    assert sorted(order) == [1, 2, 3]
    counts = Counter(weighted_order([1, 2], [9.0, 1.0], rng)[0] for _ in range(2000))
    assert 0.85 < counts[1] / 2000 < 0.95


def test_dead_never_first_slow_rarely_fast_share() -> None:
    table = EndpointTable(rng=random.Random(2))
    shaped, q, query = shaped_answer(table)
    set_health(
        table,
        {
            "10.0.0.1": (False, 0.0),
            "10.0.0.2": (True, 0.0805),
            "10.0.0.3": (True, 0.0005),
            "10.0.0.4": (True, 0.0006),
        },
    )
    seen = firsts(shaped, q, query)
    assert seen["10.0.0.1"] == 0
    assert seen["10.0.0.2"] <= 40
    assert seen["10.0.0.3"] >= 100 and seen["10.0.0.4"] >= 100
    answer = DNSRecord.parse(shaped.render(query, q, 101.0, 4096, 59))
    assert "10.0.0.1" not in [str(rr.rdata) for rr in answer.rr]  # left out, not just last
    assert shaped.action == "filtered"


def test_all_dead_fails_open() -> None:
    table = EndpointTable()
    shaped, q, query = shaped_answer(table)
    set_health(table, {a: (False, 0.0) for a in ADDRESSES})
    answer = DNSRecord.parse(shaped.render(query, q, 101.0, 4096, 59))
    assert sorted(str(rr.rdata) for rr in answer.rr) == ADDRESSES
    assert shaped.action == "failed_open"


def test_max_answers_and_ttl_cap_and_cname_kept() -> None:
    table = EndpointTable()
    settings = ShapeSettings(max_answers=1, answer_ttl=5)
    shaped, q, query = shaped_answer(table, settings, reply(cname=True))
    set_health(table, {a: (True, 0.001) for a in ADDRESSES})
    answer = DNSRecord.parse(shaped.render(query, q, 101.0, 4096, 59))
    assert [rr.rtype for rr in answer.rr] == [QTYPE.CNAME, QTYPE.A]
    assert {rr.ttl for rr in answer.rr} == {5}
    assert answer.header.id == DNSRecord.parse(query).header.id
    assert len(firsts(shaped, q, query, 200)) == 4  # every healthy endpoint gets a turn


def test_shaped_entry_is_a_copy_and_cache_keeps_upstream_ttl() -> None:
    table = EndpointTable()
    shaped, q, query = shaped_answer(table)
    set_health(table, {a: (a != "10.0.0.1", 0.001) for a in ADDRESSES})
    shaped.render(query, q, 101.0, 4096, 59)
    plain = DNSRecord.parse(shaped.base.render(query, q, 101.0, 4096))
    assert len(plain.rr) == 4 and plain.rr[0].ttl == 59


@pytest.mark.parametrize("qtype", ["TXT", "MX"])
def test_only_address_answers_are_shaped(qtype: str) -> None:
    record = DNSRecord.question(NAME, qtype).reply()
    record.add_answer(
        *RR.fromZone(f"{NAME} 60 IN {qtype} {'10 mx.local.' if qtype == 'MX' else 'x'}")
    )
    msg = bytes(record.pack())
    q = wire.parse_query(bytes(DNSRecord.question(NAME, qtype).pack()))
    walked = wire.parse_reply(msg)
    entry = TtlCache(CacheSettings()).store(q.key, msg, walked, 100.0, False)
    assert (
        shape(
            entry,
            msg,
            walked,
            "local",
            False,
            EndpointTable(),
            ShapeSettings(),
            random.Random(),
            {},
            100.0,
        )
        is None
    )


def test_the_pool_is_drawn_again_only_when_this_answer_would_change() -> None:
    table = EndpointTable(rng=random.Random(2))
    shaped, q, query = shaped_answer(table)
    set_health(table, {a: (True, 0.001) for a in ADDRESSES})
    shaped.render(query, q, 101.0, 4096, 59)
    pool = shaped.variants
    for endpoint in list(table.endpoints.values()):  # probe noise within band 0
        endpoint.probing = True
        table.probed(endpoint, True, 0.004, 102.0)
    table.version += 1  # as if some other answer's endpoint had changed
    shaped.render(query, q, 103.0, 4096, 59)
    assert shaped.variants is pool
    endpoint = table.get("local", "10.0.0.2")
    assert endpoint is not None
    for _ in range(2):
        endpoint.probing = True
        table.probed(endpoint, False, None, 104.0)
    shaped.render(query, q, 105.0, 4096, 59)
    assert shaped.variants is not pool and shaped.action == "filtered"


def test_a_latency_change_alone_redraws_the_pool_at_most_every_two_seconds() -> None:
    table = EndpointTable(rng=random.Random(2))
    shaped, q, query = shaped_answer(table)
    set_health(table, {a: (True, 0.001) for a in ADDRESSES})
    shaped.refresh(101.0)
    pool = shaped.variants
    slow = table.get("local", "10.0.0.3")
    assert slow is not None
    for _ in range(6):  # 10.0.0.3 turns 60 ms slower: a weight far below the others'
        slow.probing = True
        table.probed(slow, True, 0.060, 101.5)
    shaped.refresh(102.0)  # drawn 1 s ago: not yet
    assert shaped.variants is pool
    shaped.refresh(103.0)  # 2 s: now, without any further change to the table
    assert shaped.variants is not pool
    firsts = Counter(
        str(DNSRecord.parse(v.render(query, q, 103.0, 4096)).rr[0].rdata) for v in shaped.variants
    )
    assert firsts["10.0.0.3"] <= 2


def pool_firsts(shaped: ShapedAnswer, q: wire.Query, query: bytes) -> Counter[str]:
    shaped.refresh(101.0)
    return Counter(
        str(DNSRecord.parse(v.render(query, q, 101.0, 4096)).rr[0].rdata) for v in shaped.variants
    )


def test_equally_healthy_endpoints_lead_the_pool_in_exact_shares() -> None:
    table = EndpointTable()
    shaped, q, query = shaped_answer(table)
    set_health(table, {a: (True, 0.001) for a in ADDRESSES})
    assert pool_firsts(shaped, q, query) == dict.fromkeys(ADDRESSES, 16)
    table = EndpointTable()
    shaped, q, query = shaped_answer(table)
    set_health(table, {a: (a != "10.0.0.4", 0.001) for a in ADDRESSES})  # 64 / 3 each
    assert sorted(pool_firsts(shaped, q, query).values()) == [21, 21, 22]


def test_exact_shares_follow_the_weights_and_add_up() -> None:
    rng = random.Random(5)
    assert exact_shares([1.0, 1.0, 2.0], 64, rng) == [16, 16, 32]
    assert sum(exact_shares([0.3, 0.3, 0.3], 64, rng)) == 64
    assert exact_shares([0.0, 0.0], 10, rng) == [5, 5]
    assert exact_shares([], 64, rng) == []


def _record(owner: bytes, address: str) -> bytes:
    return owner + struct.pack("!HHIH", 1, 1, 60, 4) + bytes(map(int, address.split(".")))


def _handmade_reply(second_owner_points_at_first: bool) -> bytes:
    """svc.local A 10.0.0.1, 10.0.0.2: the first owner written out in full; the second owner
    a pointer to the question (what servers send) or to the first record's owner."""
    name = b"\x03svc\x05local\x00"
    question = name + struct.pack("!HH", 1, 1)
    header = struct.pack("!HHHHHH", 7, 0x8580, 1, 2, 0, 0)
    first_at = len(header) + len(question)
    second_owner = struct.pack("!H", 0xC000 | (first_at if second_owner_points_at_first else 12))
    return header + question + _record(name, "10.0.0.1") + _record(second_owner, "10.0.0.2")


@pytest.mark.parametrize("points_at_first", [False, True])
def test_variants_are_spliced_when_safe_and_re_packed_when_not(points_at_first: bool) -> None:
    msg = _handmade_reply(points_at_first)
    table = EndpointTable()
    query = bytes(DNSRecord.question("svc.local").pack())
    q = wire.parse_query(query)
    walked = wire.parse_reply(msg)
    entry = TtlCache(CacheSettings()).store(q.key, msg, walked, 100.0, False)
    settings = ShapeSettings(max_answers=1)
    rng = random.Random(3)
    shaped = shape(entry, msg, walked, "local", False, table, settings, rng, {}, 100.0)
    assert shaped is not None
    assert shaped.spliceable is not points_at_first
    assert shaped.addresses == ["10.0.0.1", "10.0.0.2"]
    set_health(table, {"10.0.0.1": (True, 0.001), "10.0.0.2": (True, 0.001)})
    shaped.refresh(101.0)
    seen = set()
    for variant in shaped.variants:  # read by dnspython, another parser than ours
        answer = dns.message.from_wire(variant.render(query, q, 101.0, 4096))
        (rrset,) = answer.answer
        assert rrset.name == dns.name.from_text("svc.local.") and len(rrset) == 1
        seen.add(str(next(iter(rrset))))
    assert seen == {"10.0.0.1", "10.0.0.2"}


def test_a_name_points_below_a_limit_or_ends_in_the_root() -> None:
    msg = _handmade_reply(second_owner_points_at_first=True)
    first_at = 12 + 15
    second_at = first_at + 11 + 14
    assert wire.name_points_below(msg, first_at, first_at)  # written out, root-terminated
    assert not wire.name_points_below(msg, second_at, first_at)  # points at the first record
    assert wire.name_points_below(msg, second_at, first_at + 1)


def first_shares(shaped: ShapedAnswer, q: wire.Query, query: bytes, now: float) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(640):
        answer = DNSRecord.parse(shaped.render(query, q, now, 4096, 59))
        seen[next(str(rr.rdata) for rr in answer.rr if rr.rtype == QTYPE.A)] += 1
    return seen


def test_slow_start_ramps_a_newly_named_endpoint_and_not_a_cold_start() -> None:
    table = EndpointTable(rng=random.Random(2))
    settings = ShapeSettings(slow_start=10.0, latency_redraw=0.0)
    shaped, q, query = shaped_answer(table, settings, reply(ADDRESSES[:3]))
    for endpoint in table.due(100.0):
        table.probed(endpoint, True, 0.001, 100.0)
    cold = first_shares(shaped, q, query, 101.0)
    assert min(cold.values()) >= 160  # named together at the cold start: ramped together

    # A deploy adds 10.0.0.4 at 200 s: the new answer names it for the first time.
    msg = reply(ADDRESSES)
    walked = wire.parse_reply(msg)
    entry = TtlCache(CacheSettings()).store(q.key, msg, walked, 200.0, False)
    deployed = shape(
        entry, msg, walked, "local", False, table, settings, random.Random(4), {}, 200.0
    )
    assert deployed is not None
    for endpoint in table.due(200.0):
        table.probed(endpoint, True, 0.001, 200.0)
    early = first_shares(deployed, q, query, 201.0)  # 10% of its weight: ~3% of first places
    late = first_shares(deployed, q, query, 211.0)  # ramped: a quarter
    assert early["10.0.0.4"] <= 640 * 0.06, early
    assert late["10.0.0.4"] >= 640 * 0.2, late


def test_without_slow_start_a_new_endpoint_takes_its_share_at_once() -> None:
    table = EndpointTable(rng=random.Random(2))
    _, q, query = shaped_answer(table, ShapeSettings(), reply(ADDRESSES[:3]))
    for endpoint in table.due(100.0):
        table.probed(endpoint, True, 0.001, 100.0)
    msg = reply(ADDRESSES)
    walked = wire.parse_reply(msg)
    entry = TtlCache(CacheSettings()).store(q.key, msg, walked, 200.0, False)
    deployed = shape(
        entry, msg, walked, "local", False, table, ShapeSettings(), random.Random(4), {}, 200.0
    )
    assert deployed is not None
    for endpoint in table.due(200.0):
        table.probed(endpoint, True, 0.001, 200.0)
    assert first_shares(deployed, q, query, 201.0)["10.0.0.4"] >= 640 * 0.2


SIX = [f"10.0.1.{i}" for i in range(1, 7)]
AZ_OF = {a: ("az-a", "az-a", "az-b", "az-b", "az-c", "az-c")[i] for i, a in enumerate(SIX)}


def az_shares(table: EndpointTable, dead: set[str], local: str | None) -> Counter[str]:
    table.set_cloudmap("local", {}, AZ_OF)
    table.set_local_az(local)
    shaped, q, query = shaped_answer(table, ShapeSettings(zone_affinity=True), reply(SIX))
    for endpoint in table.due(100.0):
        table.probed(endpoint, endpoint.address not in dead, 0.001, 100.0)
    by_az: Counter[str] = Counter()  # first places in the pool of 64, dealt exactly
    for address, count in pool_firsts(shaped, q, query).items():
        by_az[AZ_OF[address]] += count
    return by_az


def test_zone_affinity_keeps_first_places_local_while_the_local_az_can_carry_its_share() -> None:
    by_az = az_shares(EndpointTable(rng=random.Random(1)), set(), "az-a")
    assert by_az == {"az-a": 64}


def test_zone_affinity_spills_over_in_proportion_when_a_local_endpoint_is_dead() -> None:
    # 1 live local of 5 live in 3 AZs: the local AZ takes 1 x 3 / 5 = 60% of first places.
    by_az = az_shares(EndpointTable(rng=random.Random(1)), {"10.0.1.1"}, "az-a")
    assert by_az["az-a"] in (38, 39)  # 60% of 64
    assert by_az["az-b"] + by_az["az-c"] == 64 - by_az["az-a"]
    assert abs(by_az["az-b"] - by_az["az-c"]) <= 2  # 6 or 7 each of four endpoints


def test_zone_affinity_skips_a_local_az_with_no_live_endpoint_or_no_known_az() -> None:
    dead_local = az_shares(EndpointTable(rng=random.Random(1)), {"10.0.1.1", "10.0.1.2"}, "az-a")
    assert dead_local == {"az-b": 32, "az-c": 32}
    unknown = az_shares(EndpointTable(rng=random.Random(1)), set(), None)
    assert sorted(unknown.values()) == [21, 21, 22]


def test_an_endpoint_the_registry_added_waits_for_its_first_probe() -> None:
    table = EndpointTable(rng=random.Random(1))
    table.seen("local", ["10.0.0.1", "10.0.0.2", "10.0.0.3"], 100.0)
    table.seen("local", ["10.0.0.4"], 100.0, held=True)
    shaped, q, query = shaped_answer(table)
    for endpoint in table.due(100.0):
        if endpoint.address != "10.0.0.4":
            table.probed(endpoint, True, 0.001, 100.0)
        else:
            endpoint.probing = False
    assert "10.0.0.4" not in firsts(shaped, q, query, 100)
    held = table.get("local", "10.0.0.4")
    assert held is not None and not held.usable
    table.probed(held, True, 0.001, 100.5)
    assert firsts(shaped, q, query)["10.0.0.4"] > 50
