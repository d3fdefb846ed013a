"""The answer cache: upstream replies kept as wire bytes, served by splicing in a TTL.

Theory of operation
- An entry is made once, on the miss path, from a walked upstream reply (wire.parse_reply). The
  upstream's OPT record is cut off (we add our own per client); the rest after the question is
  kept as one bytes object with the offsets of its records' TTL fields. Serving a hit is then:
  the client's ID, flags, counts, the client's own question bytes (its letter case, 0x20
  clients check it) and the body with the TTL spliced in at each offset. No parsing, no dnslib,
  one `join` (re-packing with dnslib runs at ~7k qps on 2 vCPUs).
- Small: ~250 bytes of memory per one-record entry beside its key (tracemalloc), because a
  cache holds 100,000 of them. What entries have alike (flags, counts, OPT, rcode; the TTL
  offsets; the TTL) is one shared object for all (`Form`, `_shared`), not a field each.
- Every record carries the entry's remaining TTL (as CoreDNS does), rounded up, so a fresh
  entry never says 0 and the TTL counts down from the first answer to the last.
- Lifetimes: positive = smallest TTL of all records, clamped to [min_ttl, max_ttl]; negative
  (NXDOMAIN, NODATA) = RFC 2308 min(SOA TTL, SOA MINIMUM) clamped to max_negative_ttl, and not
  cached without an SOA; a failed resolution (any kind of upstream failure: forwarding.py) is
  remembered `servfail_ttl` seconds (RFC 9520) in a separate table so it never replaces a
  good answer; truncated replies are never cached.
- Expired entries stay (serve-stale, RFC 8767) until `max_stale` past expiry, until replaced,
  or until evicted; an NXDOMAIN from upstream removes the entry even when it cannot be cached.
- An entry knows when it is due for prefetch (`prefetch_at`), so the hot path checks one float.
- An entry is immutable once made: what other stages keep about it (fast-path rows, the
  prefetch started for it, a discovery answer's shaped pool) they keep themselves, by cache
  key, and drop when the cache calls its one retirement hook (`on_retire(key)`): the entry
  for that key was replaced, evicted or removed.
- Bounded by entry count and by estimated memory (`max_bytes`), least recently used evicted
  first. The cache owns the one byte count: an entry's own bytes (`Entry.cost`) plus what other
  stages keep beside it (fast-path rows, a shaped or rotated pool), which they `charge` to its
  key; a charge may evict other entries, and goes when the entry retires. Time is passed in as
  `now` (monotonic seconds).
- Only replies whose records all belong to the question are cached (bailiwick.py).
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar, cast

from sidecar.core import bailiwick, wire
from sidecar.core.counters import Counters


@dataclass(frozen=True, slots=True)
class CacheSettings:
    max_entries: int = 100_000
    min_ttl: int = 0
    max_ttl: int = 86_400
    max_negative_ttl: int = 60
    servfail_ttl: int = 5
    prefetch_percent: int = 10  # refresh when less than this share of the TTL is left; 0: off
    max_stale: int = 86_400  # serve expired answers this long past expiry (RFC 8767); 0: off
    stale_answer_after: float = 1.8  # seconds a client waits before it gets a stale answer
    stale_ttl: int = 30  # the TTL of a stale answer
    max_bytes: int = 64 * 1024 * 1024  # estimated memory of all entries (Entry.cost)


T = TypeVar("T")
# An entry: the object, its table slot, its two floats, its body's bytes beside their content.
ENTRY_OVERHEAD = 270
# A pool's variant: the entry and its body's header (no table slot; its floats are its base's).
VARIANT_OVERHEAD = 130
CHARGE_SLOT = 100  # a charge's own slot and number (tracemalloc, CPython 3.11)
POOL_SLOT = 8  # a pool's list slot per variant


TC_COUNTS = (wire.COUNTS.pack(1, 0, 0, 0), wire.COUNTS.pack(1, 0, 0, 1))  # without, with OPT
OPT_RECORDS = (wire.opt_record(wire.EDNS_PAYLOAD, False), wire.opt_record(wire.EDNS_PAYLOAD, True))
# A stale answer tells an EDNS client so (RFC 8914 info code 3), DO echoed as for a fresh one.
STALE_OPT_RECORDS = tuple(
    wire.opt_record(wire.EDNS_PAYLOAD, do, 0, wire.ede_option(wire.EDE_STALE_ANSWER))
    for do in (False, True)
)
_SHARED: dict[object, object] = {}
MAX_SHARED = 4096


def _shared(value: T) -> T:
    """One copy of equal small values (header forms, counts, TTLs, offsets) for all entries;
    told apart by type too (1 == True, a Form equals the plain tuple of its fields)."""
    key = (value.__class__, value)
    kept = _SHARED.get(key)
    if kept is not None:
        return cast(T, kept)
    if len(_SHARED) < MAX_SHARED:
        _SHARED[key] = value
    return value


class Form(NamedTuple):
    """What an entry's replies carry beside its records: the same for many entries (few flag
    sets, counts and OPT records occur), so one shared tuple (`_shared`) serves them all."""

    # The header flag pairs a client sees, by RD | CD << 1 of its query: its own RD and CD
    # (RFC 4035 3.2.2: copied); RA since we recurse for it; AA cleared, because an answer
    # from a cache is not authoritative (RFC 1035 6.2); Z always clear.
    flags: tuple[bytes, ...]
    counts: bytes  # QD, AN, NS, AR without an OPT record...
    counts_edns: bytes  # ...and with ours
    opt: bytes  # our OPT record, DO as the client's
    rcode: int
    negative: bool  # NXDOMAIN or NODATA
    # Made in a discovery zone: its answers come from a shaped pool, never as it is (said
    # here, so a reader thread that finds it before its pool is made does not serve it).
    discovery: bool


class Entry:
    """One reply ready to be served to any client that asks the same question.

    Kept small (100,000 of them are a cache's worth): the records after the question as one
    bytes object, the offsets of their TTL fields in it (a tuple shared by all entries of the
    same layout), what all its replies share (`form`, shared by entries alike), and its own
    numbers (a TTL shared too). No per-entry object beside the bytes and two floats."""

    __slots__ = ("body", "expires", "form", "prefetch_at", "ttl", "ttl_at")

    def __init__(
        self,
        msg: bytes,
        reply: wire.Reply,
        ttl: int,
        expires: float,
        negative: bool,
        do: bool,
        patch_ttls: bool,
        prefetch_percent: int = 0,
        discovery: bool = False,
    ) -> None:
        # The OPT record, when there is one, must be the last thing in the message so that it
        # can be cut off without moving any name a compression pointer refers to.
        start = reply.question_end
        self.body = msg[start : reply.opt.start if reply.opt else len(msg)]
        records = reply.records
        if not patch_ttls:
            ttl_at: tuple[int, ...] = ()
        elif len(records) == 1:  # the common answer
            ttl_at = (records[0].ttl_offset - start,)
        else:
            ttl_at = tuple(record.ttl_offset - start for record in records)
        # One copy of each: found with one look-up (an empty tuple or a 0 is kept again).
        self.ttl_at = _OFFSETS.get(ttl_at) or _keep(_OFFSETS, ttl_at, ttl_at)
        form_key = (msg[2:12], reply.opt is not None, do, negative, discovery)
        self.form = _FORMS.get(form_key) or _keep(
            _FORMS, form_key, _form(msg, reply, do, negative, discovery)
        )
        self.ttl = _TTLS.get(ttl) or _keep(_TTLS, ttl, ttl)
        self.expires = expires
        # Asked for after this moment, the entry is refreshed in the background (once).
        self.prefetch_at = (
            expires - ttl * prefetch_percent / 100 if prefetch_percent and ttl else math.inf
        )

    @property
    def rcode(self) -> int:
        return self.form.rcode

    @property
    def negative(self) -> bool:
        return self.form.negative

    @property
    def cost(self) -> int:
        """Estimated bytes of memory this entry holds while cached, its table slot included
        (but not its key's bytes): tracemalloc on CPython 3.11, ENTRY_OVERHEAD for the entry,
        its slot and its two floats, and the body's own bytes."""
        return ENTRY_OVERHEAD + len(self.body)

    def render(self, query: bytes, q: wire.Query, now: float, limit: int) -> bytes:
        """This entry as a reply to `query`: its ID, RD bit, question; TC when over `limit`."""
        return self.render_with_ttl(query, q, math.ceil(self.expires - now), limit)

    def render_with_ttl(
        self, query: bytes, q: wire.Query, ttl: int, limit: int, stale: bool = False
    ) -> bytes:
        """`render` with the TTL given; `stale`: the OPT says Stale Answer (EDE 3)."""
        qend = q.question_end
        form = self.form
        flags = form.flags[(query[2] & wire.RD) | (q.cd << 1)]
        edns = q.edns_size != 0
        opt = STALE_OPT_RECORDS[q.do] if stale else form.opt
        body: bytes | bytearray = self.body
        if len(body) + qend + (len(opt) if edns else 0) > limit:
            tc_flags = bytes((flags[0] | wire.TC, flags[1]))
            return b"".join(
                (
                    query[:2],
                    tc_flags,
                    TC_COUNTS[edns],
                    query[wire.HEADER_SIZE : qend],
                    opt if edns else b"",
                )
            )
        ttl_at = self.ttl_at
        if len(ttl_at) == 1:  # one record (the common case): its TTL spliced in, no copy
            at = ttl_at[0]
            before, ttl_bytes, after = body[:at], ttl.to_bytes(4, "big"), body[at + 4 :]
            question = query[wire.HEADER_SIZE : qend]
            if edns:
                return b"".join(
                    (query[:2], flags, form.counts_edns, question, before, ttl_bytes, after, opt)
                )
            return b"".join((query[:2], flags, form.counts, question, before, ttl_bytes, after))
        if ttl_at:
            patched = bytearray(body)
            ttl_bytes = ttl.to_bytes(4, "big")
            for at in ttl_at:
                patched[at : at + 4] = ttl_bytes
            body = patched
        if edns:
            return b"".join(
                (query[:2], flags, form.counts_edns, query[wire.HEADER_SIZE : qend], body, opt)
            )
        return b"".join((query[:2], flags, form.counts, query[wire.HEADER_SIZE : qend], body))


# Forms by what they are made of (header flags, rcode and counts; an OPT record or not; DO;
# negative; discovery): one dict lookup per entry made, instead of a Form made and shared.
_FORMS: dict[tuple[bytes, bool, bool, bool, bool], Form] = {}
# TTL-field offsets and TTLs, one copy of each (as `_shared`, by type: a look-up, no key made).
_OFFSETS: dict[tuple[int, ...], tuple[int, ...]] = {}
_TTLS: dict[int, int] = {}


K = TypeVar("K")


def _keep(table: dict[K, T], key: K, value: T) -> T:
    """`value`, kept in `table` under `key` while the table has room (MAX_SHARED)."""
    if len(table) < MAX_SHARED:
        table[key] = value
    return value


def _form(msg: bytes, reply: wire.Reply, do: bool, negative: bool, discovery: bool) -> Form:
    qd, an, ns, ar = wire.COUNTS.unpack_from(msg, 4)
    if reply.opt is not None:
        ar -= 1
    return _shared(
        Form(
            _flags(msg[2], msg[3]),
            wire.COUNTS.pack(qd, an, ns, ar),
            wire.COUNTS.pack(qd, an, ns, ar + 1),
            OPT_RECORDS[do],
            reply.rcode,
            negative,
            discovery,
        )
    )


@functools.lru_cache(maxsize=256)
def _flags(byte2: int, byte3: int) -> tuple[bytes, ...]:
    """The four header flag pairs of an entry whose upstream reply had flags `byte2, byte3`,
    by RD | CD << 1 of the query (one tuple for all entries alike: few flag sets occur)."""
    byte2 &= ~(wire.RD | wire.TC | wire.AA) & 0xFF
    byte3 = (byte3 & ~(wire.Z | wire.CD) & 0xFF) | wire.RA
    return tuple(
        bytes((byte2 | (bits & wire.RD), byte3 | (wire.CD if bits & 2 else 0))) for bits in range(4)
    )


def pool_cost(variants: Sequence[Entry]) -> int:
    """Estimated bytes of a pool of prepared variants: each distinct one, and a slot each."""
    distinct = {id(variant): VARIANT_OVERHEAD + len(variant.body) for variant in variants}
    return sum(distinct.values()) + POOL_SLOT * len(variants)


def opt_is_last(msg: bytes, reply: wire.Reply) -> bool:
    return reply.opt is None or reply.opt.end == len(msg)


def lifetime(
    msg: bytes, reply: wire.Reply, limits: CacheSettings, max_negative: int | None = None
) -> tuple[int, bool] | None:
    """How long a reply may be cached and whether it is negative; None: do not cache it.
    `max_negative`: a lower cap than the settings' on negative answers (a discovery zone's)."""
    opt = reply.opt
    if reply.truncated or (opt is not None and opt.end != len(msg)):  # see opt_is_last
        return None
    records = reply.records
    if reply.rcode == wire.NOERROR and records and records[0].section == 0:  # an answer
        ttl = records[0].ttl if len(records) == 1 else min(r.ttl for r in records)
        return min(max(ttl, limits.min_ttl), limits.max_ttl), False
    if reply.rcode in (wire.NOERROR, wire.NXDOMAIN):
        negative = wire.soa_negative_ttl(msg, reply)
        if negative is None:
            return None  # a referral or a negative answer without SOA: RFC 2308 says no
        cap = limits.max_negative_ttl
        if max_negative is not None:
            cap = min(cap, max_negative)
        return min(negative, cap), True
    return None


class TtlCache:
    """Fresh answers by key, LRU-bounded, and a small table of recent upstream failures."""

    def __init__(self, limits: CacheSettings, counters: Counters | None = None) -> None:
        self.limits = limits
        self.counters = counters or Counters()  # evictions are counted there
        # Told the key of every entry that leaves (replaced, evicted, removed), so what other
        # stages keep about it by key goes with it. The pipeline sets it.
        self.on_retire: Callable[[bytes], None] | None = None
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()
        # The entry under a key, fresh or expired, its LRU place untouched: one dict lookup
        # (a C call), safe from a UDP reader thread (core/fast_path.py's `answer_cold`).
        self.peek: Callable[[bytes], Entry | None] = self._entries.get
        self._failures: OrderedDict[bytes, float] = OrderedDict()
        self.negative_entries = 0  # kept as entries come and go, for the metrics
        # The estimated memory of all entries (Entry.cost + key) and of what is kept beside
        # them (charges), for max_bytes.
        self.bytes = 0
        # Holder ("rows", "shaped", "rotated") -> key -> the bytes it keeps beside that entry
        # (one table per holder: a dict per key cost 250 bytes per key with a fast-path row).
        self._charges: dict[str, dict[bytes, int]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return (
            f"<TtlCache entries={len(self._entries)} bytes={self.bytes} "
            f"failures={len(self._failures)}>"
        )

    def get(self, key: bytes, now: float) -> Entry | None:
        """The fresh entry for `key`, or None. Expired entries stay for serve-stale."""
        entry = self._entries.get(key)
        if entry is None or entry.expires <= now:
            return None
        self._entries.move_to_end(key)
        return entry

    def touch(self, key: bytes) -> None:
        """Mark `key` as recently used (for hits served from a copy of its entry)."""
        try:  # noqa: SIM105 - a hit per cold query: suppress() costs a context manager
            self._entries.move_to_end(key)
        except KeyError:
            pass

    def get_stale(self, key: bytes, now: float) -> Entry | None:
        """An entry that expired at most `max_stale` seconds ago (RFC 8767), or None."""
        entry = self._entries.get(key)
        if entry is None or entry.expires > now:
            return None
        if now - entry.expires >= self.limits.max_stale:
            self._remove(key)  # too old to serve, even stale
            return None
        return entry

    def store(
        self,
        key: bytes,
        msg: bytes,
        reply: wire.Reply,
        now: float,
        do: bool,
        zone: bytes = bailiwick.ROOT,
        max_negative: int | None = None,
        discovery: bool = False,
    ) -> Entry:
        """Make an entry from an upstream reply; cache it when its lifetime allows and all its
        records belong to the question (`zone`: the wire name of the zone it was routed by;
        `max_negative`: a lower cap on a negative answer's lifetime; `discovery`: made in a
        discovery zone, served from its shaped pool only)."""
        life = lifetime(msg, reply, self.limits, max_negative)
        if life is not None and not bailiwick.in_bailiwick(msg, reply, key[:-5], zone):
            life = None
        if life is None or life[0] <= 0:
            if reply.rcode == wire.NXDOMAIN:
                self._remove(key)  # the name is gone: nothing stale may be served
            # Served once to the clients waiting for it, with the upstream's own TTLs.
            return Entry(msg, reply, ttl=0, expires=now, negative=False, do=do, patch_ttls=False)
        ttl, negative = life
        # Positional: one per miss (Entry(msg, reply, ttl, expires, negative, do, patch_ttls,
        # prefetch_percent, discovery)).
        entry = Entry(
            msg, reply, ttl, now + ttl, negative, do, True, self.limits.prefetch_percent, discovery
        )
        entries = self._entries
        if key in entries:
            self._remove(key)
        entries[key] = entry
        self.negative_entries += negative
        self.bytes += ENTRY_OVERHEAD + len(entry.body) + len(key)  # entry.cost, inline
        self._failures.pop(key, None)
        limits = self.limits
        if len(entries) > limits.max_entries or self.bytes > limits.max_bytes:
            self._evict(key)
        return entry

    def charge(self, key: bytes, holder: str, nbytes: int) -> None:
        """`holder` keeps `nbytes` beside the entry under `key` (replacing what it said
        before; 0: nothing). Counted against max_bytes until the entry retires, least recently
        used others evicted to make room. Ignored when no entry is cached under `key`."""
        if key not in self._entries:
            return
        held = self._charges.get(holder)
        if held is None:
            held = self._charges[holder] = {}
        before = held.pop(key, 0)
        if nbytes:
            nbytes += CHARGE_SLOT
            held[key] = nbytes
        self.bytes += nbytes - before
        self._evict(key)

    def charged(self, key: bytes, holder: str | None = None) -> int:
        """The bytes kept beside the entry under `key` (its charges): `holder`'s, or all."""
        if holder is not None:
            return self._charges.get(holder, {}).get(key, 0)
        return sum(held.get(key, 0) for held in self._charges.values())

    def _evict(self, keep: bytes) -> None:
        """Least recently used entries out while over a bound; never `keep` (the entry just
        stored or charged), so one entry and its charges stay even when over max_bytes alone."""
        limits = self.limits
        entries = self._entries
        while len(entries) > limits.max_entries or self.bytes > limits.max_bytes:
            old_key = next(iter(entries))
            if old_key == keep:
                if len(entries) == 1:
                    return
                entries.move_to_end(keep)
                old_key = next(iter(entries))
            self._remove(old_key)
            self.counters.cache_evictions += 1

    def _remove(self, key: bytes) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            if self.on_retire is not None:
                self.on_retire(key)
            self.negative_entries -= old.form.negative
            self.bytes -= old.cost + len(key)
            for held in self._charges.values():
                self.bytes -= held.pop(key, 0)

    def remember_failure(self, key: bytes, now: float) -> None:
        """RFC 9520: a failed resolution is not retried upstream for `servfail_ttl` seconds."""
        if self.limits.servfail_ttl <= 0:
            return
        self._failures[key] = now + self.limits.servfail_ttl
        self._failures.move_to_end(key)
        while len(self._failures) > self.limits.max_entries:
            self._failures.popitem(last=False)

    def failed_recently(self, key: bytes, now: float) -> bool:
        until = self._failures.get(key)
        if until is None:
            return False
        if until <= now:
            del self._failures[key]
            return False
        return True
