"""The fast-path table without sockets: validity, refresh, retirement, counts, bounds, shaping."""

from __future__ import annotations

import math
import random
from typing import Any

from dnslib import QTYPE, RR, A, DNSRecord

from sidecar.core import wire
from sidecar.core.cache import CacheSettings, Entry, TtlCache
from sidecar.core.counters import Counters
from sidecar.core.fast_path import (
    ADMIT_MEMORY,
    DRAIN_AT,
    REFRESH_LEAD,
    RESTING_ROWS,
    SHAPED_RECHECK,
    TICK,
    FastHit,
    FastPath,
    ShapedReplies,
)
from sidecar.core.rotation import Rotator
from sidecar.discovery.endpoints import EndpointTable
from sidecar.discovery.pools import Shaper
from sidecar.discovery.shaping import ShapeSettings
from tests.native import attributes

NAME = "a.example"


def query(name: str = NAME, qid: int = 7) -> bytes:
    record = DNSRecord.question(name)
    record.header.id = qid
    return bytes(record.pack())


def reply(addresses: tuple[str, ...] = ("192.0.2.1",), ttl: int = 60, name: str = NAME) -> bytes:
    record = DNSRecord.question(name).reply()
    for address in addresses:
        record.add_answer(RR(name, QTYPE.A, rdata=A(address), ttl=ttl))
    return bytes(record.pack())


class Source:
    """What the pipeline gives the table (core/fast_path.RowSource): prefetches recorded, the
    cache's retirement hook passed on to the table and the shaper, as Resolver does."""

    def __init__(self, cache: TtlCache, metrics: Counters) -> None:
        self.cache = cache
        self.prefetched: list[bytes] = []
        self.started: set[bytes] = set()
        self.shaper = Shaper(
            EndpointTable(), random.Random(2), metrics.answers_shaped, cache.charge
        )
        self.rotator = Rotator(random.Random(3), cache.charge)
        self.fast: FastPath | None = None
        cache.on_retire = self.retired

    def retired(self, key: bytes) -> None:
        if self.fast is not None:
            self.fast.retire(key)
        self.shaper.retire(key)
        self.rotator.retire(key)
        self.started.discard(key)

    def prefetch(self, q: wire.Query, entry: Entry) -> None:
        self.prefetched.append(q.key)
        self.started.add(q.key)

    def prefetching(self, key: bytes) -> bool:
        return key in self.started

    def shaped(self, key: bytes, entry: Entry) -> ShapedReplies | None:
        return self.shaper.of(key, entry) or self.rotator.of(key, entry)

    def touch(self, key: bytes) -> None:
        self.cache.touch(key)

    def charge(self, key: bytes, nbytes: int) -> None:
        self.cache.charge(key, "rows", nbytes)


class Setup:
    def __init__(self, prefetch_percent: int = 0, capacity: int = 100) -> None:
        self.metrics = Counters()
        self.cache = TtlCache(CacheSettings(prefetch_percent=prefetch_percent))
        self.source = Source(self.cache, self.metrics)
        self.prefetched = self.source.prefetched
        self.fast = FastPath(self.metrics, self.source, capacity, random.Random(1))
        self.source.fast = self.fast

    def store(self, msg: bytes, now: float, name: str = NAME) -> Entry:
        q = wire.parse_query(query(name))
        return self.cache.store(q.key, msg, wire.parse_reply(msg), now, False)

    def served(self, data: bytes, now: float) -> DNSRecord | None:
        """What the listener would send for `data` at `now` from the table, or None."""
        hit = self.fast.get(data[2:])
        if hit is None or not (now < hit.valid_until or self.fast.refresh(hit, data, now)):
            return None
        self.fast.served(hit, 0.00001)
        return DNSRecord.parse(data[:2] + hit.next_tail())


def test_a_row_answers_with_the_callers_id_until_its_ttl_drops_a_second() -> None:
    s = Setup()
    entry = s.store(reply(ttl=60), 100.0)
    data = query(qid=1)
    hit = s.fast.remember(data, wire.parse_query(data), entry, 100.0)
    assert hit is not None and hit.valid_until == 101.0  # TTL 60 shown until 60 - 59 s left
    answer = s.served(query(qid=2), 100.9)
    assert answer is not None and (answer.header.id, answer.rr[0].ttl) == (2, 60)
    answer = s.served(query(qid=3), 110.5)  # past valid_until: refreshed, 49.5 s left
    assert answer is not None and answer.rr[0].ttl == 50
    assert hit.valid_until == 111.0


def test_an_expired_entry_drops_its_row() -> None:
    s = Setup()
    entry = s.store(reply(ttl=60), 100.0)
    s.fast.remember(query(), wire.parse_query(query()), entry, 100.0)
    assert s.served(query(), 160.0) is None
    assert len(s.fast) == 0 and s.fast.by_key == {}


def test_a_replaced_or_evicted_entry_takes_its_rows_with_it() -> None:
    s = Setup()
    entry = s.store(reply(), 100.0)
    for spelling in (NAME, NAME.upper()):  # two query shapes, one entry
        data = query(spelling)
        s.fast.remember(data, wire.parse_query(data), entry, 100.0)
    s.served(query(NAME), 100.5)
    key = wire.parse_query(query()).key
    assert len(s.fast) == 2 and len(s.fast.by_key[key]) == 2
    s.store(reply(("192.0.2.2",)), 100.6)  # a refresh replaces the entry
    assert len(s.fast) == 0 and s.fast.by_key == {}
    assert s.metrics.cache_hits[0] == 1  # the row's hit was counted on the way out


def test_prefetch_starts_once_when_a_row_reaches_the_prefetch_time() -> None:
    s = Setup(prefetch_percent=10)
    entry = s.store(reply(ttl=60), 100.0)
    assert entry.prefetch_at == 154.0
    s.fast.remember(query(), wire.parse_query(query()), entry, 153.5)
    hit = s.fast.get(query()[2:])
    assert hit is not None and hit.valid_until == 154.0  # not 154.5, when the TTL drops
    assert s.served(query(), 154.0) is not None
    assert s.prefetched == [wire.parse_query(query()).key]
    assert s.served(query(), 154.5) is not None
    assert len(s.prefetched) == 1 and hit.valid_until == 155.0


def test_hits_reach_the_metrics_exactly_when_flushed() -> None:
    s = Setup()
    entry = s.store(reply(), 100.0)
    hit = s.fast.remember(query(), wire.parse_query(query()), entry, 100.0)
    assert hit is not None
    for _ in range(5):
        s.fast.served(hit, 0.00001)
    s.fast.served(hit, 0.003)  # one that took 3 ms
    assert s.metrics.cache_hits == [0, 0]  # nothing counted by label yet
    s.fast.flush()
    histogram = s.metrics.durations["cache"]
    assert s.metrics.cache_hits == [6, 0]
    assert s.metrics.requests["udp"][QTYPE.A] == 6
    assert s.metrics.responses["cache"][wire.NOERROR] == 6
    assert sum(histogram.counts) == 6 and histogram.counts[0] == 5
    assert abs(histogram.total - 0.00305) < 1e-9
    s.fast.flush()
    assert s.metrics.cache_hits == [6, 0]  # nothing counted twice


def test_batches_handed_off_are_counted_by_their_time_when_drained() -> None:
    s = Setup()
    entry = s.store(reply(), 100.0)
    hit = s.fast.remember(query(), wire.parse_query(query()), entry, 100.0)
    assert hit is not None
    # A reader thread's batches: 3 hits sent after 20 us, then 4 after 3 ms.
    s.fast.hand_off(([hit, hit, hit], 0.00002))
    s.fast.hand_off(([hit] * 4, 0.003))
    assert hit.hits == 0 and s.metrics.cache_hits == [0, 0]  # nothing counted in the thread
    s.fast.flush()
    histogram = s.metrics.durations["cache"]
    assert s.metrics.cache_hits == [7, 0]
    assert histogram.counts[0] == 3
    assert histogram.counts[histogram.bounds.index(0.005)] == 4  # 2.5 ms < 3 ms <= 5 ms
    assert sum(histogram.counts) == 7 and abs(histogram.total - 0.01206) < 1e-9
    s.fast.flush()
    assert sum(histogram.counts) == 7 and histogram.counts[0] == 3  # counted once


def test_handed_off_hits_are_counted_before_a_drop_or_a_refresh_reads_them() -> None:
    s, due, hit, data = timed_row()
    s.fast.hand_off(([hit], 0.00001))  # asked since it was made, in a reader thread
    s.fast.refresh_due(due[-1])
    assert hit.valid_until == 102.0  # "asked since" saw the hand-off
    s.fast.hand_off(([hit, hit], 0.00001))
    s.fast.retire(wire.parse_query(data).key)  # dropped: what it served is counted first
    assert s.metrics.cache_hits == [3, 0]


def test_hits_a_thread_served_from_a_row_dropped_meanwhile_are_counted() -> None:
    s = Setup()
    entry = s.store(reply(), 100.0)
    data = query()
    old = s.fast.remember(data, wire.parse_query(data), entry, 100.0)
    assert old is not None
    # A reader thread read `old` from the table; meanwhile the entry was replaced (a prefetch
    # landed), which dropped `old`, and the loop made a new row for the same bytes. The
    # thread's batch comes after the drop, and its replies are still requests answered.
    assert s.fast.remember(data, wire.parse_query(data), entry, 100.05) is old  # kept
    entry = s.store(reply(), 100.1)
    assert old.dropped
    new = s.fast.remember(data, wire.parse_query(data), entry, 100.1)
    assert new is not None and new is not old
    s.fast.hand_off(([old] * 32, 0.00002))
    s.fast.hand_off(([new] * 3, 0.00002))
    s.fast.flush()
    assert s.metrics.cache_hits == [35, 0]
    assert s.metrics.requests["udp"][QTYPE.A] == 35
    s.fast.flush()
    assert s.metrics.cache_hits == [35, 0]  # counted once


def test_a_full_table_sweeps_rows_not_asked_lately_and_else_adds_none() -> None:
    s = Setup(capacity=2)
    rows = []
    for i, name in enumerate(("a.example", "b.example", "c.example")):
        entry = s.store(reply(name=name), 100.0, name)
        data = query(name)
        rows.append(s.fast.remember(data, wire.parse_query(data), entry, 100.0 + i * 0.1))
    assert rows[2] is None and len(s.fast) == 2  # full, and both rows still valid
    entry = s.store(reply(name="c.example"), 102.0, "c.example")
    data = query("c.example")
    assert s.fast.remember(data, wire.parse_query(data), entry, 102.0) is not None
    assert len(s.fast) == 1  # the two rows nobody asked for since 101.0 went


def test_a_shaped_row_hands_out_the_pool_in_turn_and_follows_health() -> None:
    s = Setup()
    addresses = ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4")
    msg = reply(addresses, name="svc.local")
    entry = s.store(msg, 100.0, "svc.local")
    settings = ShapeSettings(max_answers=1)
    walked = wire.parse_reply(msg)
    data = query("svc.local")
    shaper = s.source.shaper
    table, counts = shaper.table, shaper.counts
    pool = shaper.shape(
        wire.parse_query(data).key, entry, msg, walked, "local", False, settings, 100
    )
    assert pool is not None
    s.fast.remember(data, wire.parse_query(data), entry, 100.0)
    firsts = []
    for i in range(64):
        answer = s.served(data, 100.0 + i * 0.001)
        assert answer is not None and len(answer.rr) == 1 and answer.rr[0].ttl == 5
        firsts.append(str(answer.rr[0].rdata))
    assert sorted(set(firsts)) == list(addresses)
    drawn = sorted(
        str(DNSRecord.parse(v.render(data, wire.parse_query(data), 100.0, 512)).rr[0].rdata)
        for v in pool.variants
    )
    assert sorted(firsts) == drawn  # one turn through the pool: each variant once
    for endpoint in table.due(100.0):  # the first probe settles an unknown endpoint
        table.probed(endpoint, endpoint.address != "10.0.0.1", 0.001, 100.0)
    seen = set()
    for i in range(64):
        answer = s.served(data, 100.0 + SHAPED_RECHECK + i * 0.001)
        assert answer is not None
        seen.add(str(answer.rr[0].rdata))
    assert seen == set(addresses[1:])
    s.fast.flush()
    assert counts == {("local", "reordered"): 64, ("local", "filtered"): 64}


def test_refreshing_a_row_keeps_its_entry_from_being_evicted_first() -> None:
    s = Setup()
    cache = s.cache = TtlCache(CacheSettings(max_entries=2, prefetch_percent=0))
    s.source = Source(cache, s.metrics)
    fast = s.source.fast = FastPath(s.metrics, s.source)
    entries = {}
    for name in ("a.example", "b.example"):
        q = wire.parse_query(query(name))
        msg = reply(name=name)
        entries[name] = cache.store(q.key, msg, wire.parse_reply(msg), 100.0, False)
    data = query("a.example")
    hit = fast.remember(data, wire.parse_query(data), entries["a.example"], 100.0)
    assert hit is not None and fast.refresh(hit, data, 101.5)  # a.example asked again
    q = wire.parse_query(query("c.example"))
    msg = reply(name="c.example")
    cache.store(q.key, msg, wire.parse_reply(msg), 101.6, False)  # full: one must go
    assert cache.get(wire.parse_query(query("b.example")).key, 101.7) is None
    assert cache.get(wire.parse_query(query("a.example")).key, 101.7) is entries["a.example"]


def timed_row() -> tuple[Setup, list[float], FastHit, bytes]:
    """A table whose timer requests are recorded, and a row made at 100.3 for an entry of TTL
    60 cached at 100.0 (its moment: 101.0)."""
    s = Setup()
    due: list[float] = []
    s.fast.on_due = due.append
    entry = s.store(reply(ttl=60), 100.0)
    data = query()
    hit = s.fast.remember(data, wire.parse_query(data), entry, 100.3)
    assert hit is not None and hit.valid_until == 101.0
    return s, due, hit, data


def test_a_row_in_use_is_refreshed_ahead_of_its_moment_and_shows_the_lower_ttl_early() -> None:
    s, due, hit, data = timed_row()
    # Its bucket starts at most REFRESH_LEAD + TICK before the moment, never after it.
    assert due and 101.0 - REFRESH_LEAD - TICK <= due[-1] <= 101.0 - REFRESH_LEAD
    s.served(data, 100.5)  # asked since it was made
    s.fast.refresh_due(due[-1])
    assert hit.valid_until == 102.0  # refreshed before 101.0, as of just after it
    answer = s.served(data, 100.96)
    assert answer is not None and answer.rr[0].ttl == 59  # a second early at most, never late
    assert len(due) == 2 and due[-1] < 102.0


def test_a_shaped_row_refreshed_ahead_rechecks_health_within_shaped_recheck_of_the_read() -> None:
    """A refresh ahead renders as of just after the row's moment, but reads endpoint health
    when it runs, up to REFRESH_LEAD + TICK earlier: the next recheck counts from the read.
    Counted from the moment, a pool drawn just before the last endpoint died was served for
    up to SHAPED_RECHECK + REFRESH_LEAD + TICK after it, when the row was not asked again
    before then (the fail-open step of tests/integration/test_discovery.py)."""
    s = Setup()
    due: list[float] = []
    s.fast.on_due = due.append
    addresses = ("10.0.0.1", "10.0.0.2")
    msg = reply(addresses, name="svc.local")
    entry = s.store(msg, 100.0, "svc.local")
    data = query("svc.local")
    shaper = s.source.shaper
    table = shaper.table
    key = wire.parse_query(data).key
    shaper.shape(key, entry, msg, wire.parse_reply(msg), "local", False, ShapeSettings(), 100.0)
    for endpoint in table.due(100.0):  # 10.0.0.1 dead, 10.0.0.2 healthy
        table.probed(endpoint, endpoint.address != "10.0.0.1", 0.001, 100.0)
    hit = s.fast.remember(data, wire.parse_query(data), entry, 100.0)
    assert hit is not None and hit.valid_until == 100.0 + SHAPED_RECHECK
    s.served(data, 100.1)  # asked since: refreshed ahead when its bucket comes
    read = due[-1]
    assert read < hit.valid_until
    s.fast.refresh_due(read)  # health read now, the pool still filtered
    assert hit.valid_until <= read + SHAPED_RECHECK
    (alive,) = [e for e in table.endpoints.values() if e.address == "10.0.0.2"]
    table.probed(alive, False, None, read + 0.001, definite=True)  # the last one dies
    answer = s.served(data, read + SHAPED_RECHECK)
    assert answer is not None
    assert sorted(str(rr.rdata) for rr in answer.rr) == list(addresses)  # failed open


def test_a_row_not_asked_since_its_refresh_rests_until_asked_again() -> None:
    """Not refreshed while no one asks (no timer at idle), not dropped either: asked again
    after a quiet spell, it is made current at once, where a dropped row had to be earned
    again by two hits (a burst after a quiet second began on hits answered from entries)."""
    s, due, hit, data = timed_row()
    key = wire.parse_query(data).key
    charged = s.cache.charged(key)
    assert charged > 0
    s.fast.flush()
    assert not s.fast.refresh_due(due[-1])
    assert not s.fast.due and len(due) == 1  # nothing scheduled: nothing wakes the loop
    assert s.fast.get(data[2:]) is hit and hit.valid_until == 101.0  # resting, past its moment
    assert s.cache.charged(key) == charged  # its bytes still count against the cache
    answer = s.served(data, 130.4)  # asked again half a minute later
    assert answer is not None and answer.rr[0].ttl == 30  # the TTL left then, not before
    assert hit.valid_until == 131.0 and len(due) == 2  # current, and scheduled again
    s.fast.remember(data, wire.parse_query(data), hit.entry, 130.5)
    assert s.fast.get(data[2:]) is hit  # the same row, not a new one


def test_rows_resting_are_bounded_the_one_resting_longest_goes() -> None:
    s = Setup(capacity=RESTING_ROWS + 100)
    due: list[float] = []
    s.fast.on_due = due.append
    rows = []
    for i in range(RESTING_ROWS + 10):  # cached in one burst, each asked once: none again
        name = f"n{i}.example"
        entry = s.store(reply(name=name), 100.0, name)
        data = query(name)
        hit = s.fast.remember(data, wire.parse_query(data), entry, 100.3)
        assert hit is not None
        rows.append(hit)
    while s.fast.refresh_due(due[0]):
        pass
    assert len(s.fast.resting) == RESTING_ROWS and len(s.fast) == RESTING_ROWS
    gone = [hit for hit in rows if hit.dropped]
    assert len(gone) == 10 and all(s.cache.charged(hit.q.key) == 0 for hit in gone)
    kept = next(hit for hit in rows if not hit.dropped)
    assert s.served(b"\0\7" + kept.key, 101.5) is not None  # asked again: current, not resting
    assert kept not in s.fast.resting and len(s.fast.resting) == RESTING_ROWS - 1


def test_a_resting_row_of_an_expired_entry_goes_when_asked() -> None:
    s, due, hit, data = timed_row()
    s.fast.flush()
    s.fast.refresh_due(due[-1])
    assert s.served(data, 160.5) is None  # the entry expired at 160.0
    assert hit.dropped and s.fast.get(data[2:]) is None
    assert s.cache.charged(wire.parse_query(data).key) == 0


def test_rows_refreshed_on_demand_or_gone_are_skipped_when_their_bucket_comes() -> None:
    s = Setup()
    due: list[float] = []
    s.fast.on_due = due.append
    rows = []
    for name in ("a.example", "b.example"):
        entry = s.store(reply(name=name), 100.0, name)
        data = query(name)
        hit = s.fast.remember(data, wire.parse_query(data), entry, 100.3)
        assert hit is not None
        rows.append((hit, data))
        s.served(data, 100.4)
    (a, a_data), (b, _b_data) = rows
    s.served(a_data, 101.5)  # a: refreshed on demand past its moment (a late timer)
    assert a.valid_until == 102.0
    s.store(reply(("192.0.2.9",), name="b.example"), 100.5, "b.example")  # b's entry replaced
    assert b.dropped and b.valid_until == -math.inf
    s.fast.refresh_due(101.0)
    assert a.valid_until == 102.0  # not refreshed twice for one moment
    assert s.fast.get(b.key) is None


def test_rows_due_together_are_refreshed_a_batch_at_a_time() -> None:
    s = Setup(capacity=200)
    due: list[float] = []
    s.fast.on_due = due.append
    rows = []
    for i in range(100):  # cached in one burst: one bucket
        name = f"n{i}.example"
        entry = s.store(reply(name=name), 100.0, name)
        data = query(name)
        hit = s.fast.remember(data, wire.parse_query(data), entry, 100.3)
        assert hit is not None
        s.served(data, 100.4)
        rows.append(hit)
    assert len(s.fast.due) == 1
    calls = 1
    while s.fast.refresh_due(due[0], most=32):
        calls += 1
    assert calls == 4  # 32 + 32 + 32 + 4
    assert all(hit.valid_until == 102.0 for hit in rows)
    assert not s.fast.refresh_due(due[0], most=32)  # nothing left in that bucket


def test_nothing_writes_to_a_cached_entry_after_it_is_made() -> None:
    s = Setup(prefetch_percent=10)
    msg = reply(("10.0.0.1", "10.0.0.2"), ttl=60, name="svc.local")
    entry = s.store(msg, 100.0, "svc.local")
    before = {name: getattr(entry, name) for name in attributes(Entry)}
    data = query("svc.local")
    key = wire.parse_query(data).key
    s.source.shaper.shape(
        key, entry, msg, wire.parse_reply(msg), "local", False, ShapeSettings(), 100
    )
    hit = s.fast.remember(data, wire.parse_query(data), entry, 100.0)
    assert hit is not None
    for moment in (100.5, 101.5, 154.5, 158.0):  # refreshes, the prefetch, a redraw
        s.served(data, moment)
    s.fast.flush()
    assert s.prefetched == [key]
    s.store(reply(("10.0.0.3",), name="svc.local"), 159.0, "svc.local")  # replaced: retired
    assert {name: getattr(entry, name) for name in attributes(Entry)} == before
    assert s.fast.by_key == {} and len(s.source.shaper) == 0 and key not in s.source.started


def test_admission_is_a_second_hit_while_the_first_is_remembered() -> None:
    s = Setup()
    # Admission goes by the entry's identity alone: plain objects stand in for entries.
    hot: Any = object()
    others: list[Any] = [object() for _ in range(5000)]
    assert not s.fast.admit(hot, 100.0)
    for i, other in enumerate(others):  # 5,000 other names between: the first is remembered
        assert not s.fast.admit(other, 100.1 + i * 0.00001)
    assert s.fast.admit(hot, 100.9)  # the second hit within a second
    late: Any = object()
    assert not s.fast.admit(late, 101.0)
    assert not s.fast.admit(late, 103.1)  # two generations later: forgotten, no row
    assert s.fast.admit(late, 103.2)
    # 10,000 names asked in turn and again: most are remembered that long (a row each)...
    ten_k: list[Any] = [object() for _ in range(10_000)]
    for i, name in enumerate(ten_k):
        s.fast.admit(name, 104.0 + i * 0.000005)
    admitted = sum(s.fast.admit(name, 104.1 + i * 0.000005) for i, name in enumerate(ten_k))
    assert admitted > 6000
    # ...but of 100,000 names asked in turn and again, none is: between two hits of one, far
    # more names were asked than are remembered. A reader thread answers those from their
    # entries; rows are for the names asked most.
    many: list[Any] = [object() for _ in range(100_000)]
    for i, name in enumerate(many):
        s.fast.admit(name, 105.0 + i * 0.000005)
    admitted = sum(s.fast.admit(name, 105.5 + i * 0.000005) for i, name in enumerate(many))
    assert admitted == 0
    assert len(s.fast.asked) + len(s.fast.asked_before) <= 2 * ADMIT_MEMORY  # bounded


def test_a_backlog_of_hand_offs_asks_the_loop_to_count_it_once_as_it_passes_the_mark() -> None:
    s = Setup()
    entry = s.store(reply(), 100.0)
    hit = s.fast.remember(query(), wire.parse_query(query()), entry, 100.0)
    assert hit is not None
    asked: list[int] = []
    s.fast.on_backlog = lambda: asked.append(len(s.fast._handed))
    for _ in range(DRAIN_AT * 2):
        s.fast.hand_off(([hit], 0.00001))
    assert asked == [DRAIN_AT]
    s.fast.drain()
    assert hit.hits == 2 * DRAIN_AT


def test_a_rotated_row_hands_out_each_order_in_turn() -> None:
    s = Setup()
    addresses = ("10.0.0.1", "10.0.0.2", "10.0.0.3")
    msg = reply(addresses)
    entry = s.store(msg, 100.0)
    data = query()
    q = wire.parse_query(data)
    assert s.source.rotator.rotate(q.key, entry, msg, wire.parse_reply(msg), False, 100.0)
    hit = s.fast.remember(data, q, entry, 100.0)
    assert hit is not None and hit.shaped is not None
    firsts: dict[str, int] = {}
    for i in range(300):
        answer = s.served(query(qid=i), 100.0 + i * 0.01)  # a refresh every second on the way
        assert answer is not None and answer.rr[0].ttl == 60 - int(i * 0.01)
        first = str(answer.rr[0].rdata)
        firsts[first] = firsts.get(first, 0) + 1
    # In turn between refreshes; a refresh (a new TTL shown) starts the turn at a random place.
    assert set(firsts) == set(addresses) and all(97 <= n <= 103 for n in firsts.values()), firsts
