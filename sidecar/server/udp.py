"""The UDP listener: parse, answer hits inline, hand misses to a task.

A hit never leaves `datagram_received`: no task, no await, one send.

The fast path: a client asks the same bytes again and again (the same resolver library, the
same name, the same EDNS options); only the ID changes. So a hit is remembered by the query's
bytes after the ID, with the reply's bytes after the ID as last rendered and the TTL they
carry. The next identical query is answered with its own ID and those bytes, re-rendered only
when the TTL has moved on by a second. No parsing, no join. The remembered reply is dropped
as soon as its cache entry is dropped or replaced (`Entry.dead`), expires, or is shaped
(discovery answers are drawn per query).
"""

from __future__ import annotations

import asyncio
import logging
from math import ceil
from random import random
from time import monotonic, perf_counter
from typing import cast

from sidecar import logs
from sidecar.core import wire
from sidecar.core.access import EVERYONE, ClientFilter, RateLimiter
from sidecar.core.cache import Entry
from sidecar.metrics import Metrics
from sidecar.pipeline import Resolver

log = logging.getLogger("dns_sidecar")
FAST_PATH_SIZE = 8192  # remembered query shapes; the table is cleared when full


class FastHit:
    """One remembered (query bytes after the ID) -> (reply bytes after the ID)."""

    __slots__ = ("entry", "q", "tail", "ttl")

    def __init__(self, entry: Entry, q: wire.Query, ttl: int, tail: bytes) -> None:
        self.entry = entry
        self.q = q
        self.ttl = ttl
        self.tail = tail


class UdpListener(asyncio.DatagramProtocol):
    def __init__(
        self,
        resolver: Resolver,
        metrics: Metrics,
        max_pending: int = 4096,
        log_queries: float = 0.0,
        access: ClientFilter | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.metrics = metrics
        self.requests = metrics.requests["udp"]
        self.cache_responses = metrics.responses["cache"]
        self.cache_durations = metrics.durations["cache"]
        self.cache_hits = metrics.cache_hits
        self.max_pending = max_pending
        self.log_queries = log_queries
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: set[asyncio.Task[None]] = set()
        self.draining = False
        self.fast: dict[bytes, FastHit] = {}
        self.resolver = resolver
        self.set_access(access or ClientFilter(EVERYONE), limiter)

    def set_access(self, access: ClientFilter, limiter: RateLimiter | None) -> None:
        """Who is served, and the per-client rate limit (None: off)."""
        self.access = access
        self.limiter = limiter
        # The hot path's admission check: clients whose verdict here is True pass with one
        # dict lookup. With a rate limit every query must take a token, so nothing is True.
        self.admitted: dict[str | int, bool] = access.verdicts if limiter is None else {}

    def _admit(
        self, data: bytes, addr: tuple[str | int, ...], transport: asyncio.DatagramTransport
    ) -> bool:
        """The slow half of admission: a client not judged yet, refused, or rate limited."""
        host = addr[0]
        if not self.access.allowed(host):
            # REFUSED, not silence, so a misconfigured client learns why at once (RFC 1035:
            # "for policy reasons"); never for what would not be answered anyway.
            self.metrics.dropped["refused"] += 1
            try:
                q = wire.parse_query(data)
            except wire.ClientError:
                return False
            reply = wire.error_reply(data, q.question_end, wire.REFUSED, q.edns_size)
            transport.sendto(reply, addr)
            self.metrics.answered("local", reply, 0.0)
            return False
        if self.limiter is not None and not self.limiter.allow(str(host), monotonic()):
            self.metrics.dropped["overload"] += 1  # silence: an answer would feed the flood
            return False
        return True

    @property
    def resolver(self) -> Resolver:
        return self._resolver

    @resolver.setter
    def resolver(self, resolver: Resolver) -> None:
        self._resolver = resolver
        self.fast = {}  # a reload may change what any remembered reply would be

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport does not derive from asyncio.DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        start = perf_counter()
        transport = self.transport
        if transport is None or self.draining:
            return
        if self.admitted.get(addr[0]) is not True and not self._admit(data, addr, transport):
            return
        hit = self.fast.get(data[2:])
        if hit is not None:
            entry = hit.entry
            now = monotonic()
            if not entry.dead and entry.expires > now:
                ttl = ceil(entry.expires - now)
                if ttl != hit.ttl:
                    hit.ttl = ttl
                    hit.tail = entry.render_with_ttl(
                        data, hit.q, ttl, wire.udp_limit(hit.q.edns_size)
                    )[2:]
                transport.sendto(data[:2] + hit.tail, addr)
                q = hit.q
                self.requests[q.qtype] += 1
                self.cache_hits[entry.negative] += 1
                self.cache_responses[entry.rcode] += 1
                if now >= entry.prefetch_at and not entry.prefetching:
                    self._resolver.prefetch(q, entry)
                self.cache_durations.observe(perf_counter() - start)
                if self.log_queries:
                    self._log(addr, q, data[:2] + hit.tail, "cache", start)
                return
            del self.fast[data[2:]]
        try:
            q = wire.parse_query(data)
        except wire.ClientError as exc:
            self.metrics.dropped["malformed"] += 1
            if exc.rcode is not None:
                transport.sendto(wire.error_reply(data, exc.question_end, exc.rcode, 0), addr)
            return
        self.requests[q.qtype] += 1
        limit = wire.udp_limit(q.edns_size)
        now = monotonic()
        cached = self._resolver.cached(q, now)
        if cached is not None:
            reply = self._resolver.render(cached, data, q, now, limit)
            transport.sendto(reply, addr)
            if cached.shaped is None:
                if len(self.fast) >= FAST_PATH_SIZE:
                    self.fast.clear()
                self.fast[data[2:]] = FastHit(cached, q, ceil(cached.expires - now), reply[2:])
            self.metrics.answered("cache", reply, perf_counter() - start)
            if self.log_queries:
                self._log(addr, q, reply, "cache", start)
            return
        if len(self.pending) >= self.max_pending:
            # Bounded work: a fast SERVFAIL beats a queue that grows until the deadline passes.
            self.metrics.dropped["overload"] += 1
            reply = wire.error_reply(data, q.question_end, wire.SERVFAIL, q.edns_size)
            transport.sendto(reply, addr)
            self.metrics.answered("local", reply, perf_counter() - start)
            return
        task = asyncio.ensure_future(self._miss(data, q, limit, addr, start))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _miss(
        self, data: bytes, q: wire.Query, limit: int, addr: tuple[str | int, ...], start: float
    ) -> None:
        try:
            reply, source = await self._resolver.resolve(data, q, limit)
        except Exception:
            log.exception("query failed", extra={"fields": {"client": str(addr[0])}})
            reply = wire.error_reply(data, q.question_end, wire.SERVFAIL, q.edns_size)
            source = "local"
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)
            self.metrics.answered(source, reply, perf_counter() - start)
            if self.log_queries:
                self._log(addr, q, reply, source, start)

    def _log(
        self, addr: tuple[str | int, ...], q: wire.Query, reply: bytes, source: str, start: float
    ) -> None:
        if random() < self.log_queries:
            logs.query_line(addr[0], q.key[:-1], q.qtype, reply, source, perf_counter() - start)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors from clients that went away; nothing to do for a UDP server.
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
