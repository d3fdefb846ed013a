"""The TCP listener (RFC 7766): length-framed messages, several per connection, each answered
as soon as it is ready (out of order).

Limits, so that slow, idle or hostile clients cannot starve the others or grow memory:
- only clients in `allow` (core/access.py); anyone else's connection is closed at once;
- at most `max_connections` open. At the cap a new connection closes the connection that has
  been quiet longest and has no query in flight (RFC 7766 section 6.2.3 lets a server close
  idle connections under pressure), so idle connections never lock out a client with a query;
  only when every connection is busy is the new one closed;
- `idle_timeout` for the next length prefix; once a prefix has come, the message must arrive
  whole within `message_timeout` (a length that promises more than comes costs that long);
- at most MAX_PIPELINED queries in flight per connection, and a client that does not read its
  answers is dropped after `idle_timeout` instead of having them buffered without bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from random import random

from sidecar import logs
from sidecar.core import wire
from sidecar.core.access import ClientFilter
from sidecar.core.counters import Counters
from sidecar.pipeline import Resolver

log = logging.getLogger("dns_sidecar")

TCP_LIMIT = 65535
MAX_PIPELINED = 64  # per connection: a client cannot make us hold more work than this


class Connection:
    """One client connection: its writer and the queries it has in flight."""

    __slots__ = ("mine", "writer")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.mine: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<Connection in_flight={len(self.mine)} closing={self.writer.is_closing()}>"


class TcpListener:
    """The TCP queries of every listening socket. The app sets it up through `configure` (at
    start and at every reload), stops it with `drain` and `close_connections`; `pending` are
    the misses in flight."""

    def __init__(
        self,
        resolver: Resolver,
        metrics: Counters,
        *,
        idle_timeout: float,
        max_connections: int,
        message_timeout: float = 2.0,
        access: ClientFilter | None = None,
        log_queries: float = 0.0,
    ) -> None:
        self.metrics = metrics
        self.requests = metrics.requests["tcp"]
        self.log_queries = log_queries
        # Open connections, the one quiet longest first (moved to the end on every message).
        self._connections: OrderedDict[asyncio.Task[None], Connection] = OrderedDict()
        self._pending: set[asyncio.Task[None]] = set()
        self._draining = False
        self.configure(
            resolver,
            access=access,
            idle_timeout=idle_timeout,
            max_connections=max_connections,
            message_timeout=message_timeout,
        )

    def configure(
        self,
        resolver: Resolver,
        *,
        access: ClientFilter | None,
        idle_timeout: float,
        max_connections: int,
        message_timeout: float,
    ) -> None:
        """Serve from `resolver` (and time with its clock) the clients `access` allows (None:
        everyone), with these limits (see the module's notes). Open connections see the new
        values at their next message."""
        self.resolver = resolver
        self._clock = resolver.clock
        self.access = access
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.message_timeout = message_timeout

    def drain(self) -> None:
        """Take no new connection and no new message; what is in flight is still answered."""
        self._draining = True

    @property
    def pending(self) -> frozenset[asyncio.Task[None]]:
        """The misses in flight."""
        return frozenset(self._pending)

    async def close_connections(self, timeout: float) -> None:
        """Close every open connection (after `drain`), waiting up to `timeout` s for them."""
        for connection in list(self._connections):
            connection.cancel()
        if self._connections:
            await asyncio.wait(self._connections, timeout=timeout)

    def __repr__(self) -> str:
        return f"<TcpListener connections={len(self._connections)} pending={len(self._pending)}>"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.access is not None:
            peer = writer.get_extra_info("peername")
            if not peer:  # getpeername failed: the client reset before we accepted
                self.metrics.dropped["reset"] += 1
                writer.transport.abort()
                return
            if not self.access.allowed(str(peer[0])):
                self.metrics.dropped["refused"] += 1
                writer.transport.abort()
                return
        if self._draining or (
            len(self._connections) >= self.max_connections and not self._close_quietest()
        ):
            self.metrics.dropped["overload"] += 1
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        connection = Connection(writer)
        self._connections[task] = connection
        clean = False
        try:
            await self._serve(reader, writer, task, connection.mine)
            if connection.mine:
                await asyncio.wait(connection.mine)  # in flight when the client stopped sending
            clean = True
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            self._connections.pop(task, None)
            if clean:
                writer.close()  # flush what is still buffered
            else:
                writer.transport.abort()  # nothing buffered for a client that stopped reading

    def _close_quietest(self) -> bool:
        """Close the connection quiet longest that has no query in flight; False if none."""
        for connection in self._connections.values():
            if not connection.mine and not connection.writer.is_closing():
                connection.writer.transport.abort()
                return True
        return False

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        task: asyncio.Task[None],
        mine: set[asyncio.Task[None]],
    ) -> None:
        while not self._draining:
            try:
                async with asyncio.timeout(self.idle_timeout):
                    await writer.drain()  # a client that does not read its answers is let go
                    prefix = await reader.readexactly(2)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    raise
                return  # the client is done sending: its queries in flight are still answered
            size = int.from_bytes(prefix, "big")
            async with asyncio.timeout(self.message_timeout):
                data = await reader.readexactly(size)
            self._connections.move_to_end(task)
            start = self._clock()
            try:
                q = wire.parse_query(data)
            except wire.ClientError as exc:
                self.metrics.dropped["malformed"] += 1
                if exc.rcode is None:
                    return  # not a query we would ever answer: close the connection
                writer.write(wire.frame(exc.reply(data)))
                continue
            self.requests[q.qtype] += 1
            reply = self.resolver.answer(data, q, TCP_LIMIT)
            if reply is not None:
                writer.write(wire.frame(reply))
                self.metrics.answered("cache", reply, self._clock() - start)
                if self.log_queries:
                    self._log(writer, q, reply, "cache", start)
                continue
            while len(mine) >= MAX_PIPELINED:
                await asyncio.wait(mine, return_when=asyncio.FIRST_COMPLETED)
            miss = asyncio.ensure_future(self._miss(data, q, writer, start))
            for group in (mine, self._pending):
                group.add(miss)
                miss.add_done_callback(group.discard)

    async def _miss(
        self, data: bytes, q: wire.Query, writer: asyncio.StreamWriter, start: float
    ) -> None:
        try:
            reply, source = await self.resolver.resolve(data, q, TCP_LIMIT)
        except Exception:
            log.exception("query failed")
            reply, source = (
                wire.rcode_reply(data, q, wire.SERVFAIL),
                "local",
            )
        if not writer.is_closing():
            writer.write(wire.frame(reply))
            self.metrics.answered(source, reply, self._clock() - start)
            if self.log_queries:
                self._log(writer, q, reply, source, start)

    def _log(
        self, writer: asyncio.StreamWriter, q: wire.Query, reply: bytes, source: str, start: float
    ) -> None:
        if random() < self.log_queries:
            peer = writer.get_extra_info("peername") or ("?",)
            logs.query_line(peer[0], q.key[:-1], q.qtype, reply, source, self._clock() - start)
