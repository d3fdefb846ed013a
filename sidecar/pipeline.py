"""The query path, stage by stage. Both listeners call `answer` (cache hits, no await) and,
only when that returns None, `resolve` (the miss path).

Order, and why:
0. admission (done by the listener, core/access.py): a client outside `allow` is refused and
   one over its rate limit dropped before anything else, the cache included;
1. parse (wire.parse_query, done by the listener): bad input is answered or dropped before it
   costs anything else;
2. cache hit: served from stored bytes with the client's ID and question; the common case, so
   it comes before anything that allocates or awaits. A hit late in its TTL also starts one
   background refresh (prefetch), so popular names never miss;
3. local answers: CHAOS-class questions (id.server, version.bind) never leave the sidecar;
   zone transfers (AXFR, IXFR) get REFUSED, we are no zone server; ANY gets RFC 8482's minimal
   answer (one HINFO "RFC8482" record), so it is no amplifier and costs the upstream nothing;
   loop probe: a question we sent upstream ourselves to detect a forwarding loop came back;
4. recent upstream failure (RFC 9520): a stale answer if there is one, else SERVFAIL, without
   asking again;
5. coalescing: a miss already being fetched for the same key waits for that fetch; beyond
   `max_inflight` distinct fetches, stale or SERVFAIL at once (bounded work);
6. forward to the zone's upstreams under one deadline (the decisions are core/forwarding.py's,
   carried out by forwarder.py over its transport); store (the cache, and in a discovery zone
   the shaper's pool, elsewhere the rotator's); render for this client. With a stale entry
   the client waits at most `stale_answer_after` (RFC 8767), and gets the stale answer when
   the upstreams fail.

The resolver owns the fetches in flight and the memory of prefetches started; it passes the
cache's retirement hook on to everything kept by cache key (fast-path rows, shaped and rotated
pools, that memory), each of which charges its bytes to the key in the cache. Time is its
clock, the one the forwarder and the listeners read too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import os
import random
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, NamedTuple

from sidecar.addresses import HostPort
from sidecar.collector import untrack
from sidecar.core import wire
from sidecar.core.cache import Entry, TtlCache
from sidecar.core.counters import Counters, Snapshot
from sidecar.core.fast_path import FAST_PATH_ROWS, FastPath
from sidecar.core.rotation import RotatedAnswer, Rotator
from sidecar.core.routing import ZoneRouter, name_to_wire, wire_to_name
from sidecar.core.upstream_health import UpstreamSet
from sidecar.errors import PacketBudgetSpent, UpstreamError
from sidecar.forwarder import Forwarded, Forwarder
from sidecar.local_answers import is_local, local_reply

if TYPE_CHECKING:  # imported at run time only with a discovery zone (see Resolver.__init__)
    from sidecar.discovery.endpoints import EndpointTable
    from sidecar.discovery.pools import Shaper
    from sidecar.discovery.shaping import ShapedAnswer
    from sidecar.discovery.srv_shaping import ShapedSrv
    from sidecar.discovery.zone import DiscoveryZone

TYPE_SRV_BYTES = wire.TYPE_SRV.to_bytes(2, "big")
# Question types answered here, never forwarded: zone transfers (REFUSED) and ANY (RFC 8482).
NOT_FORWARDED = wire.ZONE_TRANSFERS | {wire.TYPE_ANY}
log = logging.getLogger("dns_sidecar")

# The answer to one client's query: (reply, source), where source is a metrics label (cache,
# upstream, stale or local). Called once per query, now or when its fetch ends.
Deliver = Callable[[bytes, str], None]
# What a fetch tells each party waiting on it when it ends: the entry, or the error.
Fetched = Callable[["Entry | None", "BaseException | None"], None]


class Fetch(Forwarded):
    """One question forwarded for a cache key (the forwarder's `Forwarded`: one object for
    the question's decisions, its exchanges and this), and who waits on it: plain data, no
    future (a miss crossed four future hops before, each a loop iteration)."""

    __slots__ = ("clients", "ended", "q", "resolver", "route", "waiters")

    def __init__(
        self,
        resolver: Resolver,
        q: wire.Query,
        route: str,
        upstreams: UpstreamSet[HostPort],
        background: bool,
    ) -> None:
        deadline = resolver.clock() + resolver.query_timeout
        question = q.key[:-1]  # lowercased name + qtype + qclass
        Forwarded.__init__(  # positional: one per miss
            self, resolver.forwarder, upstreams, question, q.cd, q.do, deadline, background
        )
        self.resolver = resolver
        self.q = q
        self.route = route  # the zone it was routed by
        self.waiters: list[Fetched] = []
        # Client queries with no stale answer to fall back on, answered when the fetch ends
        # (the common waiter, as plain data: no object or callback each).
        self.clients: list[tuple[bytes, wire.Query, int, Deliver]] = []
        self.ended: tuple[Entry | None, BaseException | None] | None = None

    def settled(
        self, outcome: tuple[bytes, wire.Reply] | None, error: BaseException | None
    ) -> None:
        self.resolver.fetched(self, outcome, error)

    def end(self, entry: Entry | None, error: BaseException | None) -> None:
        """Tell every party waiting how the fetch ended; one failing does not stop the rest.
        A bug (neither an entry nor an UpstreamError) is logged once here."""
        if error is not None and not isinstance(error, UpstreamError):
            log.error("fetch failed", exc_info=error)
        self.ended = (entry, error)
        clients, self.clients = self.clients, []
        answer = self.resolver.answer_fetched
        for query, q, limit, deliver in clients:
            try:
                deliver(*answer(query, q, limit, None, entry, error))
            except Exception:
                log.exception("answering a fetched query failed")
        waiters, self.waiters = self.waiters, []
        for fetched in waiters:
            try:
                fetched(entry, error)
            except Exception:
                log.exception("answering a fetched query failed")

    def wait(self, fetched: Fetched) -> None:
        """Have `fetched(entry, error)` called when the fetch ends (now, if it has: a
        question with no attempt possible ends within the call that starts it)."""
        if self.ended is not None:
            fetched(*self.ended)
        else:
            self.waiters.append(fetched)


class _Waiter:
    """One client query waiting on a fetch with a stale entry to fall back on (one without
    is plain data in `Fetch.clients`), also on a timer that gives it the stale answer after
    stale_answer_after (RFC 8767), whichever comes first; or on a fetch that has ended."""

    __slots__ = ("deliver", "limit", "q", "query", "resolver", "stale", "timer")

    def __init__(
        self,
        resolver: Resolver,
        query: bytes,
        q: wire.Query,
        limit: int,
        deliver: Deliver,
        stale: Entry | None,
    ) -> None:
        self.resolver = resolver
        self.query = query
        self.q = q
        self.limit = limit
        self.deliver: Deliver | None = deliver
        self.stale = stale
        self.timer: asyncio.TimerHandle | None = None

    def fetched(self, entry: Entry | None, error: BaseException | None) -> None:
        deliver = self.deliver
        if deliver is None:
            return  # answered stale already
        self.deliver = None
        if self.timer is not None:
            self.timer.cancel()
        answer = self.resolver.answer_fetched
        deliver(*answer(self.query, self.q, self.limit, self.stale, entry, error))

    def stale_due(self) -> None:
        deliver = self.deliver
        if deliver is None:
            return
        self.deliver = None
        resolver = self.resolver  # with a stale entry there is no SERVFAIL, so no EDE
        deliver(
            *resolver._stale_or_servfail(
                self.query, self.q, self.stale, self.limit, "upstream", None
            )
        )


# What a RegistryBase keeps beside its upstream reply's bytes, charged to its entry: the tuple,
# its query (tuple and key), the service name, the dict slot and the reply's object header
# (tracemalloc, CPython 3.11; tests/test_pipeline.py checks it).
REGISTRY_BASE_BYTES = 360


class RegistryBase(NamedTuple):
    """What an answer made from the registry was made of, to make it again when the
    registry changes (Resolver.registry_changed)."""

    q: wire.Query
    route: str
    msg: bytes  # the upstream's reply
    zone: str
    service: str


def labels_below(wire_name: bytes, zone: str) -> list[str]:
    """The labels of a wire name below `zone`: b'\\x04task\\x0fresource-server\\x05local\\x00'
    in zone `local` -> ['task', 'resource-server']. The last is the service a name is asked
    under; a service's own name has that one label only."""
    labels = wire_to_name(wire_name).rstrip(".").split(".")
    depth = 0 if zone == "." else zone.count(".") + 1
    return labels[: max(len(labels) - depth, 0)]


# RFC 8914 4.1. No code says "rate limited"; Not Ready (14) would send an operator looking
# for a start-up problem, so a spent packet budget is Other.
EDE_OTHER = 0


def failure_ede(exc: Exception) -> int:
    """The Extended DNS Error of a SERVFAIL after a failed fetch: every attempt timed out, no
    reachable authority (22); the upstream packet budget spent, other (0); anything else the
    upstreams did or sent, network error (23)."""
    if isinstance(exc, PacketBudgetSpent):
        return EDE_OTHER
    timed_out_only = exc.timed_out_only if isinstance(exc, UpstreamError) else True
    return wire.EDE_NO_REACHABLE_AUTHORITY if timed_out_only else wire.EDE_NETWORK_ERROR


class Resolver:
    def __init__(
        self,
        cache: TtlCache,
        router: ZoneRouter[UpstreamSet[HostPort]],
        forwarder: Forwarder,
        metrics: Counters,
        *,
        query_timeout: float,
        max_inflight: int = 1000,
        stale_answer_after: float = 1.8,
        stale_ttl: int = 30,
        discovery: ZoneRouter[DiscoveryZone | None] | None = None,
        endpoints: EndpointTable | None = None,
        shaper: Shaper | None = None,
        rotate: ZoneRouter[bool] | None = None,
        rotator: Rotator | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.cache = cache
        self.router = router
        self.forwarder = forwarder
        self.query_timeout = query_timeout
        self.max_inflight = max_inflight
        self.stale_answer_after = stale_answer_after
        self.stale_ttl = stale_ttl
        self.clock = clock
        self.discovery: ZoneRouter[DiscoveryZone | None] = discovery or ZoneRouter(None, {})
        self.rng = rng or random.Random()
        if shaper is None and any(zone for _name, zone in self.discovery.targets()):
            # The discovery modules load here, with the first discovery zone: a resolver
            # without one holds neither the endpoint table nor the shaper (Config.discovery_zones).
            from sidecar.discovery.endpoints import EndpointTable
            from sidecar.discovery.pools import Shaper

            if endpoints is None:
                endpoints = EndpointTable()
            shaper = Shaper(endpoints, self.rng, metrics.answers_shaped, cache.charge)
        # The endpoints behind discovery answers (kept across any reload), and the shaped
        # pools of those answers by cache key (kept across a reload with the cache): both
        # None without a discovery zone.
        self.endpoints: EndpointTable | None = endpoints
        self.shaper: Shaper | None = shaper
        self._shaped_pools: Mapping[bytes, object] = {} if shaper is None else shaper.pools
        # Whether a zone's address answers are rotated (answer_order); their pools by cache
        # key, kept across a reload with the cache. Discovery zones keep the shaper's order.
        self.rotate: ZoneRouter[bool] = rotate or ZoneRouter(True, {})
        self.rotator = rotator or Rotator(self.rng, cache.charge)
        self.metrics = metrics
        # Cache hits remembered as finished replies, for the UDP listeners (core/fast_path.py).
        self.fast = FastPath(metrics, self, min(cache.limits.max_entries, FAST_PATH_ROWS), self.rng)
        # Keys whose current entry's background refresh has been started (once per entry).
        self._prefetched: set[bytes] = set()
        # Cache keys whose entry was made from a Cloud Map listing: what it was made of.
        self._registry_bases: dict[bytes, RegistryBase] = {}
        cache.on_retire = self._retired
        self.touch = cache.touch  # RowSource.touch: a hit on a row or a thread's cold hit
        self._peek = cache.peek
        self._inflight: dict[bytes, Fetch] = {}
        # Forwarding-loop probes (see new_loop_probe): their names start with one label that
        # carries a token shared by every worker of this sidecar, and the probe's number.
        self.loop_paths: list[str] = []
        self.loops_seen: list[str] = []
        self.on_loop: Callable[[str], None] | None = None  # told of every loop probe seen
        self.set_loop_token(os.urandom(6).hex())

    def _retired(self, key: bytes) -> None:
        """The cache let the entry under `key` go: so does everything kept about it."""
        self.fast.retire(key)
        if self.shaper is not None:
            self.shaper.retire(key)
        self.rotator.retire(key)
        self._prefetched.discard(key)
        self._registry_bases.pop(key, None)

    def snapshot(self) -> Snapshot:
        """The gauges, read from their owners; the fast path's counts flushed first."""
        self.fast.flush()
        cache = self.cache
        return Snapshot(
            cache_entries=(len(cache) - cache.negative_entries, cache.negative_entries),
            upstream_health=[
                (str(server), upstreams.healthy(server))
                for _zone, upstreams in self.router.targets()
                for server in upstreams.upstreams
            ],
            endpoints=[]
            if self.endpoints is None
            else [
                (e.zone, e.name, e.healthy, e.latency)
                for e in list(self.endpoints.endpoints.values())
            ],
            registry_ages=[
                (zone_name, service, age)
                for zone_name, zone in self.discovery.targets()
                if zone is not None and zone.registry is not None
                for service, age in zone.registry.ages(self.clock())
            ],
        )

    def prefetching(self, key: bytes) -> bool:
        return key in self._prefetched

    def shaped(self, key: bytes, entry: Entry) -> ShapedAnswer | ShapedSrv | RotatedAnswer | None:
        """The pool served instead of `entry`: shaped (discovery zones) or rotated."""
        shaped = None if self.shaper is None else self.shaper.of(key, entry)
        return shaped or self.rotator.of(key, entry)

    def servable(self, key: bytes, now: float) -> Entry | None:
        """The entry under `key` if a UDP reader thread may answer from it as it is: fresh,
        no refresh to start, no shaped or rotated pool standing in for it. Reads only (dict
        lookups and slot loads), safe from the thread."""
        entry = self._peek(key)
        if (
            entry is None
            or entry.expires <= now
            or entry.form.discovery
            or (now >= entry.prefetch_at and key not in self._prefetched)
            or key in self.rotator.pools
        ):
            return None
        return entry

    def charge(self, key: bytes, nbytes: int) -> None:
        self.cache.charge(key, "rows", nbytes)

    def answer(self, query: bytes, q: wire.Query, limit: int) -> bytes | None:
        """A reply from the cache, or None when the miss path must run."""
        now = self.clock()
        entry = self.cached(q, now)
        if entry is None:
            return None
        return self.render(entry, query, q, now, limit)

    def cached(self, q: wire.Query, now: float) -> Entry | None:
        """The fresh entry for a query, counted as a hit, prefetched when due; or None."""
        entry = self.cache.get(q.key, now)
        if entry is None:
            return None
        self.metrics.cache_hits[entry.form.negative] += 1
        if now >= entry.prefetch_at and q.key not in self._prefetched:
            self.prefetch(q, entry)
        return entry

    def prefetch(self, q: wire.Query, entry: Entry) -> None:
        """Refresh `entry` in the background; once per entry (the refresh replaces it)."""
        self._prefetched.add(q.key)
        if q.key in self._inflight or len(self._inflight) >= self.max_inflight:
            return
        self.metrics.prefetches += 1
        self._start_fetch(q, background=True)  # no waiter: the forwarder's callbacks hold it

    async def resolve(self, query: bytes, q: wire.Query, limit: int) -> tuple[bytes, str]:
        """The reply to a query the cache could not answer, and where it came from (`miss`,
        awaited: the TCP listener's way). Cancelled, it leaves the fetch to the others."""
        now = self.clock()
        entry = self.cache.get(q.key, now)
        if entry is not None:  # filled while this query waited to be scheduled
            self.metrics.cache_hits[entry.form.negative] += 1
            return self.render(entry, query, q, now, limit), "cache"
        done: asyncio.Future[tuple[bytes, str]] = asyncio.get_running_loop().create_future()

        def deliver(reply: bytes, source: str) -> None:
            if not done.done():
                done.set_result((reply, source))

        self.miss(query, q, limit, deliver)
        return await done

    def miss(self, query: bytes, q: wire.Query, limit: int, deliver: Deliver) -> None:
        """Answer a query the cache has just not answered (`cached` returned None, no await
        between): `deliver(reply, source)` once, now (local answers, a recent failure, over
        the bound) or when the fetch it waits on ends."""
        now = self.clock()
        if is_local(q.key):
            deliver(local_reply(query, q), "local")
            return
        if q.qtype in NOT_FORWARDED:
            if q.qtype == wire.TYPE_ANY:  # RFC 8482: a minimal answer, never forwarded
                deliver(wire.any_reply(query, q), "local")
            else:  # a zone transfer: we are no zone server; never forwarded
                self.metrics.dropped["refused"] += 1
                deliver(wire.rcode_reply(query, q, wire.REFUSED), "local")
            return
        self.metrics.cache_misses += 1
        if q.key.startswith(self._loop_prefix):
            path = self._loop_path(q.key)
            self.loops_seen.append(path)
            if self.on_loop is not None:
                self.on_loop(path)
            deliver(wire.rcode_reply(query, q, wire.REFUSED), "local")
            return
        stale = self.cache.get_stale(q.key, now)
        if self.cache.failed_recently(q.key, now):  # no error at hand: no authority reached
            ede = wire.EDE_NO_REACHABLE_AUTHORITY
            deliver(*self._stale_or_servfail(query, q, stale, limit, "cache", ede))
            return
        fetch = self._inflight.get(q.key)
        if fetch is not None:
            self.metrics.coalesced += 1
        elif len(self._inflight) >= self.max_inflight:
            self.metrics.dropped["overload"] += 1
            deliver(*self._stale_or_servfail(query, q, stale, limit, "local", None))
            return
        else:
            fetch = self._start_fetch(q)
        if stale is None and fetch.ended is None:  # the common waiter: plain data (Fetch.end)
            fetch.clients.append((query, q, limit, deliver))
            return
        waiter = _Waiter(self, query, q, limit, deliver, stale)
        fetch.wait(waiter.fetched)
        if stale is not None and waiter.deliver is not None:
            loop = asyncio.get_running_loop()
            waiter.timer = loop.call_later(self.stale_answer_after, waiter.stale_due)

    def answer_fetched(
        self,
        query: bytes,
        q: wire.Query,
        limit: int,
        stale: Entry | None,
        entry: Entry | None,
        error: BaseException | None,
    ) -> tuple[bytes, str]:
        """A waiting query's answer once its fetch ended: the entry, rendered for it; after
        any kind of upstream failure, one rule: stale or SERVFAIL; after a bug, SERVFAIL."""
        if entry is not None:
            return self.render(entry, query, q, self.clock(), limit), "upstream"
        if isinstance(error, UpstreamError):
            return self._stale_or_servfail(query, q, stale, limit, "upstream", failure_ede(error))
        return wire.rcode_reply(query, q, wire.SERVFAIL), "local"  # a bug, logged by Fetch.end

    def _stale_or_servfail(
        self,
        query: bytes,
        q: wire.Query,
        stale: Entry | None,
        limit: int,
        source: str,
        ede: int | None,
    ) -> tuple[bytes, str]:
        """The stale entry if there is one, else SERVFAIL carrying `ede` (EDNS clients)."""
        if stale is not None:
            self.metrics.served_stale += 1
            shaped = self.shaped(q.key, stale)  # a discovery or rotated answer's pool
            if shaped is not None:
                now = self.clock()
                return shaped.render(query, q, now, limit, self.stale_ttl, stale=True), "stale"
            return stale.render_with_ttl(query, q, self.stale_ttl, limit, stale=True), "stale"
        servfail = wire.rcode_reply(query, q, wire.SERVFAIL, ede)
        return servfail, source

    def render(self, entry: Entry, query: bytes, q: wire.Query, now: float, limit: int) -> bytes:
        """`entry` as a reply to `query`: from its shaped or rotated pool if it has one (an
        answer the cache keeps under q.key)."""
        key = q.key
        ttl = math.ceil(entry.expires - now)
        if key in self._shaped_pools or key in self.rotator.pools:  # (`shaped`, its owners')
            shaped = self.shaped(key, entry)
            if shaped is not None:
                return shaped.render(query, q, now, limit, ttl)
        return entry.render_with_ttl(query, q, ttl, limit)

    def _start_fetch(self, q: wire.Query, *, background: bool = False) -> Fetch:
        """Forward `q` to its zone's upstreams; the fetch, whose waiters are called once the
        entry is stored or the question failed. No task: the forwarder tells `fetched` when
        the question ends. `background`: a prefetch."""
        route, upstreams = self.router.route(q.key[:-5])
        fetch = Fetch(self, q, route, upstreams, background)
        self._inflight[q.key] = fetch
        self.forwarder.start(fetch)
        return fetch

    def fetched(
        self,
        fetch: Fetch,
        outcome: tuple[bytes, wire.Reply] | None,
        error: BaseException | None,
    ) -> None:
        """The upstreams answered `fetch` or failed: store, and tell its waiters."""
        q = fetch.q
        del self._inflight[q.key]
        try:
            if outcome is None:
                raise error or UpstreamError("no outcome")
            msg, reply = outcome
            route = fetch.route
            zone_name, zone = ".", None
            if self.shaper is not None:  # made with the first discovery zone: look it up
                zone_name, zone = self.discovery.route(q.key[:-5])
            if zone is None:  # rotated if its zone's answer_order says so
                entry = self._store(q, route, msg, reply, self.clock(), ".", None, None)
            elif zone.synthesize_a and self._synthesize_address(
                q, route, fetch, msg, reply, zone_name, zone
            ):
                return
            else:
                entry = self._fetch(q, route, msg, reply, zone_name, zone)
        except UpstreamError as exc:
            # A spent packet budget asked no upstream: nothing to remember about the name, and
            # its next miss may find a token (the denial itself costs the upstream nothing).
            if not isinstance(exc, PacketBudgetSpent):
                self.cache.remember_failure(q.key, self.clock())
            fetch.end(None, exc)
        except Exception as exc:  # a bug: each waiter answers SERVFAIL, logged once
            fetch.end(None, exc)
        else:
            fetch.end(entry, None)

    def _synthesize_address(
        self,
        q: wire.Query,
        route: str,
        fetch: Fetch,
        msg: bytes,
        reply: wire.Reply,
        zone_name: str,
        zone: DiscoveryZone,
    ) -> bool:
        """`synthesize_a` (`zone` has it): an A/AAAA question of a discovery zone that the
        upstream answered with no record (NODATA) gets the live SRV targets' addresses of the
        same name instead, from the SRV answer cached or fetched now; without any, the NODATA
        as it came. True when this settles `fetch` (now or once the SRV answer comes)."""
        name = q.key[:-5]
        if q.qtype not in wire.ADDRESS_TYPES or reply.rcode != wire.NOERROR:
            return False
        if any(record.section == 0 for record in reply.records):
            return False
        srv_key = name + TYPE_SRV_BYTES + q.key[-3:]

        def finish(srv_entry: Entry | None, _error: BaseException | None = None) -> None:
            try:
                made_msg, made_reply = self._address_reply(q, msg, reply, srv_key, srv_entry) or (
                    msg,
                    reply,
                )
                entry = self._fetch(q, route, made_msg, made_reply, zone_name, zone)
            except Exception as exc:  # a bug: each waiter answers SERVFAIL
                fetch.end(None, exc)
            else:
                fetch.end(entry, None)

        srv_entry = self.cache.get(srv_key, self.clock())
        if srv_entry is not None:
            finish(srv_entry)
            return True
        srv_fetch = self._inflight.get(srv_key) or self._start_fetch(
            wire.Query(srv_key, 0, wire.TYPE_SRV, 0, q.do, q.cd)
        )
        srv_fetch.wait(finish)
        return True

    def _address_reply(
        self, q: wire.Query, msg: bytes, reply: wire.Reply, srv_key: bytes, srv: Entry | None
    ) -> tuple[bytes, wire.Reply] | None:
        """The upstream's NODATA reply `msg` with the live SRV targets' addresses as its
        answer (TTL: the SRV answer's), or None when there are none."""
        if srv is None or self.shaper is None:
            return None
        now = self.clock()
        addresses = self.shaper.srv_addresses(srv_key, srv, q.qtype == wire.TYPE_AAAA, now)
        if not addresses:
            return None
        ttl = max(1, math.ceil(srv.expires - now))
        records = [
            wire.address_record(q.qtype, ttl, ipaddress.ip_address(a).packed) for a in addresses
        ]
        made = wire.made_reply(msg, reply, records)
        return made, wire.parse_reply(made)

    def _fetch(
        self,
        q: wire.Query,
        route: str,
        msg: bytes,
        reply: wire.Reply,
        zone_name: str,
        zone: DiscoveryZone,
    ) -> Entry:
        """Store an upstream reply of discovery zone `zone` (shaped, or made from its Cloud
        Map listing); the entry."""
        service = None
        if zone.asked is not None or zone.registry is not None:  # Cloud Map
            labels = labels_below(q.key[:-5], zone_name)
            if zone.asked is not None:
                zone.asked(labels[-1] if labels else "")
            service = labels[0] if len(labels) == 1 and labels[0] else None  # not an instance
        return self._store(q, route, msg, reply, self.clock(), zone_name, zone, service)

    def _store(
        self,
        q: wire.Query,
        route: str,
        msg: bytes,
        reply: wire.Reply,
        now: float,
        zone_name: str,
        zone: DiscoveryZone | None,
        service: str | None,
        registry_ttl: int | None = None,
    ) -> Entry:
        """Cache an upstream reply, made from the service's Cloud Map listing instead where
        the discovery zone has a registry (`registry_ttl`: the TTL of an answer standing in
        for a negative one, by default the zone's answer_ttl), and prepare its shaped or
        rotated pool."""
        base = None
        if zone is not None and zone.registry is not None and service is not None:
            base = RegistryBase(q, route, msg, zone_name, service)
            ttl = zone.shaping.answer_ttl if registry_ttl is None else registry_ttl
            msg, reply = self._from_registry(base, zone, reply, now, ttl)
        max_negative = None if zone is None else zone.negative_ttl
        entry = self.cache.store(
            q.key, msg, reply, now, q.do, name_to_wire(route), max_negative, zone is not None
        )
        if entry.ttl > 0:  # cached
            untrack(entry)
            if base is not None:
                self._registry_bases[q.key] = base
                self.cache.charge(q.key, "registry", REGISTRY_BASE_BYTES + len(base.msg))
            if zone is not None:
                assert self.shaper is not None  # made with the first discovery zone
                self.shaper.shape(q.key, entry, msg, reply, zone_name, q.do, zone.shaping, now)
            elif msg[6:8] >= b"\x00\x02" and self.rotate.route(q.key[:-5])[1]:  # 2+ answers
                self.rotator.rotate(q.key, entry, msg, reply, q.do, now)
        return entry

    def _from_registry(
        self,
        base: RegistryBase,
        zone: DiscoveryZone,
        reply: wire.Reply,
        now: float,
        negative_ttl: int,
    ) -> tuple[bytes, wire.Reply]:
        """The upstream reply `base.msg`, or the answer made from the service's Cloud Map
        listing instead (discovery/registry.py); counted. The addresses the registry added
        are held out of answers until their first probe."""
        from sidecar.discovery.registry import registry_reply  # loaded with the zone's registry

        assert zone.registry is not None and self.endpoints is not None
        listing = zone.registry.listing(base.service, now)
        name = base.q.key[:-5]
        made = registry_reply(base.msg, reply, base.q.qtype, name, listing, negative_ttl)
        if made is None:
            return base.msg, reply
        key = (base.zone, made.kind)
        self.metrics.registry_answers[key] = self.metrics.registry_answers.get(key, 0) + 1
        for address, port in made.added:
            self.endpoints.seen(base.zone, (address,), now, port, held=True)
        return made.msg, wire.parse_reply(made.msg)

    def registry_changed(self, zone_name: str, service: str) -> None:
        """Cloud Map listed other instances for `service`: every answer cached for it that
        was made from the registry is made again from the new listing, with the TTL it has
        left (no upstream asked)."""
        zone = self.discovery.route(name_to_wire(zone_name))[1]
        if zone is None:
            return
        now = self.clock()
        for key, base in list(self._registry_bases.items()):
            if (base.zone, base.service) != (zone_name, service):
                continue
            entry = self.cache.get(key, now)
            if entry is None:
                continue
            left = max(1, math.ceil(entry.expires - now))
            msg = wire.cap_ttls(base.msg, wire.parse_reply(base.msg), left)
            ttl = min(left, zone.shaping.answer_ttl)
            reply = wire.parse_reply(msg)
            self._store(base.q, base.route, msg, reply, now, zone_name, zone, base.service, ttl)

    def set_loop_token(self, token: str) -> None:
        self.loop_token = token
        label = f"loop-check-{token}-0000"
        self._loop_prefix = bytes((len(label),)) + label[:-4].encode()

    def _loop_path(self, key: bytes) -> str:
        start = len(self._loop_prefix)
        number = key[start : start + 4]
        index = int(number) if number.isdigit() else -1
        return self.loop_paths[index] if 0 <= index < len(self.loop_paths) else "unknown"

    def loop_probes(self) -> list[tuple[HostPort, bytes]]:
        """One question per (zone, upstream), below the zone, that no one else asks; if one
        reaches us (any worker of this sidecar), that upstream sends our queries back to us.
        Numbered in router order, so every worker can name the path of any probe."""
        probes = []
        self.loop_paths = []
        for zone, upstreams in self.router.targets():
            for upstream in upstreams.upstreams:
                label = f"loop-check-{self.loop_token}-{len(self.loop_paths):04d}"
                self.loop_paths.append(f"zone {zone} via upstream {upstream}")
                name = label if zone == "." else f"{label}.{zone}"
                probes.append((upstream, name_to_wire(name) + b"\x00\x01\x00\x01"))  # A, IN
        return probes
