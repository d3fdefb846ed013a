"""The UDP listener: parse, answer hits inline, hand misses to a task.

A hit never leaves `datagram_received`: no task, no await, one send, two counter updates.
"""

from __future__ import annotations

import asyncio
import logging
from random import random
from time import perf_counter
from typing import cast

from sidecar import logs
from sidecar.core import wire
from sidecar.metrics import Metrics
from sidecar.pipeline import Resolver

log = logging.getLogger("dns_sidecar")


class UdpListener(asyncio.DatagramProtocol):
    def __init__(
        self,
        resolver: Resolver,
        metrics: Metrics,
        max_pending: int = 4096,
        log_queries: float = 0.0,
    ) -> None:
        self.resolver = resolver
        self.log_queries = log_queries
        self.metrics = metrics
        self.requests = metrics.requests["udp"]
        self.max_pending = max_pending
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: set[asyncio.Task[None]] = set()
        self.draining = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport does not derive from asyncio.DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        start = perf_counter()
        transport = self.transport
        if transport is None or self.draining:
            return
        try:
            q = wire.parse_query(data)
        except wire.ClientError as exc:
            self.metrics.dropped["malformed"] += 1
            if exc.rcode is not None:
                transport.sendto(wire.error_reply(data, exc.question_end, exc.rcode, 0), addr)
            return
        self.requests[q.qtype] += 1
        limit = wire.udp_limit(q.edns_size)
        reply = self.resolver.answer(data, q, limit)
        if reply is not None:
            transport.sendto(reply, addr)
            self.metrics.answered("cache", reply, perf_counter() - start)
            if self.log_queries and random() < self.log_queries:
                logs.query_line(
                    addr[0], q.key[:-1], q.qtype, reply, "cache", perf_counter() - start
                )
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
            reply, source = await self.resolver.resolve(data, q, limit)
        except Exception:
            log.exception("query failed", extra={"fields": {"client": str(addr[0])}})
            reply, source = (
                wire.error_reply(data, q.question_end, wire.SERVFAIL, q.edns_size),
                "local",
            )
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)
            self.metrics.answered(source, reply, perf_counter() - start)
            if self.log_queries and random() < self.log_queries:
                logs.query_line(addr[0], q.key[:-1], q.qtype, reply, source, perf_counter() - start)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors from clients that went away; nothing to do for a UDP server.
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
