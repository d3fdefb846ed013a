"""The query path, stage by stage. Both listeners call `answer` (cache hits, no await) and,
only when that returns None, `resolve` (the miss path).

Order, and why:
1. parse (wire.parse_query, done by the listener): bad input is answered or dropped before it
   costs anything else;
2. cache hit: served from stored bytes with the client's ID and question; the common case, so
   it comes before anything that allocates or awaits;
3. recent upstream failure (RFC 9520): SERVFAIL without asking again;
4. coalescing: a miss already being fetched for the same key waits for that fetch;
5. forward to the zone's upstreams under one deadline; store; render for this client.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

from sidecar.config import HostPort
from sidecar.core import wire
from sidecar.core.cache import Entry, TtlCache
from sidecar.core.routing import ZoneRouter
from sidecar.core.upstream_health import UpstreamSet
from sidecar.errors import UpstreamError
from sidecar.server.upstream import Forwarder


@dataclass
class PipelineStats:
    hits: int = 0
    misses: int = 0
    coalesced: int = 0
    servfail: int = 0


class Resolver:
    def __init__(
        self,
        cache: TtlCache,
        router: ZoneRouter[UpstreamSet[HostPort]],
        forwarder: Forwarder,
        *,
        query_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cache = cache
        self.router = router
        self.forwarder = forwarder
        self.query_timeout = query_timeout
        self.clock = clock
        self.stats = PipelineStats()
        self._inflight: dict[bytes, asyncio.Future[Entry]] = {}

    def answer(self, query: bytes, q: wire.Query, limit: int) -> bytes | None:
        """A reply from the cache, or None when the miss path must run."""
        now = self.clock()
        entry = self.cache.get(q.key, now)
        if entry is None:
            return None
        self.stats.hits += 1
        return entry.render(query, q, now, limit)

    async def resolve(self, query: bytes, q: wire.Query, limit: int) -> bytes:
        """The reply to a query the cache could not answer."""
        now = self.clock()
        entry = self.cache.get(q.key, now)
        if entry is not None:  # filled while this query waited to be scheduled
            self.stats.hits += 1
            return entry.render(query, q, now, limit)
        self.stats.misses += 1
        if self.cache.failed_recently(q.key, now):
            self.stats.servfail += 1
            return wire.error_reply(query, q.question_end, wire.SERVFAIL, q.edns_size)
        fetch = self._inflight.get(q.key)
        if fetch is None:
            fetch = asyncio.ensure_future(self._fetch(q))
            self._inflight[q.key] = fetch
            fetch.add_done_callback(functools.partial(self._fetched, q.key))
        else:
            self.stats.coalesced += 1
        try:
            entry = await asyncio.shield(fetch)
        except UpstreamError:
            self.stats.servfail += 1
            return wire.error_reply(query, q.question_end, wire.SERVFAIL, q.edns_size)
        return entry.render(query, q, self.clock(), limit)

    def _fetched(self, key: bytes, fetch: asyncio.Future[Entry]) -> None:
        del self._inflight[key]
        if not fetch.cancelled():
            fetch.exception()  # retrieved here so a fetch nobody waits for any more is quiet

    async def _fetch(self, q: wire.Query) -> Entry:
        question = q.key[:-1]  # lowercased name + qtype + qclass
        _zone, upstreams = self.router.route(question[:-4])
        loop = asyncio.get_running_loop()
        try:
            msg, reply = await self.forwarder.forward(
                question, upstreams, cd=q.cd, do=q.do, deadline=loop.time() + self.query_timeout
            )
        except UpstreamError:
            self.cache.remember_failure(q.key, self.clock())
            raise
        return self.cache.store(q.key, msg, reply, self.clock(), q.do)
