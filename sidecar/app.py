"""Wiring: configuration -> core -> listeners; signals and the drain on the way out."""

from __future__ import annotations

import asyncio
import signal
import socket
from dataclasses import dataclass, field

import uvloop

from sidecar import logs
from sidecar.config import Config, HostPort
from sidecar.core.cache import CacheLimits, TtlCache
from sidecar.core.routing import ZoneRouter
from sidecar.core.upstream_health import UpstreamSet
from sidecar.pipeline import Resolver
from sidecar.server.tcp import TcpListener
from sidecar.server.udp import UdpListener
from sidecar.server.upstream import Forwarder


def build_resolver(config: Config) -> Resolver:
    cache = TtlCache(
        CacheLimits(
            max_entries=config.cache.max_entries,
            min_ttl=config.cache.min_ttl,
            max_ttl=config.cache.max_ttl,
            max_negative_ttl=config.cache.max_negative_ttl,
            servfail_ttl=config.cache.servfail_ttl,
        )
    )
    router = ZoneRouter(
        UpstreamSet(config.upstreams),
        {zone.name: UpstreamSet(zone.upstreams) for zone in config.zones},
    )
    return Resolver(
        cache,
        router,
        Forwarder(attempt_timeout=config.attempt_timeout),
        query_timeout=config.query_timeout,
    )


@dataclass
class Server:
    """The running listeners of one process."""

    config: Config
    resolver: Resolver
    udp: list[tuple[asyncio.DatagramTransport, UdpListener]] = field(default_factory=list)
    tcp_servers: list[asyncio.Server] = field(default_factory=list)
    tcp: TcpListener | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tcp = TcpListener(
            self.resolver,
            idle_timeout=self.config.tcp_idle_timeout,
            max_connections=self.config.tcp_max_connections,
        )
        for address in self.config.listen:
            family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
            transport, protocol = await loop.create_datagram_endpoint(
                lambda: UdpListener(self.resolver),
                local_addr=(address.host, address.port),
                family=family,
            )
            self.udp.append((transport, protocol))
            self.tcp_servers.append(
                await asyncio.start_server(
                    self.tcp.handle, address.host, address.port, family=family, backlog=512
                )
            )

    async def drain(self, grace: float) -> None:
        """Stop taking new work, answer what is in flight (up to `grace` s), close."""
        for server in self.tcp_servers:
            server.close()
        tcp = self.tcp
        for _transport, protocol in self.udp:
            protocol.draining = True
        if tcp is not None:
            tcp.draining = True
        pending = {task for _t, protocol in self.udp for task in protocol.pending}
        if tcp is not None:
            pending |= tcp.pending
        if pending:
            await asyncio.wait(pending, timeout=grace)
        if tcp is not None:
            for connection in list(tcp.connections):
                connection.cancel()
            if tcp.connections:
                await asyncio.wait(tcp.connections, timeout=1.0)
        for transport, _protocol in self.udp:
            transport.close()
        for server in self.tcp_servers:
            await server.wait_closed()


def listen_addresses(config: Config) -> list[str]:
    return [str(address) for address in config.listen]


async def serve(config: Config, started: asyncio.Event | None = None) -> int:
    log = logs.get()
    server = Server(config, build_resolver(config))
    try:
        await server.start()
    except OSError as exc:
        log.error("cannot listen", extra={"fields": {"error": str(exc)}})
        await server.drain(0)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("started", extra={"fields": config.describe()})
    if started is not None:
        started.set()
    await stop.wait()
    log.info("stopping: draining in-flight queries")
    await server.drain(grace=config.query_timeout + 0.5)
    log.info("stopped")
    return 0


def run(config: Config) -> int:
    logs.setup(config.log_format, config.log_level)
    return uvloop.run(serve(config))


__all__ = ["HostPort", "Server", "build_resolver", "run", "serve"]
