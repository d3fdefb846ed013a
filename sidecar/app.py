"""Wiring: configuration -> core -> listeners; the loop check, signals, reload and drain."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import uvloop

from sidecar import logs
from sidecar.config import Config, HostPort
from sidecar.core.cache import TtlCache
from sidecar.core.routing import ZoneRouter, name_to_wire
from sidecar.core.upstream_health import UpstreamSet
from sidecar.errors import ConfigError, UpstreamError
from sidecar.metrics import Gauges, Metrics, registry
from sidecar.pipeline import Resolver
from sidecar.server.http import HttpListener
from sidecar.server.tcp import TcpListener
from sidecar.server.udp import UdpListener
from sidecar.server.upstream import Forwarder, probe_down_upstreams

TYPE_NS_IN = b"\x00\x02\x00\x01"


def build_resolver(config: Config, metrics: Metrics, cache: TtlCache | None = None) -> Resolver:
    def upstream_set(upstreams: tuple[HostPort, ...], policy: str | None) -> UpstreamSet[HostPort]:
        return UpstreamSet(
            upstreams,
            policy=policy or config.upstream_policy,
            max_fails=config.upstream_max_fails,
        )

    router = ZoneRouter(
        upstream_set(config.upstreams, None),
        {zone.name: upstream_set(zone.upstreams, zone.policy) for zone in config.zones},
    )
    if cache is None:
        cache = TtlCache(config.cache)
    else:
        cache.limits = config.cache
    return Resolver(
        cache,
        router,
        Forwarder(attempt_timeout=config.attempt_timeout, metrics=metrics),
        metrics,
        query_timeout=config.query_timeout,
        max_inflight=config.upstream_max_inflight,
        stale_answer_after=config.cache.stale_answer_after,
        stale_ttl=config.cache.stale_ttl,
    )


@dataclass
class Server:
    """The running listeners of one process and the background work that serves them."""

    config: Config
    resolver: Resolver
    metrics: Metrics
    udp: list[tuple[asyncio.DatagramTransport, UdpListener]] = field(default_factory=list)
    tcp_servers: list[asyncio.Server] = field(default_factory=list)
    tcp: TcpListener | None = None
    http_server: asyncio.Server | None = None
    ready: bool = False
    not_ready_reason: str = "starting"
    _prober: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tcp = TcpListener(
            self.resolver,
            self.metrics,
            idle_timeout=self.config.tcp_idle_timeout,
            max_connections=self.config.tcp_max_connections,
            log_queries=self.config.log_queries,
        )
        for address in self.config.listen:
            family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
            transport, protocol = await loop.create_datagram_endpoint(
                lambda: UdpListener(
                    self.resolver,
                    self.metrics,
                    max_pending=self.config.max_pending,
                    log_queries=self.config.log_queries,
                ),
                local_addr=(address.host, address.port),
                family=family,
            )
            self.udp.append((transport, protocol))
            self.tcp_servers.append(
                await asyncio.start_server(
                    self.tcp.handle, address.host, address.port, family=family, backlog=512
                )
            )
        http = HttpListener(
            registry(self.metrics, self.gauges()),
            lambda: (self.ready, self.not_ready_reason),
            self.endpoint_table,
        )
        where = self.config.metrics_listen
        self.http_server = await http.start(where.host, where.port)
        self._start_prober()

    def gauges(self) -> Gauges:
        """Scrape-time views of whatever resolver is current (a reload replaces it)."""
        return Gauges(
            cache_entries=lambda: (
                len(self.resolver.cache) - self.resolver.cache.negative_entries,
                self.resolver.cache.negative_entries,
            ),
            cache_evictions=lambda: self.resolver.cache.evictions,
            upstream_health=lambda: [
                (str(server), ups.healthy(server))
                for _zone, ups in self.resolver.router.targets()
                for server in ups.upstreams
            ],
            endpoints=lambda: [],
            endpoint_probes=lambda: [],
            answers_shaped=lambda: [],
        )

    def endpoint_table(self) -> object:
        return []

    def _start_prober(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
        resolver = self.resolver
        self._prober = asyncio.ensure_future(  # noqa: RUF006 (kept in self._prober)
            probe_down_upstreams(
                resolver.forwarder,
                [ups for _zone, ups in resolver.router.targets()],
                name_to_wire(self.config.upstream_probe_name) + TYPE_NS_IN,
                self.config.upstream_probe_interval,
            )
        )

    async def find_loops(self) -> list[str]:
        """Ask every upstream for a random name below its zone; report those that reach us.

        Like CoreDNS's `loop`: a forwarder that sends our own query back to us would make
        every miss circle until its deadline. Sent once, after the listeners are up.
        """
        resolver = self.resolver

        async def probe(zone: str, server: HostPort) -> None:
            with contextlib.suppress(UpstreamError):
                await resolver.forwarder.probe(server, resolver.new_loop_probe(zone, server))

        await asyncio.gather(
            *(
                probe(zone, server)
                for zone, ups in resolver.router.targets()
                for server in ups.upstreams
            )
        )
        resolver.loop_probes.clear()
        return resolver.loops_seen

    def use(self, config: Config) -> None:
        """Apply a reloaded configuration; the cache survives when routing did not change."""
        keep = self.config.routing() == config.routing()
        self.resolver = build_resolver(config, self.metrics, self.resolver.cache if keep else None)
        for _transport, protocol in self.udp:
            protocol.resolver = self.resolver
            protocol.max_pending = config.max_pending
        if self.tcp is not None:
            self.tcp.resolver = self.resolver
            self.tcp.idle_timeout = config.tcp_idle_timeout
            self.tcp.max_connections = config.tcp_max_connections
        self.config = config
        self._start_prober()

    async def drain(self, grace: float) -> None:
        """Stop taking new work, answer what is in flight (up to `grace` s), close."""
        if self._prober is not None:
            self._prober.cancel()
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
        if self.http_server is not None:
            self.http_server.close()
            await self.http_server.wait_closed()


async def serve(
    config: Config,
    reload: Callable[[], Config] | None = None,
    started: Callable[[Server], None] | None = None,
) -> int:
    log = logs.get()
    counters = Metrics()
    server = Server(config, build_resolver(config, counters), counters)
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
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, lambda: _reload(server, reload))
    log.info("started", extra={"fields": config.describe()})
    loops = await server.find_loops()
    if loops:
        for loop_path in loops:
            log.error(
                "forwarding loop: our own query came back to us; refusing to run",
                extra={"fields": {"loop": loop_path}},
            )
        await server.drain(0)
        return 1
    server.ready, server.not_ready_reason = True, ""
    if started is not None:
        started(server)
    await stop.wait()
    # Readiness goes first, then keep answering while the orchestrator stops sending to us.
    server.ready, server.not_ready_reason = False, "draining"
    log.info("stopping", extra={"fields": {"drain_seconds": server.config.drain_seconds}})
    await asyncio.sleep(server.config.drain_seconds)
    await server.drain(grace=server.config.query_timeout + 0.5)
    log.info("stopped")
    return 0


def _reload(server: Server, reload: Callable[[], Config]) -> None:
    log = logs.get()
    try:
        config = reload()
    except ConfigError as exc:
        log.error(
            "reload refused, running configuration kept", extra={"fields": {"error": str(exc)}}
        )
        return
    if config.listen != server.config.listen:
        log.warning("listen addresses change only on restart; the rest is applied")
        config = dataclasses.replace(config, listen=server.config.listen)
    kept = server.config.routing() == config.routing()
    server.use(config)
    log.info("reloaded", extra={"fields": {**config.describe(), "cache_kept": kept}})


def run(config: Config, reload: Callable[[], Config] | None = None) -> int:
    logs.setup(config.log_format, config.log_level)
    return uvloop.run(serve(config, reload))


__all__ = ["HostPort", "Server", "build_resolver", "run", "serve"]
