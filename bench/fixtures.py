"""Loopback helpers that run in one background thread of the benchmark process:

- `CountingProxy`: a UDP relay in front of NSD for the coalescing test. It counts every query a
  server sends upstream, by lowercased name, and holds each reply back `delay` seconds (a slow
  upstream, so that a burst of identical misses all arrive while the first is still in flight).
  It gives each forwarded query an ID of its own, so queries from several servers never mix.
- `TcpBackends`: real TCP listeners on a pool of loopback addresses, the endpoints that the
  discovery zone's A records point at, so the shaped sidecar's `tcp:PORT` health probes succeed.
  Each connection is accepted and closed at once.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import Counter
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar, cast

T = TypeVar("T")


def _qname(msg: bytes) -> str:
    """The question name of a message, lowercased, without the trailing dot ('' if unreadable)."""
    labels: list[str] = []
    i = 12
    while i < len(msg):
        n = msg[i]
        if n == 0 or n & 0xC0:
            break
        labels.append(msg[i + 1 : i + 1 + n].decode("ascii", "replace"))
        i += n + 1
    return ".".join(labels).lower()


class _ProxyProtocol(asyncio.DatagramProtocol):
    """The side that servers under test send to."""

    def __init__(self, proxy: CountingProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.proxy.from_client(data, addr)


class _UpstreamProtocol(asyncio.DatagramProtocol):
    def __init__(self, proxy: CountingProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.proxy.from_upstream(data)


class CountingProxy:
    def __init__(self, host: str, port: int, upstream: tuple[str, int], delay: float) -> None:
        self.host = host
        self.port = port
        self.upstream = upstream
        self.delay = delay
        self.counts: Counter[str] = Counter()
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[bytes, tuple[str | Any, int]]] = {}
        self._front: _ProxyProtocol | None = None
        self._back: _UpstreamProtocol | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        _, self._front = await loop.create_datagram_endpoint(
            lambda: _ProxyProtocol(self), local_addr=(self.host, self.port)
        )
        _, self._back = await loop.create_datagram_endpoint(
            lambda: _UpstreamProtocol(self), remote_addr=self.upstream
        )

    def from_client(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if len(data) < 12 or self._back is None or self._back.transport is None:
            return
        self.counts[_qname(data)] += 1
        new_id = next(self._ids) & 0xFFFF
        self._waiting[new_id] = (data[:2], addr)
        self._back.transport.sendto(new_id.to_bytes(2, "big") + data[2:])

    def from_upstream(self, data: bytes) -> None:
        if len(data) < 12:
            return
        waiting = self._waiting.pop(int.from_bytes(data[:2], "big"), None)
        if waiting is None or self._loop is None:
            return
        old_id, addr = waiting
        reply = old_id + data[2:]
        self._loop.call_later(self.delay, self._send_back, reply, addr)

    def _send_back(self, reply: bytes, addr: tuple[str | Any, int]) -> None:
        if self._front is not None and self._front.transport is not None:
            self._front.transport.sendto(reply, addr)

    def close(self) -> None:
        for side in (self._front, self._back):
            if side is not None and side.transport is not None:
                side.transport.close()


class TcpBackends:
    def __init__(self, hosts: Sequence[str], port: int) -> None:
        self.hosts = list(hosts)
        self.port = port
        self.accepted = 0
        self._servers: list[asyncio.Server] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        writer.close()

    async def start(self) -> None:
        for host in self.hosts:
            self._servers.append(await asyncio.start_server(self._handle, host, self.port))

    def close(self) -> None:
        for server in self._servers:
            server.close()


class LoopThread:
    """An asyncio loop in a daemon thread; `run(coro)` runs a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Any, *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()
