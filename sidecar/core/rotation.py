"""Rotation: the address records of a cached answer in a different order on each ask.

Theory of operation
- Route 53 answers multivalue names in a new order on every query (CoreDNS `loadbalance`,
  Unbound `rrset-roundrobin`); a cache that serves one order for a whole TTL sends every
  connection of the task to one backend. So an answer whose answer section ends in an RRset
  of two or more A (or AAAA) records, after any CNAME chain (which stays first), gets a pool
  of rotated orders of that RRset beside its cache entry (`RotatedAnswer`), served in turn.
- Evenly: with n addresses, n <= MAX_ORDERS, the pool holds the n rotations, so over any n
  asks in a row each address comes first once. With more, the pool holds MAX_ORDERS rotations
  spaced n / MAX_ORDERS apart and moves them on by one address every SHIFT_EVERY seconds, so
  every address gets its turn first.
- A variant is the upstream reply with the RRset's records spliced in another order; only
  when each of their owner names is one compression pointer to before the RRset (what servers
  send), so no name anywhere can point into what moves; else no pool, the upstream's order.
  Single-record answers get no pool and cost nothing.
- It satisfies fast_path.ShapedReplies, so fast-path rows hand the variants out in turn as
  they do a discovery answer's shaped pool: the cache and the fast path rotate alike.
- Ownership: pools belong to a `Rotator`, by cache key; their bytes are charged to that key in
  the cache (`TtlCache.charge`), and a pool goes when the cache retires its key (`retire`).
  The cache entry is never written to.
No I/O here: time comes in as `now`.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from sidecar.core import wire
from sidecar.core.cache import Entry, pool_cost

MAX_ORDERS = 8
SHIFT_EVERY = 1.0  # seconds between moves of a pool of more than MAX_ORDERS addresses
NO_TTL_CAP = 2**31 - 1  # rotated answers show the entry's own TTL
POOL_OVERHEAD = 150  # the pool object and its list (tracemalloc, CPython 3.11)
RECORD_BYTES = 250  # a walked record (wire.Record) and its list slot
HOLDER = "rotated"  # its name among an entry's charges


def address_rrset(msg: bytes, reply: wire.Reply) -> tuple[int, int] | None:
    """(first, end): the indexes in `reply.records` of the last answer-section RRset when it is
    two or more A or AAAA records of one type whose names can be moved; else None."""
    if msg[6:8] < b"\x00\x02":  # fewer than two answer records (ANCOUNT)
        return None
    answers = [r for r in reply.records if r.section == 0]
    if len(answers) < 2:
        return None
    rtype = answers[-1].rtype
    if rtype not in wire.ADDRESS_TYPES:
        return None
    first = len(answers) - 1
    while first > 0 and answers[first - 1].rtype == rtype:
        first -= 1
    if len(answers) - first < 2:
        return None
    # Movable when every owner name in the RRset is one compression pointer to before it:
    # then the RRset holds no name another record could point into.
    start = answers[first].start
    movable = all(
        msg[r.start] >= 0xC0 and (int.from_bytes(msg[r.start : r.start + 2]) & 0x3FFF) < start
        for r in answers[first:]
    )
    return (first, len(answers)) if movable else None


class RotatedAnswer:
    """The rotated orders of one cached answer's address RRset (see the module's notes)."""

    __slots__ = (
        "base",
        "cost",
        "do",
        "generation",
        "moves",
        "msg",
        "next",
        "records",
        "shift",
        "variants",
    )
    answer_ttl = NO_TTL_CAP

    def __init__(
        self, base: Entry, msg: bytes, records: list[wire.Record], do: bool, start: int
    ) -> None:
        self.base = base
        self.msg = msg
        self.records = records  # the RRset's records, as the upstream sent them
        self.moves = len(records) > MAX_ORDERS  # the pool moves on, so it is built again
        self.do = do
        self.shift = 0  # how far a pool of more than MAX_ORDERS addresses has moved on
        self.next = start  # the index of the variant the next render serves
        self.generation = 0
        self.variants: list[Entry] = []
        self.cost = 0
        self._build()
        if not self.moves:  # built once: what it was built from can go (a third of its bytes)
            self.msg, self.records = b"", []

    def _build(self) -> None:
        n = len(self.records)
        if n <= MAX_ORDERS:
            offsets = list(range(n))
        else:
            offsets = [(self.shift + i * n // MAX_ORDERS) % n for i in range(MAX_ORDERS)]
        msg, records = self.msg, self.records
        start, end = records[0].start, records[-1].end
        pieces = [msg[r.start : r.end] for r in records]
        variants = []
        for offset in offsets:
            variant = b"".join((msg[:start], *pieces[offset:], *pieces[:offset], msg[end:]))
            base = self.base
            variants.append(
                Entry(
                    variant,
                    wire.parse_reply(variant),
                    ttl=base.ttl,
                    expires=base.expires,
                    negative=False,
                    do=self.do,
                    patch_ttls=True,
                )
            )
        self.variants = variants
        self.generation += 1
        # What a moving pool keeps to build from: the reply and a walked record per address.
        kept = len(msg) + RECORD_BYTES * len(records) if self.moves else 0
        self.cost = POOL_OVERHEAD + kept + pool_cost(variants)

    def refresh(self, now: float) -> None:
        """Move a pool of more than MAX_ORDERS addresses on, once per SHIFT_EVERY seconds."""
        if not self.moves:
            return
        shift = int(now / SHIFT_EVERY) % len(self.records)
        if shift != self.shift:
            self.shift = shift
            self._build()

    def count(self, answers: int) -> None:
        """Rotated answers are not counted apart from other hits."""

    def render(
        self, query: bytes, q: wire.Query, now: float, limit: int, ttl: int, stale: bool = False
    ) -> bytes:
        """The next variant as a reply to `query`, with TTL `ttl`; `stale`: EDE Stale Answer."""
        self.refresh(now)
        variants = self.variants
        index = self.next % len(variants)
        self.next = index + 1
        return variants[index].render_with_ttl(query, q, ttl, limit, stale)


class Rotator:
    """The rotated pools of cached answers, by cache key: their one owner."""

    def __init__(self, rng: random.Random, charge: Callable[[bytes, str, int], None]) -> None:
        self.rng = rng
        self.charge = charge  # TtlCache.charge: the pools' bytes count against max_bytes
        self.pools: dict[bytes, RotatedAnswer] = {}

    def __len__(self) -> int:
        return len(self.pools)

    def rotate(
        self, key: bytes, entry: Entry, msg: bytes, reply: wire.Reply, do: bool, now: float
    ) -> RotatedAnswer | None:
        """Prepare the pool of the entry just cached under `key`, if it ends in an address
        RRset of two or more records; charge it to `key`."""
        if entry.negative or entry.rcode != wire.NOERROR or entry.ttl <= 0:
            return None
        rrset = address_rrset(msg, reply)
        if rrset is None:
            return None
        records = list(reply.records[rrset[0] : rrset[1]])
        pool = RotatedAnswer(entry, msg, records, do, int(self.rng.random() * len(records)))
        pool.refresh(now)
        self.pools[key] = pool
        self.charge(key, HOLDER, pool.cost)
        return pool

    def of(self, key: bytes, entry: Entry) -> RotatedAnswer | None:
        """The pool drawn from `entry`, cached under `key`; None for any other entry."""
        pool = self.pools.get(key)
        return pool if pool is not None and pool.base is entry else None

    def retire(self, key: bytes) -> None:
        """The cache let the entry under `key` go (its charge went with it)."""
        self.pools.pop(key, None)
