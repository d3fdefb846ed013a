"""The UDP listener: parse, answer hits inline, hand misses to a task.

A hit never leaves `datagram_received`: no task, no await, one send.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from sidecar.core import wire
from sidecar.pipeline import Resolver

log = logging.getLogger("dns_sidecar")


class UdpListener(asyncio.DatagramProtocol):
    def __init__(self, resolver: Resolver, max_pending: int = 4096) -> None:
        self.resolver = resolver
        self.max_pending = max_pending
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: set[asyncio.Task[None]] = set()
        self.draining = False
        self.dropped: dict[str, int] = {"malformed": 0, "overload": 0}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport does not derive from asyncio.DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        transport = self.transport
        if transport is None or self.draining:
            return
        try:
            q = wire.parse_query(data)
        except wire.ClientError as exc:
            self.dropped["malformed"] += 1
            if exc.rcode is not None:
                transport.sendto(wire.error_reply(data, exc.question_end, exc.rcode, 0), addr)
            return
        limit = wire.udp_limit(q.edns_size)
        reply = self.resolver.answer(data, q, limit)
        if reply is not None:
            transport.sendto(reply, addr)
            return
        if len(self.pending) >= self.max_pending:
            # Bounded work: a fast SERVFAIL beats a queue that grows until the deadline passes.
            self.dropped["overload"] += 1
            transport.sendto(
                wire.error_reply(data, q.question_end, wire.SERVFAIL, q.edns_size), addr
            )
            return
        task = asyncio.ensure_future(self._miss(data, q, limit, addr))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _miss(
        self, data: bytes, q: wire.Query, limit: int, addr: tuple[str | int, ...]
    ) -> None:
        try:
            reply = await self.resolver.resolve(data, q, limit)
        except Exception:
            log.exception("query failed", extra={"fields": {"client": str(addr[0])}})
            reply = wire.error_reply(data, q.question_end, wire.SERVFAIL, q.edns_size)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors from clients that went away; nothing to do for a UDP server.
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
