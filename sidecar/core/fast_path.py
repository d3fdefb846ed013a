"""The UDP fast path's table: finished replies by the bytes of the query after its ID.

Theory of operation
- Clients ask the same bytes again and again (the same resolver library, name, flags and EDNS
  options); only the ID changes. So a cache hit is remembered as a row keyed by the query's
  bytes after the ID, holding the reply's bytes after the ID. The listener answers the next
  identical query with `query[:2] + row.tail`: one dict lookup, a clock read to check
  the row and one to time the reply, one join, one send. No parsing, no TTL arithmetic, no
  labelled counters on that path.
- A row is valid until one moment, `valid_until`: the earliest of the entry's expiry, its
  prefetch time (unless a prefetch runs already), the moment the TTL it shows next drops by a
  second, and for shaped answers a recheck of endpoint health every `SHAPED_RECHECK` seconds
  (counted from when the refresh read it, see "Refreshed ahead").
  Past that moment the row is refreshed (re-rendered, prefetch started, pool redrawn) or
  dropped, off the hot path. Between refreshes nothing about the entry is read per query.
- A row dies with its cache entry: the table keeps its rows by cache key (`by_key`) and the
  pipeline passes on the cache's retirement hook (`retire(key)`), so the table never serves
  what the cache let go. The entry itself is never written to. The rows' estimated bytes are
  charged to their entry's key (`RowSource.charge`, the cache's max_bytes), so they are
  bounded by the cache's memory as well as by `capacity`.
- Shaped (discovery) and rotated answers: the row holds the pool of prepared variants,
  rendered for this query shape, and hands them out in turn (`itertools.cycle`), starting at
  a random place.
- Counting: a row counts its own hits; the labelled families (requests by type, cache hits,
  responses by rcode, shaped answers by action) are added up when a row is flushed: at every
  scrape (`flush`), refresh and drop. Durations go to the latency histogram by batch (a
  reader thread's batch is timed as a whole), quick ones summed until the scrape (`quick`).
  Exact, not sampled.
  Only the event loop writes counts (`served`). A UDP reader thread (server/udp_thread.py)
  hands each batch's served rows and its time over with one `hand_off` (a deque's append,
  atomic in CPython and thread-safe in free-threaded builds); the loop folds them in (`drain`)
  before anything reads the counts: at `flush`, at a row's refresh and drop (the rows'
  batches), and before `refresh_due` asks which rows were asked since their refresh, and
  whenever DRAIN_AT batches of rows or DRAIN_COLD_AT of hits answered from entries wait
  (`on_backlog`, which the glue makes a thread-safe call of `drain_turn` on the loop, in
  turns). Rows cached in one burst come due
  together once a second, and a second of batches at full load (~11k of them) held ~4 MiB
  that the process kept. A thread may serve a row the loop has just dropped (it read the
  row before): those hits are counted as they are drained, since no flush sees a dropped
  row.
- The cache's LRU order sees a row's entry used at every refresh (about once a second while
  the row is asked), not at every hit.
- Refreshed ahead: a row asked since its last refresh is refreshed again shortly before its
  moment (`REFRESH_LEAD`), as if it were that moment already, so the TTL it shows drops up to
  that much early (never late) and the hot path keeps answering across the boundary. A shaped
  row's next recheck counts from when such a refresh ran, which is when it read endpoint
  health, not from that moment: so no answer is served more than SHAPED_RECHECK after a health
  change it does not show (counted from the moment, up to REFRESH_LEAD + TICK more). Rows come
  due in buckets of `TICK` seconds; `on_due` (set by the glue) is told when a bucket is first
  used and calls `refresh_due` then, and again soon while it says more are due (at most
  REFRESH_BATCH rows a call). A row refreshed on demand (a late timer, a row not asked for a
  while) is scheduled the same way. Without this, the rows cached in one burst all passed
  their moment together once a second, and for those milliseconds every query of them took
  the slow path (the p99 at half load, and reader-thread hand-offs).
- Resting: a row not asked since its last refresh, REST_AFTER ago or more, is not refreshed
  ahead and leaves `due`: past its moment it rests in the table (nothing wakes the loop for
  it) until it is asked again. Then it is made current at once: on the loop by the hit itself
  (`refresh`), from a reader thread by the loop's next turn (the thread answers the hit from
  the entry with the row's parse, `answer_cold`, and the loop, counting it, admits it
  without waiting for a second hit). Dropped instead, every row of a burst after a quiet
  second had to be earned again by two hits, and the burst began on hits answered from
  entries: most of the sidecar's answers over 500 us at half load (bench/NOTES.md). A
  resting row stays charged to its entry's key, and goes with its entry, when the table is
  full (the sweep), when asked after its entry expired, or when RESTING_ROWS others rest
  since it began to.
- Admission: a row is made on the second hit of an entry while its first is remembered
  (`admit`): in two generations of at most half of ADMIT_WITHIN and ADMIT_MEMORY entries
  each, by entry identity (no copy of a key, nothing written to the entry). Hits with no row
  are answered from the entry itself: by a reader thread (`answer_cold`), which hands them
  to the loop to count and admit, or on the loop. The loop counts a reader thread's backlog
  at once and makes the rows it admitted in turns (`drain_turn`: REFRESH_BATCH rows a turn,
  the GIL handed to the thread between turns), each only if its entry is still the cache's
  and servable then.
- Bounded: at most `capacity` rows. When full, rows not valid any more (resting, or not asked
  within about a second) are swept out, at most once a second; if that frees nothing, no row
  is added and such queries take the ordinary path.
Time is passed in as `now` (monotonic seconds); no I/O here.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from itertools import cycle, repeat
from typing import Protocol

from sidecar.core import wire
from sidecar.core.cache import Entry
from sidecar.core.counters import LATENCY_BUCKETS, Counters, Histogram

FAST_PATH_ROWS = 16384
SHAPED_RECHECK = 0.25  # seconds between endpoint-health checks of a shaped row
QUICK = LATENCY_BUCKETS[0]  # hits faster than this land in the histogram's first bucket
SWEEP_EVERY = 1.0
REFRESH_LEAD = 0.05  # a row in use is refreshed this long before its moment, or up to TICK more
TICK = 0.05  # rows come due in buckets this wide
AFTER = 1e-3  # a row refreshed ahead is rendered as of this long after its moment
# A row not asked since its last refresh rests (is not refreshed ahead) once that refresh is
# this old: a row made or revived just before its moment is refreshed ahead once more, so the
# name has time to be asked again. Rested at once, the rows revived at the start of a burst
# all came due together within the burst and were answered from their entries again.
REST_AFTER = 0.5
REFRESH_BATCH = 8  # rows refreshed ahead per call (~50 us), then a reader thread may run
RESTS_PER_REFRESH = 8  # rows set resting in a call count as one refreshed
# Rows resting at most; past that the one resting longest goes. Unbounded, the rows of the
# 10,000 names `make bench` asks before its 100,000 all rested: 7 MiB more RSS then.
RESTING_ROWS = 2048
ADMIT_WITHIN = 1.0  # a row for an entry asked twice within about this many seconds...
ADMIT_MEMORY = 8192  # ...and this many other entries asked (see `admit`)
DRAIN_AT = 64  # batches of rows handed off before the loop is asked to count them
# Batches of hits answered from entries (`hand_off_cold`) before the loop is asked to count
# them: sooner than rows, while their query, parse and entry are still in the CPU's caches
# (each hit's objects are its own; a row's are shared). 100,000 names asked in turn: 64 ->
# 16, 116k -> 130k QPS, 8.6 -> 7.7 us of CPU per query (bench/NOTES.md).
DRAIN_COLD_AT = 16
# Estimated bytes of a row beside its reply bytes (tracemalloc, CPython 3.11): the row, its
# parsed query, its key and its slots in `rows` and `by_key`; and per reply it hands out.
ROW_OVERHEAD = 550
TAIL_OVERHEAD = 60

# A hit a reader thread answered from a cache entry (no current row): the query, its parse,
# the entry, and the row for those bytes if one was there (past its moment: resting).
ColdHit = tuple[bytes, wire.Query, Entry, "FastHit | None"]


class ShapedReplies(Protocol):
    """A discovery answer's pool of prepared replies (discovery/shaping.py)."""

    @property
    def variants(self) -> Sequence[Entry]: ...
    @property
    def generation(self) -> int: ...
    @property
    def answer_ttl(self) -> int: ...
    def refresh(self, now: float) -> None: ...
    def count(self, answers: int) -> None: ...


class RowSource(Protocol):
    """What the table asks of the pipeline, which owns the cache and what hangs off it."""

    def prefetch(self, q: wire.Query, entry: Entry) -> None:
        """Start the background refresh of `entry` (once per entry)."""

    def prefetching(self, key: bytes) -> bool:
        """Whether the refresh of the entry now cached under `key` has been started."""

    def shaped(self, key: bytes, entry: Entry) -> ShapedReplies | None:
        """The shaped pool served instead of `entry` (cached under `key`), if any."""

    def touch(self, key: bytes) -> None:
        """Mark the entry under `key` as recently used."""

    def servable(self, key: bytes, now: float) -> Entry | None:
        """The entry under `key` if a reader thread may answer from it as it is (fresh, no
        refresh due, no pool standing in for it); reads only, safe from the thread."""

    def charge(self, key: bytes, nbytes: int) -> None:
        """The rows of the entry under `key` hold `nbytes` (counted against the cache's
        max_bytes; they may evict others)."""


class FastHit:
    """One remembered query shape and its reply (or pool of replies) after the ID."""

    __slots__ = (
        "cost",
        "counted",
        "dropped",
        "entry",
        "generation",
        "hits",
        "key",
        "next_tail",
        "q",
        "refreshed_at",
        "seen",
        "shaped",
        "shown_ttl",
        "tail",
        "valid_until",
    )

    def __init__(
        self, key: bytes, entry: Entry, q: wire.Query, shaped: ShapedReplies | None
    ) -> None:
        self.key = key
        self.entry = entry
        self.q = q
        self.shaped = shaped
        self.next_tail: Callable[[], bytes] = repeat(b"").__next__
        # A plain row's reply after the ID, also what next_tail gives; b"" for a shaped row,
        # whose replies come from next_tail in turn. The hot path reads `tail or next_tail()`:
        # a slot read is cheaper than calling the iterator.
        self.tail = b""
        self.shown_ttl = -1
        self.generation = -1
        self.valid_until = -math.inf  # rendered at once by `remember`
        self.dropped = False  # out of the table: no flush counts it any more (`drop`)
        self.cost = 0  # estimated bytes of this row, charged to its entry's key
        # Written by the event loop only (FastPath.served), read after FastPath.drain.
        self.hits = 0  # served from this row since its last flush
        self.counted = 0  # hits flushed to the metrics so far
        self.seen = 0  # counted + hits at the last refresh: more since means asked since
        self.refreshed_at = -math.inf  # when the last refresh ran


class FastPath:
    """The rows, their refresh, and their counts; one per resolver, shared by its listeners."""

    def __init__(
        self,
        metrics: Counters,
        source: RowSource,
        capacity: int = FAST_PATH_ROWS,
        rng: random.Random | None = None,
    ) -> None:
        self.metrics = metrics
        self.source = source
        self.capacity = capacity
        self.rng = rng or random.Random()
        self.rows: dict[bytes, FastHit] = {}
        self.get = self.rows.get  # the hot path's lookup; `rows` is never replaced
        self.by_key: dict[bytes, list[FastHit]] = {}  # the rows of each cache key
        # The entries whose last hit found no row, this generation and the one before.
        self.asked: set[object] = set()  # entries, by identity (admit)
        self.asked_before: set[object] = set()
        self.asked_since = -math.inf  # when the current generation began
        self._swept_at = -math.inf
        # Rows to refresh ahead, by bucket (moment // TICK), each with the moment it had.
        self.due: dict[int, list[tuple[FastHit, float]]] = {}
        # The rows resting (see the module's notes), in the order they began to.
        self.resting: dict[FastHit, None] = {}
        self.on_due: Callable[[float], None] | None = None  # glue: call refresh_due then
        # Batches a UDP reader thread served, (their rows, their time), not counted yet. The
        # thread's only write here is `hand_off` (see the module's notes); the loop `drain`s.
        self._handed: deque[tuple[list[FastHit], float]] = deque()
        # The same for the hits a thread answered from entries (`answer_cold`): (the hits,
        # when the batch began, its time).
        self._handed_cold: deque[tuple[list[ColdHit], float, float]] = deque()
        self.on_backlog: Callable[[], None] | None = None  # glue: have the loop drain_turn
        # Hits answered from entries that `drain` admitted, their rows not made yet (make_rows),
        # by entry (identity), oldest first: one hit each, so at most as many as the admission
        # memory (`admit`) and the resting rows hold.
        self._admitted: dict[object, ColdHit] = {}
        # Hits faster than QUICK not in the latency histogram yet: how many, their time.
        self.quick = 0
        self.quick_seconds = 0.0

    def __len__(self) -> int:
        return len(self.rows)

    def admit(self, entry: object, now: float) -> bool:
        """Whether a hit on `entry` at `now` should get a row: a second hit while the first is
        remembered. Hits that found no row are remembered by entry (its identity) in two
        generations, a generation ending after half of ADMIT_WITHIN or ADMIT_MEMORY entries,
        whichever comes first: so a name gets a row when asked again within a second (always
        within half a second) and before 8,192 to 16,384 other names were. Names asked less
        often would only churn the table (100,000 names asked in turn filled and swept it
        every second, a row made per query and never used); a reader thread answers them from
        their entries (`answer_cold`). At most 2 x ADMIT_MEMORY entries are remembered (and
        a reader thread's batch more: `drain` judges a batch's hits at one moment)."""
        asked, before = self._generations(now)
        if entry in asked or entry in before:
            return True
        asked.add(entry)
        return False

    def _generations(self, now: float) -> tuple[set[object], set[object]]:
        """The admission memory at `now` (see `admit`): the current generation and the one
        before, a new one begun when due."""
        asked = self.asked
        if now - self.asked_since >= ADMIT_WITHIN / 2 or len(asked) >= ADMIT_MEMORY:
            # The generation ends; the one before goes, and so does this one if it began
            # ADMIT_WITHIN ago (no hit came to end it in time): whatever is remembered was
            # asked less than ADMIT_WITHIN ago.
            if now - self.asked_since >= ADMIT_WITHIN:
                asked = set()
            self.asked_before, self.asked, self.asked_since = asked, set(), now
        return self.asked, self.asked_before

    def remember(
        self, query: bytes, q: wire.Query, entry: Entry, now: float, reply: bytes = b""
    ) -> FastHit | None:
        """A row for `query` answered from `entry`, ready to serve; None if there is no room.
        `reply`: the plain (not shaped) reply just rendered from `entry` at `now`, if any."""
        key = query[2:]
        old = self.rows.get(key)
        if old is not None:
            if old.entry is entry:
                return old if now < old.valid_until or self.refresh(old, query, now) else None
            self.drop(old)
        if len(self.rows) >= self.capacity:
            if now - self._swept_at < SWEEP_EVERY:
                return None
            self._swept_at = now
            for stale in [hit for hit in self.rows.values() if hit.valid_until <= now]:
                self.drop(stale)
            if len(self.rows) >= self.capacity:
                return None
        hit = FastHit(key, entry, q, self.source.shaped(q.key, entry))
        if reply and hit.shaped is None:
            hit.tail = reply[2:]
            hit.next_tail = repeat(hit.tail).__next__
            hit.shown_ttl = math.ceil(entry.expires - now)
        if not self.refresh(hit, query, now):
            return None
        self.rows[key] = hit
        rows = self.by_key.get(q.key)
        if rows is None:
            self.by_key[q.key] = [hit]
        else:
            rows.append(hit)
        self._charge(q.key)
        return hit

    def _charge(self, cache_key: bytes) -> None:
        """Tell the cache what the rows of `cache_key` hold now."""
        rows = self.by_key.get(cache_key)
        self.source.charge(cache_key, sum(hit.cost for hit in rows) if rows else 0)

    def refresh(self, hit: FastHit, query: bytes, now: float, ran_at: float | None = None) -> bool:
        """Make `hit` current at `now` (its valid_until has passed); False: the entry expired
        or went, and the row is dropped. `ran_at`: when this runs, if before `now` (a refresh
        ahead, rendered as of just after the row's moment)."""
        if self._handed:  # the hits it served before this refresh are counted as of before
            self._count_rows()
        entry = hit.entry
        if entry.expires <= now:
            self.drop(hit)
            return False
        q = hit.q
        source = self.source
        source.touch(q.key)  # hits on rows keep their entry from looking least recently used
        prefetching = source.prefetching(q.key)
        if now >= entry.prefetch_at and not prefetching:
            source.prefetch(q, entry)
            prefetching = True
        ttl = math.ceil(entry.expires - now)
        limit = wire.udp_limit(q.edns_size)
        shaped = hit.shaped
        if shaped is None:
            if ttl != hit.shown_ttl:
                hit.tail = entry.render_with_ttl(query, q, ttl, limit)[2:]
                hit.next_tail = repeat(hit.tail).__next__
                hit.shown_ttl = ttl
            cost = ROW_OVERHEAD + len(hit.key) + TAIL_OVERHEAD + len(hit.tail)
            valid_until = entry.expires - (ttl - 1)
        else:
            self.flush_row(hit)  # counted under the action the pool had while it served them
            shaped.refresh(now)
            shown = min(shaped.answer_ttl, ttl)
            if shown != hit.shown_ttl or shaped.generation != hit.generation:
                rendered: dict[int, bytes] = {}
                tails = []
                for variant in shaped.variants:
                    tail = rendered.get(id(variant))
                    if tail is None:
                        tail = variant.render_with_ttl(query, q, shown, limit)[2:]
                        rendered[id(variant)] = tail
                    tails.append(tail)
                start = int(self.rng.random() * len(tails))
                hit.next_tail = cycle(tails[start:] + tails[:start]).__next__
                hit.tail = b""
                hit.shown_ttl = shown
                hit.generation = shaped.generation
                # The distinct tails, and three list slots per tail (the list, its rotated
                # copy and the cycle's own copy).
                cost = ROW_OVERHEAD + len(hit.key) + 24 * len(tails)
                cost += sum(TAIL_OVERHEAD + len(tail) for tail in rendered.values())
            else:
                cost = hit.cost
            # The recheck counts from when the endpoint table was read (`ran_at`), not from
            # the later `now` a refresh ahead renders as of: else the last pool drawn before
            # every endpoint died was served up to REFRESH_LEAD + TICK past SHAPED_RECHECK
            # after the death (when no ask came to refresh the row ahead again).
            checked = now if ran_at is None else ran_at
            valid_until = min(entry.expires - (shown - 1), checked + SHAPED_RECHECK)
        if not prefetching:
            valid_until = min(valid_until, entry.prefetch_at)
        hit.valid_until = valid_until
        if cost != hit.cost:
            hit.cost = cost
            if self.rows.get(hit.key) is hit:  # a new row is charged once it is in the table
                self._charge(q.key)
        hit.seen = hit.counted + hit.hits
        hit.refreshed_at = now if ran_at is None else ran_at
        if self.resting:
            self.resting.pop(hit, None)
        if self.on_due is not None:
            slot = int((valid_until - REFRESH_LEAD) / TICK)
            rows = self.due.get(slot)
            if rows is None:
                self.due[slot] = [(hit, valid_until)]
                self.on_due(slot * TICK)
            else:
                rows.append((hit, valid_until))
        return True

    def refresh_due(self, now: float, most: int = REFRESH_BATCH) -> bool:
        """Refresh ahead the rows whose bucket has come (see the module's notes): those still
        in the table, not refreshed since they were scheduled, and asked since (or refreshed
        less than REST_AFTER ago); the others rest. At most `most` refreshed (or
        RESTS_PER_REFRESH times as many set resting): True if more are due (call again soon).
        Rows cached in one burst share a bucket, and a thousand refreshes (~6 us each) in one
        go held the GIL for milliseconds while the UDP reader thread waited (the glue hands it
        over between calls)."""
        if self._handed:
            self._count_rows()  # "asked since" reads the rows' counts
        last = int(now / TICK)
        done = rested = 0
        for slot in sorted(slot for slot in self.due if slot <= last):
            rows = self.due[slot]
            while rows:
                hit, moment = rows.pop()
                if hit.valid_until == moment and self.rows.get(hit.key) is hit:
                    if hit.counted + hit.hits == hit.seen and now - hit.refreshed_at >= REST_AFTER:
                        # Not asked since its last refresh, REST_AFTER ago or more: the row
                        # rests, out of `due`, until it is asked again. Cheap (~0.3 us), but a
                        # thousand of them in one turn held the GIL for 0.35 ms: counted too.
                        rested += 1
                        resting = self.resting
                        resting[hit] = None
                        if len(resting) > RESTING_ROWS:
                            self.drop(next(iter(resting)))  # the one resting longest
                    else:
                        self.refresh(hit, b"\0\0" + hit.key, max(now, moment + AFTER), now)
                        done += 1
                    if done >= most or rested >= RESTS_PER_REFRESH * most:
                        if not rows:
                            del self.due[slot]
                        return any(slot <= last for slot in self.due)
            del self.due[slot]
        return False

    def served(self, hit: FastHit, seconds: float) -> None:
        """Count one reply from `hit` that took `seconds`; on the event loop only."""
        hit.hits += 1
        if seconds < QUICK:
            self.quick += 1
            self.quick_seconds += seconds
        else:
            self.metrics.durations["cache"].observe(seconds)

    def hand_off(self, batch: tuple[list[FastHit], float]) -> None:
        """From a reader thread: the rows a batch served (one entry per reply) and the time
        the batch took. The thread's only write here."""
        handed = self._handed
        handed.append(batch)
        # Equal, not at least: one request as the backlog passes the mark (a missed one, in a
        # race with a drain, is caught by the next refresh).
        if len(handed) == DRAIN_AT and self.on_backlog is not None:
            self.on_backlog()

    def answer_cold(
        self, query: bytes, now: float, cold: list[ColdHit], resting: FastHit | None = None
    ) -> bytes | None:
        """From a reader thread: the reply to `query` (a datagram with no current row) from
        its cache entry as it is (`RowSource.servable`), rendered with the TTL left at `now`,
        and the hit appended to `cold` for the loop to count (`hand_off_cold`); None when
        the loop must answer it (malformed, a miss, a refresh due, a pool, ...). Reads only:
        the parse and the render are pure, the lookups single dict reads."""
        if resting is not None:
            q = resting.q  # parsed from the same bytes after the ID: its key
        else:
            try:
                q = wire.parse_query(query)
            except wire.ClientError:
                return None
        entry = self.source.servable(q.key, now)
        if entry is None:
            return None
        ttl = math.ceil(entry.expires - now)
        reply = entry.render_with_ttl(query, q, ttl, wire.udp_limit(q.edns_size))
        cold.append((query, q, entry, resting))
        return reply

    def hand_off_cold(self, batch: tuple[list[ColdHit], float, float]) -> None:
        """From a reader thread: the hits a batch answered from entries, when it began and
        the time it took (one `deque.append`, as `hand_off`)."""
        handed = self._handed_cold
        handed.append(batch)
        if len(handed) == DRAIN_COLD_AT and self.on_backlog is not None:
            self.on_backlog()

    def drain(self) -> None:
        """Count the batches handed off by reader threads: each of their rows served one
        reply in the batch's time (`_count_rows`), and each hit answered from an entry is
        counted as the loop counts a hit, its entry marked used, and admitted to a row
        (`make_rows`) when its second, or when its row rests. On the event loop, before any
        count is read."""
        self._count_rows()
        handed_cold = self._handed_cold
        if not handed_cold:
            return
        metrics, source = self.metrics, self.source
        requests, hits, responses = (
            metrics.requests["udp"],
            metrics.cache_hits,
            metrics.responses["cache"],
        )
        durations, touch, admitted = metrics.durations["cache"], source.touch, self._admitted
        while handed_cold:
            cold, now, seconds = handed_cold.popleft()
            asked, before = self._generations(now)  # `admit`, for the batch's moment
            for cold_hit in cold:
                _, q, entry, row = cold_hit
                requests[q.qtype] += 1
                form = entry.form
                hits[form.negative] += 1
                responses[form.rcode] += 1
                touch(q.key)
                if entry in admitted:
                    continue  # its row is made in a coming turn
                if (
                    entry in asked
                    or entry in before
                    or (row is not None and row.entry is entry and not row.dropped)
                ):
                    admitted[entry] = cold_hit  # a second hit, or a resting row asked again
                else:
                    asked.add(entry)
            self._timed(durations, seconds, len(cold))

    def _count_rows(self) -> None:
        """Count the batches of rows handed off (all a refresh, a rest or a drop reads)."""
        handed = self._handed
        durations = self.metrics.durations["cache"]
        while handed:
            rows, seconds = handed.popleft()
            for hit in rows:
                hit.hits += 1
                if hit.dropped:
                    # Dropped after the thread read it from the table (a new row for the same
                    # bytes, a retired entry): no flush sees it any more, so it is counted now
                    # (a shaped row's late replies without their action, its pool gone). Left
                    # to wait, a burst lost a batch of 32 from requests_total.
                    self.flush_row(hit)
            self._timed(durations, seconds, len(rows))

    def make_rows(self, now: float, most: int = REFRESH_BATCH) -> bool:
        """Make (or make current again) at most `most` of the rows `drain` admitted, those
        whose entry is still the cache's and servable at `now`: True if more wait. In turns,
        as `refresh_due`: after a quiet spell every name of a burst is admitted within a few
        milliseconds, and a drain that made them all (2-5 us each) held the GIL for up to
        0.8 ms while the reader thread waited with the burst's queries (bench/NOTES.md).
        Not inside `drain`, also because making a row refreshes it, which drains first."""
        admitted = self._admitted
        servable = self.source.servable
        done = 0
        while admitted and done < most:
            query, q, entry, _ = admitted.pop(next(iter(admitted)))
            if servable(q.key, now) is entry:
                self.remember(query, q, entry, now)
                done += 1
        return bool(admitted)

    def drain_turn(self, now: float) -> bool:
        """The loop's turn after a reader thread's backlog (`on_backlog`): count it all, then
        make at most REFRESH_BATCH of the rows admitted; True if more wait. The count is not
        split: at 100,000 names asked in turn the thread refills the backlog during every
        hand-over, so turns of 8 batches ran without end, a GIL hand-over (on the sidecar's
        one CPU, a context switch) every 8 batches (bench/NOTES.md)."""
        self.drain()
        return self.make_rows(now)

    def _timed(self, durations: Histogram, seconds: float, replies: int) -> None:
        """`replies` answered in one batch that took `seconds`: each took that long."""
        if seconds < QUICK:
            self.quick += replies
            self.quick_seconds += seconds * replies
        else:
            durations.observe(seconds, replies)

    def flush_row(self, hit: FastHit) -> None:
        """Add a row's hits to the metrics (its hand-off drained first by the caller)."""
        if hit.hits:
            hit.counted += hit.hits
            self._count(hit, hit.hits)
            hit.hits = 0

    def _count(self, hit: FastHit, hits: int) -> None:
        metrics = self.metrics
        entry = hit.entry
        metrics.requests["udp"][hit.q.qtype] += hits
        metrics.cache_hits[entry.negative] += hits
        metrics.responses["cache"][entry.rcode] += hits
        if hit.shaped is not None:
            hit.shaped.count(hits)

    def flush(self) -> None:
        """Bring the metrics up to date (before a scrape)."""
        self.drain()
        for hit in list(self.rows.values()):
            self.flush_row(hit)
        self.metrics.durations["cache"].add_quick(self.quick, self.quick_seconds)
        self.quick, self.quick_seconds = 0, 0.0

    def drop(self, hit: FastHit) -> None:
        """Forget a row, counting what it served."""
        if self._handed:
            self._count_rows()
        self.flush_row(hit)
        hit.dropped = True
        if self.resting:
            self.resting.pop(hit, None)
        hit.valid_until = -math.inf  # never current again, for a thread that holds it
        if hit.shaped is not None:
            # The row may wait in `due` a while yet: let its pool and all but one of its
            # replies go now (a reader thread that read the row just before still gets a
            # reply). Kept, 64 dropped discovery rows and their pools held ~5 MB uncharged.
            hit.shaped = None
            hit.next_tail = repeat(hit.next_tail()).__next__
        if self.rows.get(hit.key) is hit:
            del self.rows[hit.key]
        cache_key = hit.q.key
        rows = self.by_key.get(cache_key)
        if rows is not None and hit in rows:
            rows.remove(hit)
            if not rows:
                del self.by_key[cache_key]
            self._charge(cache_key)

    def retire(self, cache_key: bytes) -> None:
        """The cache let the entry under `cache_key` go: its rows go too."""
        rows = self.by_key.pop(cache_key, None)
        if rows is not None:
            for hit in rows:
                self.drop(hit)

    def clear(self) -> None:
        """Forget every row (a reload, or draining)."""
        for hit in list(self.rows.values()):
            self.drop(hit)
        self.due.clear()
        self._admitted.clear()
