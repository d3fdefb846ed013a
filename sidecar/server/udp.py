"""The UDP listener: parse, answer hits inline, hand misses to a task.

A hit never leaves `datagram_received`: no task, no await, one send. A query asked before is
answered from the resolver's fast-path table (core/fast_path.py): the bytes after the ID are
the key, the reply's bytes after the ID the value, valid until one moment. That path is the
whole of `datagram_received`; everything else (admission when an allow list or rate limit is
configured, parsing, the cache, refreshing a row, the miss path) is `_received`, which gives
back a row made current for `datagram_received` to answer. With a reader thread
(server/udp_thread.py) the thread answers rows in batches (server/datagram_batch.py) and the
loop runs `datagram_received` while the socket is lent to it.

Time is the resolver's clock (monotonic seconds), read once per datagram at its arrival and
once after its reply; durations come from the same clock (time.monotonic has nanosecond
resolution on Linux, as perf_counter).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial
from random import random
from typing import cast

from sidecar import logs
from sidecar.core import wire
from sidecar.core.access import EVERYONE, ClientFilter, RateLimiter
from sidecar.core.counters import Counters
from sidecar.core.fast_path import FastHit
from sidecar.pipeline import Resolver
from sidecar.server.datagram_batch import Address
from sidecar.server.udp_thread import Receiver, UdpReaderThread

log = logging.getLogger("dns_sidecar")

# Everything but a current row: gives back the row to answer, made current (refreshed,
# or looked up once the client was admitted), or None when it dealt with the datagram.
SlowPath = Callable[[bytes, Address, FastHit | None, float], FastHit | None]


def _no_row(_key: bytes) -> None:
    """The hot path's lookup while every query must reach _received (draining, query
    logging, a rate limit): never a row."""
    return None


def _hot_path(
    clock: Callable[[], float],
    fast_get: Callable[[bytes], FastHit | None],
    admitted_get: Callable[[str | int], bool | None] | None,
    sendto: Receiver,
    served: Callable[[FastHit, float], None],
    received: SlowPath,
) -> Receiver:
    """The loop's `datagram_received` (uvloop's transport, or a reader thread's lent socket):
    a closure over what it uses, so a hit reads no attribute of the listener (uvloop looks
    the method up per datagram; an instance attribute holding this function saves making a
    bound method too). With an allow list, a client judged allowed before passes with one
    dict lookup (`admitted_get`). Bound again whenever one of its parts changes (transport,
    resolver, draining, access). The one place on the loop that answers from a row."""

    def datagram_received(data: bytes, addr: Address) -> None:
        now = clock()
        hit = fast_get(data[2:])
        if (
            hit is None
            or now >= hit.valid_until
            or (admitted_get is not None and admitted_get(addr[0]) is not True)
        ):
            hit = received(data, addr, hit, now)
            if hit is None:
                return
        sendto(data[:2] + (hit.tail or hit.next_tail()), addr)
        served(hit, clock() - now)

    return datagram_received


class UdpListener(asyncio.DatagramProtocol):
    """One UDP socket's queries. The app sets it up through `configure` (at start and at
    every reload) and `drain`; `pending` are the misses in flight."""

    datagram_received: Receiver  # type: ignore[assignment]  # a closure; see _hot_path

    def __init__(
        self,
        resolver: Resolver,
        metrics: Counters,
        max_pending: int = 4096,
        log_queries: float = 0.0,
        access: ClientFilter | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.metrics = metrics
        self.requests = metrics.requests["udp"]
        self.log_queries = log_queries
        self.transport: asyncio.DatagramTransport | UdpReaderThread | None = None
        self.sendto: Receiver = self._not_connected  # the loop's sends
        self.reader: UdpReaderThread | None = None  # the thread reading the socket, if any
        self.in_flight = 0  # misses waiting for their answer
        self._settled: asyncio.Future[None] | None = None  # set when in_flight drops to 0
        self._draining = False
        self.configure(
            resolver,
            access=access or ClientFilter(EVERYONE),
            limiter=limiter,
            max_pending=max_pending,
        )

    @staticmethod
    def _not_connected(data: bytes, addr: Address) -> None:
        pass

    def configure(
        self,
        resolver: Resolver,
        *,
        access: ClientFilter,
        limiter: RateLimiter | None,
        max_pending: int,
    ) -> None:
        """Serve from `resolver` (its fast path and its clock) the clients `access` allows,
        with a per-client rate limit (`limiter`, None: off) and at most `max_pending` misses
        in flight. Rebinds the hot paths: the next datagram (or batch) sees all of it."""
        self._resolver = resolver
        self.fast = resolver.fast
        self._clock = resolver.clock
        self.access = access
        self.limiter = limiter
        self.max_pending = max_pending
        # The admission check: clients whose verdict here is True pass with one dict lookup.
        # With a rate limit every query must take a token, so nothing is True.
        self.admitted: dict[str | int, bool] = access.verdicts if limiter is None else {}
        self.guarded = limiter is not None or not access.allows_everyone
        self._bind_fast_path()

    def drain(self) -> None:
        """Answer nothing new from now on (the misses in flight are still answered)."""
        self._draining = True
        self._bind_fast_path()

    @property
    def resolver(self) -> Resolver:
        return self._resolver

    def settled(self) -> asyncio.Future[None]:
        """Done once no miss is in flight (now, or when the last one is answered)."""
        settled = self._settled
        if settled is None or settled.done():
            settled = self._settled = asyncio.get_running_loop().create_future()
        if not self.in_flight:
            settled.set_result(None)
        return settled

    def _bind_fast_path(self) -> None:
        # Draining or logging every query: every query goes through _received. A rate limit
        # takes a token per query, so there too; an allow list alone costs one dict lookup.
        off = self._draining or self.log_queries > 0 or self.limiter is not None
        fast = self.fast
        fast_get = _no_row if off else fast.get
        admitted_get = self.admitted.get if self.guarded else None
        clock = self._clock
        self.datagram_received = _hot_path(
            clock, fast_get, admitted_get, self.sendto, fast.served, self._received
        )
        reader = self.reader
        if reader is not None:
            # In the reader thread: batches; the slow path lends the socket to the loop.
            reader.serve = reader.batch.server(
                fast_get,
                admitted_get,
                fast.hand_off,
                partial(reader.lend, self._received_batch),
                clock,
                None if off else fast.answer_cold,
                fast.hand_off_cold,
            )
            reader.loop_receive = _hot_path(
                clock, fast_get, admitted_get, self.sendto, fast.served, self._received
            )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport does not derive from asyncio.DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.sendto = self.transport.sendto
        self._bind_fast_path()

    def read_in_thread(self, reader: UdpReaderThread, loop: asyncio.AbstractEventLoop) -> None:
        """Serve the socket of `reader` (server/udp_thread.py): its thread answers current
        fast-path rows and lends the socket to `loop` for everything else."""
        self.transport = self.reader = reader
        self.sendto = reader.sendto
        self._bind_fast_path()
        reader.start(loop)

    def _received_batch(self, datagrams: list[tuple[bytes, Address]]) -> None:
        """The datagrams of a reader thread's batch that it could not answer, on the loop
        (before it reads the lent socket itself)."""
        receive = self.datagram_received
        for data, addr in datagrams:
            try:
                receive(data, addr)
            except Exception:
                log.exception("UDP query failed")

    def _admit(self, data: bytes, addr: Address, now: float) -> bool:
        """Admission: a client not judged yet, refused, or rate limited."""
        host = addr[0]
        if self.admitted.get(host) is True:
            return True
        if not self.access.allowed(host):
            # REFUSED, not silence, so a misconfigured client learns why at once (RFC 1035:
            # "for policy reasons"); never for what would not be answered anyway.
            self.metrics.dropped["refused"] += 1
            try:
                q = wire.parse_query(data)
            except wire.ClientError:
                return False
            reply = wire.rcode_reply(data, q, wire.REFUSED, wire.EDE_PROHIBITED)
            self.sendto(reply, addr)
            self.metrics.answered("local", reply, 0.0)
            return False
        if self.limiter is not None and not self.limiter.allow(str(host), now):
            self.metrics.dropped["overload"] += 1  # silence: an answer would feed the flood
            return False
        return True

    def _received(
        self, data: bytes, addr: Address, hit: FastHit | None, now: float
    ) -> FastHit | None:
        """Everything but an open, current fast-path row (see SlowPath); `now`: when the
        datagram came. Counted for a reader thread's decision to take a lent socket back."""
        reader = self.reader
        if reader is not None:
            reader.slow += 1
        if self.transport is None or self._draining:
            return None
        if self.guarded:
            if not self._admit(data, addr, now):
                return None
            if hit is None:
                hit = self.fast.get(data[2:])
        if hit is not None and (now < hit.valid_until or self.fast.refresh(hit, data, now)):
            return hit
        try:
            q = wire.parse_query(data)
        except wire.ClientError as exc:
            self.metrics.dropped["malformed"] += 1
            if exc.rcode is not None:
                self.sendto(
                    exc.reply(data),
                    addr,
                )
            return None
        self.requests[q.qtype] += 1
        limit = wire.udp_limit(q.edns_size)
        cached = self._resolver.cached(q, now)
        if cached is not None:
            reply = self._resolver.render(cached, data, q, now, limit)
            self.sendto(reply, addr)
            if not self.log_queries and self.fast.admit(cached, now):
                self.fast.remember(data, q, cached, now, reply)
            self.metrics.answered("cache", reply, self._clock() - now)
            if self.log_queries:
                self._log(addr, q, reply, "cache", now)
            return None
        if self.in_flight >= self.max_pending:
            # Bounded work: a fast SERVFAIL beats a queue that grows until the deadline passes.
            self.metrics.dropped["overload"] += 1
            reply = wire.rcode_reply(data, q, wire.SERVFAIL)
            self.sendto(reply, addr)
            self.metrics.answered("local", reply, self._clock() - now)
            return None
        self.in_flight += 1
        try:
            self._resolver.miss(data, q, limit, partial(self._answer_miss, addr, q, now))
        except Exception:
            log.exception("query failed", extra={"fields": {"client": str(addr[0])}})
            self._answer_miss(addr, q, now, wire.rcode_reply(data, q, wire.SERVFAIL), "local")
        return None

    def _answer_miss(
        self, addr: Address, q: wire.Query, start: float, reply: bytes, source: str
    ) -> None:
        """A miss's answer (Resolver.miss's `deliver`): sent, counted; no task per miss."""
        self.in_flight -= 1
        transport = self.transport
        if transport is not None and not transport.is_closing():
            self.sendto(reply, addr)  # the transport's (or the reader thread's) sendto
            metrics = self.metrics  # Counters.answered, inline: once per miss
            metrics.responses[source][reply[3] & 0x0F] += 1
            metrics.durations[source].observe(self._clock() - start)
            if self.log_queries:
                self._log(addr, q, reply, source, start)
        if not self.in_flight and self._settled is not None and not self._settled.done():
            self._settled.set_result(None)

    def _log(self, addr: Address, q: wire.Query, reply: bytes, source: str, start: float) -> None:
        if random() < self.log_queries:
            logs.query_line(addr[0], q.key[:-1], q.qtype, reply, source, self._clock() - start)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors from clients that went away; nothing to do for a UDP server.
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
