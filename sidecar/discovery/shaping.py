"""Answer shaping for discovery zones: leave out the dead, put the fast first, spread the load.

Theory of operation
- A cached A/AAAA answer of a discovery zone gets a `ShapedAnswer` beside it. The cache entry
  itself is never changed: shaped replies are separate messages built from it.
- Endpoints known unhealthy are left out. If that leaves none, the answer fails open: every
  address, unhealthy last (as Route 53 answers when all records are unhealthy). Leaving out
  is what protects glibc clients, which re-sort same-subnet IPv4 answers (RFC 6724 rule 9)
  and so ignore any order we give.
- Among the rest, the order is a weighted random draw without replacement. An endpoint's
  excess is how much slower than the best it is beyond a slack of max(10 ms, 25% of the best)
  (probe noise: loopback probes on a busy 2-core machine scatter from 1 to 12 ms); its weight
  is (5 ms / (excess + 5 ms)) ** 3. So endpoints within the slack share first place equally
  (no herd, unlike "fastest first"), one 20 ms slower than the best has weight 0.06 and one
  80 ms slower 0.0003. Unknown endpoints (not probed yet) get the median of the known ones.
- Slow start (`slow_start` seconds, 0 = off): an endpoint's weight is scaled by the share of
  that time since an answer first named it (at least MIN_RAMP), so a task added by a deploy
  takes its share of first places gradually. Endpoints first named together ramp together,
  which leaves their shares as they are: the sidecar's own cold start, or a name asked for
  the first time, ramps nothing. While some endpoint ramps, the pool is redrawn as latency
  changes are (at most every `latency_redraw` seconds).
- `max_answers` keeps only the first N after shaping: with N = 1 client-side re-sorting has
  nothing to re-sort.
- The shaped TTL is capped (`answer_ttl`, default 5 s) so clients come back soon enough to
  follow health changes; the cache keeps the upstream TTL.
- Cost: orderings are drawn and rendered when the endpoint table's `version` changes, into a
  pool of `pool_size` prepared messages; a query picks one of them at random. So the hot path
  pays a version compare, one random index and the usual TTL join.
- Ownership: the pools belong to a `Shaper`, by cache key; the cache entry they are drawn from
  is never written to, and a pool goes when the cache retires its key (`Shaper.retire`). A
  pool's estimated bytes are charged to its key in the cache (`TtlCache.charge`) at every draw:
  64 orders of 32 addresses are ~150 KB, which count against `cache.max_bytes`.
No I/O here: time comes in as `now`.
"""

from __future__ import annotations

import ipaddress
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sidecar.core import wire
from sidecar.core.cache import Entry, pool_cost
from sidecar.discovery.endpoints import Endpoint, EndpointTable
from sidecar.discovery.zone_affinity import affinity_weights

# Estimated bytes of a pool beside its variants (tracemalloc, CPython 3.11): the object, and
# per answer record its walked record (~110), its address text (~60) and its slot.
POOL_OVERHEAD = 600
PER_ANSWER = 180
HOLDER = "shaped"  # its name among an entry's charges
MIN_RAMP = 0.05  # a slow-starting endpoint's weight is at least this share of its full one


@dataclass(frozen=True, slots=True)
class ShapeSettings:
    max_answers: int | None = None
    answer_ttl: int = 5
    pool_size: int = 64
    slack: float = 0.010  # at least; or 25% of the best latency when that is more
    scale: float = 0.005
    steepness: float = 3.0
    # A change of latency alone redraws an answer's pool at most this often; a change of
    # health at once. Under load probe round trips jitter (they include our own event loop's
    # lag), and redrawing on every jitter cost a loaded sidecar a quarter of its CPU.
    latency_redraw: float = 2.0
    slow_start: float = 0.0  # seconds over which a new endpoint's weight ramps up; 0: off
    zone_affinity: bool = False  # first places to the task's own AZ (discovery/zone_affinity.py)


def weights(
    latencies: Sequence[float | None], slack: float, scale: float, steepness: float
) -> list[float]:
    """Weights for a weighted random order; None (not measured yet) counts as the median."""
    known = sorted(lat for lat in latencies if lat is not None)
    middle = len(known) // 2
    fallback = (known[middle] + known[~middle]) / 2 if known else 0.0  # the median
    filled = [fallback if lat is None else lat for lat in latencies]
    if not filled:
        return []
    best = min(filled)
    allowed = best + max(slack, best * 0.25)
    return [(scale / (max(lat - allowed, 0.0) + scale)) ** steepness for lat in filled]


def weighted_order(
    items: Sequence[int], item_weights: Sequence[float], rng: random.Random
) -> list[int]:
    """A random order in which each next item is drawn with probability ~ its weight."""
    pool = list(items)
    pool_weights = list(item_weights)
    order = []
    while pool:
        total = sum(pool_weights)
        pick = rng.random() * total if total > 0 else 0.0
        index = 0
        while index < len(pool) - 1 and pick >= pool_weights[index]:
            pick -= pool_weights[index]
            index += 1
        order.append(pool.pop(index))
        pool_weights.pop(index)
    return order


def exact_shares(item_weights: Sequence[float], total: int, rng: random.Random) -> list[int]:
    """`total` split in proportion to the weights, in whole numbers (largest remainder; ties
    broken at random). All weights zero: equal shares."""
    if not item_weights:
        return []
    weight_sum = sum(item_weights)
    if weight_sum <= 0:
        item_weights, weight_sum = [1.0] * len(item_weights), float(len(item_weights))
    quotas = [total * weight / weight_sum for weight in item_weights]
    shares = [math.floor(quota) for quota in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (shares[i] - quotas[i], rng.random()))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


def address_text(msg: bytes, record: wire.Record) -> str | None:
    """The address of an A or AAAA record as text (RFC 5952 for IPv6), else None."""
    data = msg[record.rdata_offset : record.rdata_offset + record.rdlength]
    if (record.rtype == 1 and len(data) == 4) or (record.rtype == 28 and len(data) == 16):
        return str(ipaddress.ip_address(data))
    return None


def variant_entry(variant: bytes, base: Entry, do: bool) -> Entry:
    """A prepared reply (`variant`, a message) as an entry living as long as `base`."""
    return Entry(
        variant,
        wire.parse_reply(variant),
        ttl=base.ttl,
        expires=base.expires,
        negative=False,
        do=do,
        patch_ttls=True,
    )


class ServedPool:
    """Serving a prepared pool, the same for A/AAAA (ShapedAnswer) and SRV (srv_shaping.py's
    ShapedSrv): the TTL cap, the counts by action, the reply. Each kind says how it is brought
    up to date (`refresh`) and which prepared reply a query gets (`pick`)."""

    zone: str
    action: str
    settings: ShapeSettings
    counts: dict[tuple[str, str], int]

    def refresh(self, now: float) -> None:
        raise NotImplementedError

    def pick(self) -> Entry:
        raise NotImplementedError

    @property
    def answer_ttl(self) -> int:
        return self.settings.answer_ttl

    def count(self, answers: int) -> None:
        """Count `answers` shaped replies served under the current action."""
        key = (self.zone, self.action)
        self.counts[key] = self.counts.get(key, 0) + answers

    def render(
        self, query: bytes, q: wire.Query, now: float, limit: int, ttl: int, stale: bool = False
    ) -> bytes:
        """A shaped reply with TTL min(answer_ttl, `ttl`); `stale`: EDE Stale Answer."""
        self.refresh(now)
        self.count(1)
        return self.pick().render_with_ttl(query, q, min(self.answer_ttl, ttl), limit, stale)


@dataclass
class ShapedAnswer(ServedPool):
    """Prepared shaped replies for one cached answer; rebuilt when the endpoint table changes.

    A variant is the upstream reply with its answer records in another order (or fewer of
    them), without authority and additional sections. It is made by splicing the records'
    bytes when the address records come last and none of their names points into another
    address record (what servers send), else by dnslib (decompress, re-pack)."""

    base: Entry
    msg: bytes  # the upstream reply
    question_end: int
    answers: tuple[wire.Record, ...]  # its answer section
    address_of: dict[int, str]  # index in `answers` -> the address of an A/AAAA record
    spliceable: bool
    zone: str
    do: bool
    table: EndpointTable
    settings: ShapeSettings
    rng: random.Random
    counts: dict[tuple[str, str], int]
    version: int = -1
    action: str = "reordered"
    variants: list[Entry] = field(default_factory=list)
    generation: int = 0  # counts the draws of `variants`, so copies of them know they are old
    drawn_at: float = -math.inf
    signature: tuple[object, ...] = ()
    seen_at: float = -math.inf
    charge: Callable[[int], None] | None = None  # told the pool's bytes at every draw
    ramping_until: float = -math.inf  # while some endpoint slow-starts, redraw as time goes

    @property
    def addresses(self) -> list[str]:
        return list(self.address_of.values())

    def rebuild(self, now: float = math.inf) -> None:
        """Draw the pool again if this answer's endpoints changed in a way that matters."""
        self.version = self.table.version
        endpoints = {i: self.table.get(self.zone, a) for i, a in self.address_of.items()}
        # Unknown endpoints (never probed) are usable, with no latency yet.
        usable = [i for i, e in endpoints.items() if e is None or e.usable]
        dead = [] if usable else list(endpoints)
        s = self.settings
        latencies = [e.latency if (e := endpoints[i]) is not None else None for i in usable]
        w = weights(latencies, s.slack, s.scale, s.steepness)
        if s.slow_start > 0:
            w = self._ramped(w, [endpoints[i] for i in usable], now)
        if s.zone_affinity:
            azs = [e.az if (e := endpoints[i]) is not None else None for i in usable]
            w = affinity_weights(w, azs, self.table.local_az)
        signature = (tuple(usable), tuple(dead), tuple(round(x, 1) for x in w))
        if signature == self.signature and self.variants:
            return  # another answer's endpoint changed, or this one's did not matter
        if (
            signature[:2] == self.signature[:2]
            and self.variants
            and now - self.drawn_at < s.latency_redraw
        ):
            self.version = -1  # latency alone, drawn lately: look again at the next refresh
            return
        self.signature = signature
        self.drawn_at = now
        self.action = (
            "failed_open" if dead else "filtered" if len(usable) < len(endpoints) else "reordered"
        )
        others = [i for i in range(len(self.answers)) if i not in self.address_of]  # CNAMEs
        built: dict[tuple[int, ...], Entry] = {}
        variants = []
        # First places are dealt in exact shares (a random draw of 64 gave equally healthy
        # endpoints up to 1.35x their fair share); the rest of each order is drawn.
        leaders = usable or dead
        shares = exact_shares(w if usable else [1.0] * len(dead), s.pool_size, self.rng)
        firsts = [item for item, share in zip(leaders, shares, strict=True) for _ in range(share)]
        self.rng.shuffle(firsts)
        weight_of = dict(zip(usable, w, strict=True))
        for first in firsts:
            following = [i for i in usable if i != first]
            order = [first, *weighted_order(following, [weight_of[i] for i in following], self.rng)]
            last = [i for i in dead if i != first]
            order += self.rng.sample(last, len(last))
            if s.max_answers is not None:
                order = order[: s.max_answers]
            key = tuple(order)
            entry = built.get(key)
            if entry is None:
                entry = built[key] = self._message([*others, *order])
            variants.append(entry)
        self.variants = variants
        self.generation += 1
        if self.charge is not None:
            cost = POOL_OVERHEAD + len(self.msg) + PER_ANSWER * len(self.answers)
            self.charge(cost + pool_cost(variants))

    def _ramped(self, w: list[float], usable: list[Endpoint | None], now: float) -> list[float]:
        """`w` scaled by each endpoint's slow-start ramp (see the module's notes)."""
        slow_start = self.settings.slow_start
        firsts = [e.first_seen for e in usable if e is not None]
        if not firsts or now == math.inf:
            return w
        until = max(firsts) + slow_start
        self.ramping_until = until if now < until else -math.inf  # once over, no more redraws
        return [
            weight
            if e is None
            else weight * max(MIN_RAMP, min(1.0, (now - e.first_seen) / slow_start))
            for weight, e in zip(w, usable, strict=True)
        ]

    def _message(self, indexes: list[int]) -> Entry:
        """The reply with these answer records, in this order."""
        msg = self.msg
        if self.spliceable:
            records = [self.answers[i] for i in indexes]
            variant = b"".join(
                (
                    msg[:4],
                    wire.COUNTS.pack(1, len(records), 0, 0),
                    msg[wire.HEADER_SIZE : self.question_end],
                    *(msg[r.start : r.end] for r in records),
                )
            )
        else:
            from dnslib import DNSRecord

            record = DNSRecord.parse(msg)
            record.rr = [record.rr[i] for i in indexes]
            record.auth, record.ar = [], []
            variant = bytes(record.pack())
        return variant_entry(variant, self.base, self.do)

    def refresh(self, now: float) -> None:
        """Bring the pool up to date with the endpoint table; before serving from it."""
        if now - self.seen_at > 10.0:  # keep the endpoints of cached answers from being forgotten
            self.seen_at = now
            self.table.seen(self.zone, self.addresses, now)
        if self.version != self.table.version or (
            self.drawn_at < self.ramping_until  # drawn while some endpoint was ramping
            and now - self.drawn_at >= self.settings.latency_redraw
        ):
            self.rebuild(now)

    def pick(self) -> Entry:
        """One of the pool's variants, at random."""
        return self.variants[int(self.rng.random() * len(self.variants))]


def shape(
    entry: Entry,
    msg: bytes,
    reply: wire.Reply,
    zone: str,
    do: bool,
    table: EndpointTable,
    settings: ShapeSettings,
    rng: random.Random,
    counts: dict[tuple[str, str], int],
    now: float,
) -> ShapedAnswer | None:
    """A ShapedAnswer for a positive A/AAAA answer with addresses in it, else None.
    `reply`: `msg` as wire.parse_reply walked it (for the cache entry)."""
    if entry.negative or entry.rcode != wire.NOERROR or entry.ttl <= 0:
        return None
    qend = reply.question_end
    if int.from_bytes(msg[qend - 4 : qend - 2], "big") not in wire.ADDRESS_TYPES:  # the QTYPE
        return None
    answers = tuple(r for r in reply.records if r.section == 0)
    address_of = {}
    for i, record in enumerate(answers):
        address = address_text(msg, record)
        if address is not None:
            address_of[i] = address
    if not address_of:
        return None
    first = min(address_of)
    spliceable = list(address_of) == list(range(first, len(answers))) and all(
        wire.name_points_below(msg, answers[i].start, answers[first].start) for i in address_of
    )
    shaped = ShapedAnswer(
        entry, msg, qend, answers, address_of, spliceable, zone, do, table, settings, rng, counts
    )
    shaped.seen_at = now
    table.seen(zone, shaped.addresses, now)
    return shaped
