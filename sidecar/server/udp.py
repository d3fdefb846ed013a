"""The UDP listener: parse, answer hits inline, hand misses to a task.

A hit never leaves `datagram_received`: no task, no await, one send. A query asked before is
answered from the resolver's fast-path table (core/fast_path.py): the bytes after the ID are
the key, the reply's bytes after the ID the value, valid until one moment. That path is the
whole of `datagram_received`; everything else (admission when an allow list or rate limit is
configured, parsing, the cache, refreshing a row, the miss path) is `_received`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial
from random import random
from time import monotonic, perf_counter
from typing import cast

from sidecar import logs
from sidecar.core import wire
from sidecar.core.access import EVERYONE, ClientFilter, RateLimiter
from sidecar.core.counters import Counters
from sidecar.core.fast_path import QUICK, FastHit
from sidecar.pipeline import Resolver
from sidecar.server.datagram_batch import SLOT, DatagramBatch
from sidecar.server.udp_thread import Address, BatchServer, Receiver, UdpReaderThread

log = logging.getLogger("dns_sidecar")


def _no_row(_key: bytes) -> None:
    """The hot path's lookup while every query must reach _received (draining, query
    logging, a rate limit): never a row."""
    return None


def _hot_path(
    fast_get: Callable[[bytes], FastHit | None],
    admitted_get: Callable[[str | int], bool | None] | None,
    sendto: Receiver,
    slow_hit: Callable[[FastHit, float], None],
    received: Callable[[bytes, tuple[str | int, ...], FastHit | None], None],
) -> Receiver:
    """The listener's `datagram_received`: a closure over what it uses, so a hit reads no
    attribute of the listener (uvloop looks the method up per datagram; an instance attribute
    holding this function saves making a bound method too). With an allow list, a client
    judged allowed before passes with one dict lookup (`admitted_get`). Bound again whenever
    one of its parts changes (transport, resolver, draining, access, query logging)."""

    def datagram_received(data: bytes, addr: tuple[str | int, ...]) -> None:
        hit = fast_get(data[2:])
        if hit is not None and (admitted_get is None or admitted_get(addr[0]) is True):
            now = monotonic()
            if now < hit.valid_until:
                sendto(data[:2] + (hit.tail or hit.next_tail()), addr)
                elapsed = monotonic() - now
                if elapsed < QUICK:  # FastPath.served, inlined
                    hit.hits += 1
                    hit.seconds += elapsed
                else:
                    slow_hit(hit, elapsed)
                return
        received(data, addr, hit)

    return datagram_received


MAX_KNOWN_CLIENTS = 1024  # raw client addresses a batch hot path remembers as admitted

SlowDatagrams = list[tuple[bytes, Address, FastHit | None]]


def _batch_hot_path(
    fast_get: Callable[[bytes], FastHit | None],
    admitted_get: Callable[[str | int], bool | None] | None,
    batch: DatagramBatch,
    served_late: Callable[[int, float], None],
    lend: Callable[[SlowDatagrams], None],
) -> BatchServer:
    """The reader thread's hot path (server/udp_thread.py): `_hot_path` for a batch of
    datagrams. Queries with a current row are answered together (one sendmmsg) and counted on
    their rows with the batch's time; the rest go to the loop (`lend`), with the socket. With
    an allow list, a client's raw address is looked up in `known` (admitted clients of this
    binding) before its address is decoded for `admitted_get`. DatagramBatch's `query`,
    `client` and `stage` are inlined: one function per batch keeps a lone query's path short
    (see server/datagram_batch.py)."""
    known: dict[bytes, bool] = {}
    known_get = known.get
    memory, lengths, sizes, pointers = batch.memory, batch.lengths, batch.sizes, batch.pointers
    incoming, outgoing, senders = batch.incoming, batch.outgoing, batch.senders

    def admitted(i: int) -> bool:
        """A client not in `known` yet: its verdict, remembered if it is True."""
        assert admitted_get is not None
        if admitted_get(batch.address(i)[0]) is not True:
            return False  # not judged yet, or refused: the loop's _admit says which
        if len(known) >= MAX_KNOWN_CLIENTS:
            known.clear()
        known[batch.client(i)] = True
        return True

    def serve(count: int) -> None:
        now = monotonic()
        served: list[FastHit] = []
        slow: SlowDatagrams | None = None
        staged = 0
        for i in range(count):
            start, length, client_start, client_end = incoming[i]
            data = bytes(memory[start : start + lengths[length]])
            hit = fast_get(data[2:])
            if (
                hit is not None
                and now < hit.valid_until
                and (
                    admitted_get is None
                    or known_get(bytes(memory[client_start:client_end]))
                    or admitted(i)
                )
            ):
                reply = data[:2] + (hit.tail or hit.next_tail())
                size = len(reply)
                if size <= SLOT:  # DatagramBatch.stage, inlined
                    at, size_at, name_at = outgoing[staged]
                    memory[at : at + size] = reply
                    sizes[size_at] = size
                    pointers[name_at] = senders[i]
                    staged += 1
                else:
                    batch.send_one(reply, i)
                served.append(hit)
                continue
            if slow is None:
                slow = []
            slow.append((data, batch.address(i), hit))
        if served:
            batch.send(staged)
            elapsed = monotonic() - now
            for hit in served:
                hit.hits += 1
                hit.seconds += elapsed
            if elapsed >= QUICK:
                served_late(len(served), elapsed)
        if slow is not None:
            lend(slow)

    return serve


class UdpListener(asyncio.DatagramProtocol):
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
        self.max_pending = max_pending
        self.log_queries = log_queries
        self.transport: asyncio.DatagramTransport | UdpReaderThread | None = None
        self.sendto: Receiver = self._not_connected  # the loop's sends
        self.reader: UdpReaderThread | None = None  # the thread reading the socket, if any
        self.pending: set[asyncio.Task[None]] = set()
        self._draining = False
        self._resolver = resolver
        self.set_access(access or ClientFilter(EVERYONE), limiter)  # binds the fast path

    @staticmethod
    def _not_connected(data: bytes, addr: tuple[str | int, ...]) -> None:
        pass

    def set_access(self, access: ClientFilter, limiter: RateLimiter | None) -> None:
        """Who is served, and the per-client rate limit (None: off)."""
        self.access = access
        self.limiter = limiter
        # The admission check: clients whose verdict here is True pass with one dict lookup.
        # With a rate limit every query must take a token, so nothing is True.
        self.admitted: dict[str | int, bool] = access.verdicts if limiter is None else {}
        self.guarded = limiter is not None or not access.allows_everyone
        self._bind_fast_path()

    @property
    def resolver(self) -> Resolver:
        return self._resolver

    @resolver.setter
    def resolver(self, resolver: Resolver) -> None:
        self._resolver = resolver
        self._bind_fast_path()

    @property
    def draining(self) -> bool:
        return self._draining

    @draining.setter
    def draining(self, draining: bool) -> None:
        self._draining = draining
        self._bind_fast_path()

    def _bind_fast_path(self) -> None:
        self.fast = self._resolver.fast
        # Draining or logging every query: every query goes through _received. A rate limit
        # takes a token per query, so there too; an allow list alone costs one dict lookup.
        off = self._draining or self.log_queries > 0 or self.limiter is not None
        fast_get = _no_row if off else self.fast.get
        admitted_get = self.admitted.get if self.guarded else None
        # The loop's own hot path: the uvloop transport's, or the lent socket's (below).
        self.datagram_received = _hot_path(
            fast_get, admitted_get, self.sendto, self.fast.slow_hit, self._received
        )
        reader = self.reader
        if reader is not None:
            # In the reader thread: batches; the slow path lends the socket to the loop.
            reader.serve = _batch_hot_path(
                fast_get,
                admitted_get,
                reader.batch,
                self.fast.served_late,
                partial(reader.lend, self._received_batch),
            )
            reader.loop_receive = _hot_path(
                fast_get, admitted_get, self.sendto, self.fast.slow_hit, self._received_lent
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

    def _received_batch(self, datagrams: SlowDatagrams) -> None:
        """The slow part of a reader thread's batch, on the loop (before it reads the lent
        socket itself)."""
        for data, addr, hit in datagrams:
            try:
                self._received(data, addr, hit)
            except Exception:
                log.exception("UDP query failed")

    def _received_lent(self, data: bytes, addr: tuple[str | int, ...], hit: FastHit | None) -> None:
        """_received, counted for the reader's decision to take its socket back."""
        assert self.reader is not None
        self.reader.slow += 1
        self._received(data, addr, hit)

    def _admit(self, data: bytes, addr: tuple[str | int, ...]) -> bool:
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
            reply = wire.error_reply(data, q.question_end, wire.REFUSED, q.edns_size)
            self.sendto(reply, addr)
            self.metrics.answered("local", reply, 0.0)
            return False
        if self.limiter is not None and not self.limiter.allow(str(host), monotonic()):
            self.metrics.dropped["overload"] += 1  # silence: an answer would feed the flood
            return False
        return True

    def _received(self, data: bytes, addr: tuple[str | int, ...], hit: FastHit | None) -> None:
        """Everything but an open, current fast-path row."""
        start = perf_counter()
        if self.transport is None or self._draining:
            return
        if self.guarded:
            if not self._admit(data, addr):
                return
            if hit is None:
                hit = self.fast.get(data[2:])
        now = monotonic()
        if hit is not None and (now < hit.valid_until or self.fast.refresh(hit, data, now)):
            self.sendto(data[:2] + (hit.tail or hit.next_tail()), addr)
            self.fast.served(hit, perf_counter() - start)
            return
        try:
            q = wire.parse_query(data)
        except wire.ClientError as exc:
            self.metrics.dropped["malformed"] += 1
            if exc.rcode is not None:
                self.sendto(wire.error_reply(data, exc.question_end, exc.rcode, 0), addr)
            return
        self.requests[q.qtype] += 1
        limit = wire.udp_limit(q.edns_size)
        cached = self._resolver.cached(q, now)
        if cached is not None:
            reply = self._resolver.render(cached, data, q, now, limit)
            self.sendto(reply, addr)
            if not self.log_queries and self.fast.admit(q.key, now):
                self.fast.remember(data, q, cached, now, reply)
            self.metrics.answered("cache", reply, perf_counter() - start)
            if self.log_queries:
                self._log(addr, q, reply, "cache", start)
            return
        if len(self.pending) >= self.max_pending:
            # Bounded work: a fast SERVFAIL beats a queue that grows until the deadline passes.
            self.metrics.dropped["overload"] += 1
            reply = wire.error_reply(data, q.question_end, wire.SERVFAIL, q.edns_size)
            self.sendto(reply, addr)
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
