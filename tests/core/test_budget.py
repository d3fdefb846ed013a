"""The cache's one byte count: charges beside entries (rows, shaped and rotated pools), their
eviction and release, and how close the estimates are to what CPython allocates."""

from __future__ import annotations

import tracemalloc

import pytest
from dnslib import DNSRecord

from sidecar.core import wire
from sidecar.core.cache import CHARGE_SLOT, CacheSettings, TtlCache
from sidecar.discovery.shaping import ShapeSettings
from tests.core.test_fast_path import Setup, query, reply


def stored(cache: TtlCache, name: str, now: float = 100.0) -> bytes:
    msg = reply(("192.0.2.1",), name=name)
    key = wire.parse_query(query(name)).key
    cache.store(key, msg, wire.parse_reply(msg), now, False)
    return key


def test_charges_are_counted_replaced_per_holder_and_go_with_the_entry() -> None:
    cache = TtlCache(CacheSettings())
    key = stored(cache, "a.example")
    alone = cache.bytes
    cache.charge(key, "rows", 1000)
    cache.charge(key, "rotated", 500)
    assert cache.charged(key) == 1500 + 2 * CHARGE_SLOT
    assert cache.bytes == alone + cache.charged(key)
    cache.charge(key, "rows", 200)  # what the rows hold now, not more
    assert cache.charged(key) == 700 + 2 * CHARGE_SLOT
    cache.charge(key, "rows", 0)
    assert cache.bytes == alone + 500 + CHARGE_SLOT
    stored(cache, "a.example", 101.0)  # replaced: its charges go with the old entry
    assert cache.charged(key) == 0 and cache.bytes == alone


def test_a_charge_for_a_key_not_cached_is_ignored() -> None:
    cache = TtlCache(CacheSettings())
    cache.charge(b"\x01x\x00\x00\x01\x00\x01\x00", "rows", 10**9)
    assert cache.bytes == 0 and len(cache) == 0


def test_a_charge_evicts_the_least_recently_used_others_but_never_its_own_entry() -> None:
    cache = TtlCache(CacheSettings(max_bytes=1 << 20))
    keys = [stored(cache, f"n{i}.example") for i in range(100)]
    cache.charge(keys[50], "shaped", (1 << 20) - 20_000)
    assert cache.bytes <= 1 << 20 and cache.counters.cache_evictions > 0
    assert cache.get(keys[50], 100.0) is not None  # the charged one stays
    assert cache.get(keys[0], 100.0) is None and cache.get(keys[99], 100.0) is not None
    cache.charge(keys[50], "shaped", 2 << 20)  # alone over the bound: it stays, alone
    assert len(cache) == 1 and cache.get(keys[50], 100.0) is not None


def test_rows_and_shaped_pools_of_many_addresses_stay_within_max_bytes() -> None:
    """300 names of 32 addresses each, shaped and asked through rows, in 1 MiB: the pools
    (~60 KB each) evict each other instead of growing past the bound."""
    s = Setup(capacity=1000)
    s.cache.limits = CacheSettings(max_bytes=1 << 20)
    shaper = s.source.shaper
    for i in range(300):
        name = f"svc{i}.local"
        msg = reply(tuple(f"10.0.{i % 250}.{j + 1}" for j in range(32)), name=name)
        entry = s.store(msg, 100.0, name)
        data = query(name)
        q = wire.parse_query(data)
        shaper.shape(q.key, entry, msg, wire.parse_reply(msg), "local", False, ShapeSettings(), 100)
        assert s.fast.remember(data, q, entry, 100.0) is not None
        assert s.served(data, 100.0) is not None  # truncated: no EDNS, 512 bytes
        assert s.cache.bytes <= 1 << 20
    assert len(shaper) == len(s.cache) < 20 and len(s.fast) == len(s.cache)
    assert s.cache.counters.cache_evictions == 300 - len(s.cache)


@pytest.mark.parametrize(
    ("kind", "names", "addresses"),
    [
        ("entry", 2000, 1),  # no rows, no pool
        ("row", 1000, 1),
        ("row", 1000, 3),  # with answer_order = upstream
        ("rotated", 1000, 3),
        ("rotated", 500, 8),
        ("rotated", 100, 32),
        ("shaped", 150, 3),
        ("shaped", 30, 32),
    ],
)
def test_the_charged_bytes_are_close_to_what_python_allocates(
    kind: str, names: int, addresses: int
) -> None:
    """The figures in docs/configuration.md come from this measure."""
    s = Setup(capacity=names)
    s.cache.limits = CacheSettings(max_entries=names, max_bytes=1 << 40)
    prepared = []
    for i in range(names):
        name = f"n{i}.example.test"
        msg = reply(tuple(f"10.{i // 250}.{i % 250}.{j + 1}" for j in range(addresses)), name=name)
        prepared.append((bytearray(msg), query(name)))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for received, data in prepared:
            # As it comes from an upstream: bytes of its own, walked once; what a pool keeps
            # of them is counted.
            msg = bytes(received)
            walked = wire.parse_reply(msg)
            q = wire.parse_query(data)
            entry = s.cache.store(q.key, msg, walked, 100.0, False)
            if kind == "rotated":
                s.source.rotator.rotate(q.key, entry, msg, walked, False, 100.0)
            elif kind == "shaped":
                pool = s.source.shaper.shape(
                    q.key, entry, msg, walked, "test", False, ShapeSettings(), 100.0
                )
                assert pool is not None
            if kind != "entry":
                assert s.fast.remember(data, q, entry, 100.0) is not None
        allocated = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(s.cache) == names
    assert 0.8 < s.cache.bytes / allocated < 1.25, (s.cache.bytes / names, allocated / names)


def test_a_single_address_row_charges_only_the_row() -> None:
    s = Setup()
    entry = s.store(reply(("192.0.2.1",)), 100.0)
    data = query()
    q = wire.parse_query(data)
    hit = s.fast.remember(data, q, entry, 100.0)
    assert hit is not None and s.cache.charged(q.key) > hit.cost > len(hit.tail)
    assert s.served(data, 100.5) == DNSRecord.parse(data[:2] + hit.tail)
    s.fast.drop(hit)
    assert s.cache.charged(q.key) == 0
