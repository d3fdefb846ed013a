"""The TCP listener (RFC 7766): length-framed messages, several per connection, each answered
as soon as it is ready (out of order), an idle timeout, and a cap on connections.
"""

from __future__ import annotations

import asyncio
import logging
from random import random
from time import perf_counter

from sidecar import logs
from sidecar.core import wire
from sidecar.metrics import Metrics
from sidecar.pipeline import Resolver

log = logging.getLogger("dns_sidecar")

TCP_LIMIT = 65535
MAX_PIPELINED = 64  # per connection: a client cannot make us hold more work than this


class TcpListener:
    def __init__(
        self,
        resolver: Resolver,
        metrics: Metrics,
        *,
        idle_timeout: float,
        max_connections: int,
        log_queries: float = 0.0,
    ) -> None:
        self.resolver = resolver
        self.metrics = metrics
        self.requests = metrics.requests["tcp"]
        self.log_queries = log_queries
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.connections: set[asyncio.Task[None]] = set()
        self.pending: set[asyncio.Task[None]] = set()
        self.draining = False

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.draining or len(self.connections) >= self.max_connections:
            self.metrics.dropped["overload"] += 1
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        mine: set[asyncio.Task[None]] = set()
        try:
            await self._serve(reader, writer, mine)
            if mine:
                await asyncio.wait(mine)  # in flight when the client stopped sending
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            self.connections.discard(task)
            writer.close()

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        mine: set[asyncio.Task[None]],
    ) -> None:
        while not self.draining:
            async with asyncio.timeout(self.idle_timeout):
                prefix = await reader.readexactly(2)
            size = int.from_bytes(prefix, "big")
            async with asyncio.timeout(self.idle_timeout):
                data = await reader.readexactly(size)
            start = perf_counter()
            try:
                q = wire.parse_query(data)
            except wire.ClientError as exc:
                self.metrics.dropped["malformed"] += 1
                if exc.rcode is None:
                    return  # not a query we would ever answer: close the connection
                writer.write(wire.frame(wire.error_reply(data, exc.question_end, exc.rcode, 0)))
                continue
            self.requests[q.qtype] += 1
            reply = self.resolver.answer(data, q, TCP_LIMIT)
            if reply is not None:
                writer.write(wire.frame(reply))
                self.metrics.answered("cache", reply, perf_counter() - start)
                if self.log_queries:
                    self._log(writer, q, reply, "cache", start)
                await writer.drain()
                continue
            while len(mine) >= MAX_PIPELINED:
                await asyncio.wait(mine, return_when=asyncio.FIRST_COMPLETED)
            task = asyncio.ensure_future(self._miss(data, q, writer, start))
            for group in (mine, self.pending):
                group.add(task)
                task.add_done_callback(group.discard)

    async def _miss(
        self, data: bytes, q: wire.Query, writer: asyncio.StreamWriter, start: float
    ) -> None:
        try:
            reply, source = await self.resolver.resolve(data, q, TCP_LIMIT)
        except Exception:
            log.exception("query failed")
            reply, source = (
                wire.error_reply(data, q.question_end, wire.SERVFAIL, q.edns_size),
                "local",
            )
        if not writer.is_closing():
            writer.write(wire.frame(reply))
            self.metrics.answered(source, reply, perf_counter() - start)
            if self.log_queries:
                self._log(writer, q, reply, source, start)

    def _log(
        self, writer: asyncio.StreamWriter, q: wire.Query, reply: bytes, source: str, start: float
    ) -> None:
        if random() < self.log_queries:
            peer = writer.get_extra_info("peername") or ("?",)
            logs.query_line(peer[0], q.key[:-1], q.qtype, reply, source, perf_counter() - start)
