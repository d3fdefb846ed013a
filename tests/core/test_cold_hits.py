"""Hits a UDP reader thread answers from cache entries (no row): FastPath.answer_cold with the
pipeline's Resolver as its source, and what the loop makes of them when it drains."""

from __future__ import annotations

from dnslib import EDNS0, QTYPE, RR, A, DNSRecord

from sidecar.core import wire
from sidecar.core.cache import Entry
from sidecar.core.counters import Counters
from sidecar.core.fast_path import (
    DRAIN_AT,
    DRAIN_COLD_AT,
    REFRESH_BATCH,
    ColdHit,
)
from sidecar.pipeline import Resolver
from tests.core.test_fast_path import reply
from tests.listener_parts import cache_resolver

NAME = "a.example"


def query(name: str = NAME, qid: int = 7, edns: bool = False) -> bytes:
    record = DNSRecord.question(name)
    record.header.id = qid
    if edns:
        record.add_ar(EDNS0(udp_len=1232))
    return bytes(record.pack())


def store(resolver: Resolver, msg: bytes, now: float, discovery: bool = False) -> Entry:
    q = wire.parse_query(query())
    parsed = wire.parse_reply(msg)
    return resolver.cache.store(q.key, msg, parsed, now, False, discovery=discovery)


def setup() -> tuple[Resolver, Counters]:
    metrics = Counters()
    return cache_resolver(metrics), metrics


def test_an_entry_is_answered_with_the_callers_id_and_the_ttl_left_and_counted_when_drained() -> (
    None
):
    resolver, metrics = setup()
    fast = resolver.fast
    store(resolver, reply(ttl=60), 100.0)
    cold: list[ColdHit] = []
    data = query(qid=41, edns=True)
    answer = fast.answer_cold(data, 110.2, cold)
    assert answer is not None
    parsed = DNSRecord.parse(answer)
    assert (
        parsed.header.id == 41
        and parsed.rr[0].ttl == 50
        and str(parsed.rr[0].rdata) == ("192.0.2.1")
    )
    assert parsed.ar[0].rtype == QTYPE.OPT  # the client sent EDNS: so does the answer
    q = wire.parse_query(data)
    entry = resolver.cache.peek(q.key)
    assert entry is not None and answer == resolver.render(
        entry, data, q, 110.2, 1232
    )  # as the loop
    assert [hit[0] for hit in cold] == [data] and metrics.cache_hits[0] == 0  # not counted yet
    fast.hand_off_cold((cold, 110.2, 0.00001))
    fast.drain()
    assert metrics.cache_hits[0] == 1 and metrics.requests["udp"][QTYPE.A] == 1
    assert metrics.responses["cache"][wire.NOERROR] == 1 and len(fast) == 0
    again: list[ColdHit] = []
    assert fast.answer_cold(query(qid=42, edns=True), 110.5, again) is not None
    fast.hand_off_cold((again, 110.5, 0.00001))
    fast.drain()
    assert len(fast) == 0 and metrics.cache_hits[0] == 2  # counted; the row waits for a turn
    assert not fast.drain_turn(110.6)
    assert len(fast) == 1  # the second hit within a second: the loop made the row
    hit = fast.get(data[2:])
    assert hit is not None and hit.tail == answer[2:]


def test_a_backlog_of_cold_hits_asks_the_loop_to_count_it_before_rows_would() -> None:
    resolver, metrics = setup()
    fast = resolver.fast
    store(resolver, reply(ttl=60), 100.0)
    asked: list[int] = []
    fast.on_backlog = lambda: asked.append(len(fast._handed_cold))
    for _ in range(DRAIN_COLD_AT * 2):
        cold: list[ColdHit] = []
        assert fast.answer_cold(query(), 100.5, cold) is not None
        fast.hand_off_cold((cold, 100.5, 0.00001))
    assert DRAIN_COLD_AT < DRAIN_AT  # each hit's own objects are counted while still warm
    assert asked == [DRAIN_COLD_AT]  # once, as the backlog passes the mark
    fast.drain()
    assert metrics.cache_hits[0] == 2 * DRAIN_COLD_AT


def test_a_resting_row_is_made_current_by_its_first_hit_answered_from_the_entry() -> None:
    """A row not asked for a while rests past its moment (core/fast_path.py): the thread
    answers its next hit from the entry, and the loop, draining it, makes the row current
    at once: no second hit to wait for, as a name with no row has."""
    resolver, _ = setup()
    fast = resolver.fast
    entry = store(resolver, reply(ttl=60), 100.0)
    data = query()
    row = fast.remember(data, wire.parse_query(data), entry, 100.2)
    assert row is not None and row.valid_until == 101.0
    cold: list[ColdHit] = []
    resting = fast.get(data[2:])  # past its moment: the thread passes it on (datagram_batch)
    assert resting is row and fast.answer_cold(query(qid=9), 120.5, cold, resting) is not None
    fast.hand_off_cold((cold, 120.5, 0.00001))
    assert not fast.drain_turn(120.5)
    assert fast.get(data[2:]) is row and row.valid_until == 121.0
    assert DNSRecord.parse(b"\0\0" + row.tail).rr[0].ttl == 40
    assert entry not in fast.asked  # not spent on admission


def test_the_loop_keeps_an_entry_answered_by_the_thread_recently_used() -> None:
    resolver, _ = setup()
    cache = resolver.cache
    store(resolver, reply(ttl=60), 100.0)
    other = DNSRecord.question("b.example").reply()
    other.add_answer(RR("b.example", QTYPE.A, rdata=A("192.0.2.2"), ttl=60))
    other_key = wire.parse_query(query("b.example")).key
    cache.store(other_key, bytes(other.pack()), wire.parse_reply(bytes(other.pack())), 100.0, False)
    cold: list[ColdHit] = []
    assert resolver.fast.answer_cold(query(), 101.0, cold) is not None
    resolver.fast.hand_off_cold((cold, 101.0, 0.00001))
    resolver.fast.drain()
    assert list(cache._entries)[-1] == wire.parse_query(query()).key  # moved to the end


def test_the_thread_leaves_to_the_loop_what_it_must_not_answer_as_it_is() -> None:
    resolver, metrics = setup()
    fast = resolver.fast
    cold: list[ColdHit] = []
    assert fast.answer_cold(query(), 100.0, cold) is None  # a miss
    assert fast.answer_cold(query()[:14], 100.0, cold) is None  # malformed: the loop's FORMERR
    store(resolver, reply(ttl=60), 100.0)
    assert fast.answer_cold(query(), 160.5, cold) is None  # expired: stale or a miss
    store(resolver, reply(ttl=60), 100.0, discovery=True)
    assert fast.answer_cold(query(), 101.0, cold) is None  # a discovery zone's: its pool
    msg = reply(("192.0.2.1", "192.0.2.2"), ttl=60)
    entry = store(resolver, msg, 100.0)
    key = wire.parse_query(query()).key
    resolver.rotator.rotate(key, entry, msg, wire.parse_reply(msg), False, 100.0)
    assert fast.answer_cold(query(), 101.0, cold) is None  # rotated: the loop's pool
    assert cold == [] and metrics.cache_hits == [0, 0]


def test_an_entry_due_for_prefetch_goes_to_the_loop_until_the_refresh_is_started() -> None:
    resolver, _ = setup()
    resolver.cache.limits = resolver.cache.limits.__class__(prefetch_percent=10)
    entry = store(resolver, reply(ttl=60), 100.0)
    assert entry.prefetch_at == 154.0
    cold: list[ColdHit] = []
    assert resolver.fast.answer_cold(query(), 153.9, cold) is not None
    assert resolver.fast.answer_cold(query(), 154.0, cold) is None  # the loop starts it
    resolver._prefetched.add(wire.parse_query(query()).key)  # as Resolver.prefetch does
    assert resolver.fast.answer_cold(query(), 154.5, cold) is not None


def test_a_long_backlog_of_admitted_hits_is_drained_without_recursing() -> None:
    # 600 names, each answered cold twice in batches of one (the second hit admits a row):
    # one drain counts them all and makes 600 rows. Making each row inside the count began
    # a nested drain of the rest, past the recursion limit.
    resolver, metrics = setup()
    fast = resolver.fast
    names = [f"n{i}.example" for i in range(600)]
    for name in names:
        q = wire.parse_query(query(name))
        msg = reply(ttl=60, name=name)
        resolver.cache.store(q.key, msg, wire.parse_reply(msg), 100.0, False)
    for when in (100.1, 100.2):
        for name in names:
            cold: list[ColdHit] = []
            assert fast.answer_cold(query(name), when, cold) is not None
            fast.hand_off_cold((cold, when, 0.00001))
    fast.drain()
    assert metrics.cache_hits[0] == 1200  # all counted at once...
    assert len(fast) == 0  # ...the rows made in turns, a few a turn (the GIL handed over)
    more = turns = 0
    while turns == 0 or more:
        more = fast.drain_turn(100.3)
        turns += 1
        assert len(fast) == turns * REFRESH_BATCH
    assert turns == 600 // REFRESH_BATCH
    assert len(fast) == 600
    assert all(fast.get(query(name)[2:]) is not None for name in names)


def test_a_row_admitted_is_not_made_once_its_entry_has_gone() -> None:
    """Rows are made a turn after their hits are counted; an entry the cache let go (or
    replaced) in between gets none: the table never serves what the cache let go."""
    resolver, _ = setup()
    fast = resolver.fast
    store(resolver, reply(ttl=60), 100.0)
    for when in (100.1, 100.2):
        cold: list[ColdHit] = []
        assert fast.answer_cold(query(), when, cold) is not None
        fast.hand_off_cold((cold, when, 0.00001))
    fast.drain()
    store(resolver, reply(("192.0.2.7",), ttl=60), 100.25)  # replaced before the turn
    assert not fast.make_rows(100.3)
    assert len(fast) == 0
