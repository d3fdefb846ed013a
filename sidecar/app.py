"""Wiring: configuration -> core -> listeners; the loop check, signals, reload and drain."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import uvloop

from sidecar import collector, logs, resolv_conf, supervisor
from sidecar.addresses import HostPort
from sidecar.config import Config
from sidecar.core.access import ClientFilter, RateLimiter
from sidecar.core.cache import TtlCache
from sidecar.core.counters import Counters, Snapshot
from sidecar.core.packet_budget import PacketBudget
from sidecar.core.rotation import Rotator
from sidecar.core.routing import ZoneRouter, name_to_wire
from sidecar.core.upstream_health import UpstreamSet
from sidecar.errors import ConfigError, UpstreamError
from sidecar.forwarder import Forwarder, probe_down_upstreams
from sidecar.pipeline import Resolver
from sidecar.server import datagram_batch, sockets
from sidecar.server.http import HttpListener
from sidecar.server.tcp import TcpListener
from sidecar.server.udp import UdpListener
from sidecar.server.udp_thread import UdpReaderThread, in_turns
from sidecar.server.upstream import SocketExchanges

if TYPE_CHECKING:
    from sidecar.discovery.cloudmap import CloudMapSource
    from sidecar.discovery.endpoints import EndpointTable
    from sidecar.discovery.pools import Shaper
    from sidecar.discovery.zone import DiscoveryZone
    from sidecar.prometheus_lean import CollectorRegistry

TYPE_NS_IN = b"\x00\x02\x00\x01"
# The one clock of the query path (monotonic seconds): the resolver, its fast path and the
# forwarder all read it; the event loop's own timers keep their own.
CLOCK = time.monotonic


def cloudmap_sources(config: Config) -> dict[str, CloudMapSource]:
    """One Cloud Map source per discovery zone that asks for one (discovery_wiring.py)."""
    if not config.discovery_zones():
        return {}
    from sidecar import discovery_wiring as wiring

    return wiring.cloudmap_sources(config)


def answer_orders(config: Config) -> tuple[object, ...]:
    """What decides which answers are rotated."""
    return config.answer_order, tuple((zone.name, zone.answer_order) for zone in config.zones)


def rate_limiter(config: Config) -> RateLimiter | None:
    """One per listener (each counts its own clients); None while the limit is off."""
    return RateLimiter(config.rate_limit) if config.rate_limit else None


def build_resolver(
    config: Config,
    metrics: Counters,
    cache: TtlCache | None = None,
    endpoints: EndpointTable | None = None,
    cloudmap: Mapping[str, CloudMapSource] | None = None,
    shaper: Shaper | None = None,
    rotator: Rotator | None = None,
    budget: PacketBudget | None = None,
) -> Resolver:
    """The query path for `config`; a reload passes the cache (with its shaped and rotated
    pools) and the endpoints to keep."""
    cloudmap = cloudmap or {}

    def upstream_set(upstreams: tuple[HostPort, ...], policy: str | None) -> UpstreamSet[HostPort]:
        return UpstreamSet(
            upstreams,
            policy=policy or config.upstream.policy,
            max_fails=config.upstream.max_fails,
        )

    router = ZoneRouter(
        upstream_set(config.upstreams, None),
        {
            zone.name: upstream_set(zone.upstreams, zone.policy)
            for zone in config.zones
            if zone.upstreams  # a discovery zone without upstreams uses the default ones
        },
    )
    discovery: ZoneRouter[DiscoveryZone | None] = ZoneRouter(None, {})
    if config.discovery_zones():
        from sidecar import discovery_wiring as wiring

        discovery = ZoneRouter(None, wiring.discovery_zones(config, cloudmap))
        endpoints = wiring.endpoint_table(config, metrics, endpoints)
    rotate = ZoneRouter(
        config.answer_order == "rotate",
        {
            zone.name: zone.answer_order == "rotate"
            for zone in config.zones
            if zone.answer_order is not None
        },
    )
    if cache is None:
        cache = TtlCache(config.cache, metrics)
    else:
        cache.limits = config.cache
    # The upstream packet budget: one per process, kept across reloads, each worker a share.
    rate = config.upstream.max_packets_per_second / config.workers
    if budget is None:
        budget = PacketBudget(rate, CLOCK())
    else:
        budget.resize(rate, CLOCK())
    resolver = Resolver(
        cache,
        router,
        Forwarder(
            SocketExchanges(metrics),
            metrics,
            attempt_timeout=config.attempt_timeout,
            clock=CLOCK,
            budget=budget,
        ),
        metrics,
        query_timeout=config.query_timeout,
        max_inflight=config.upstream.max_inflight,
        stale_answer_after=config.cache.stale_answer_after,
        stale_ttl=config.cache.stale_ttl,
        discovery=discovery,
        endpoints=endpoints,
        shaper=shaper,
        rotate=rotate,
        rotator=rotator,
        clock=CLOCK,
    )
    for source in cloudmap.values():
        source.calls = metrics.cloudmap_calls
        source.on_change = resolver.registry_changed
    return resolver


@dataclass
class Server:
    """The running listeners of one process and the background work that serves them."""

    config: Config
    resolver: Resolver
    metrics: Counters
    udp: list[tuple[asyncio.DatagramTransport | UdpReaderThread, UdpListener]] = field(
        default_factory=list
    )
    udp_sockets: list[socket.socket] = field(default_factory=list)  # for their kernel drops
    tcp_servers: list[asyncio.Server] = field(default_factory=list)
    tcp: TcpListener | None = None
    http_server: asyncio.Server | None = None
    ready: bool = False
    not_ready_reason: str = "starting"
    background: list[asyncio.Task[None]] = field(default_factory=list)
    cloudmap: dict[str, CloudMapSource] = field(default_factory=dict)
    resolv_original: resolv_conf.Original | None = None  # manage_resolv_conf: what to put back
    worker: int = 0  # with workers > 1: this process's number
    loop_found: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._refresh_rows_ahead()
        access = ClientFilter(self.config.allow)
        self.tcp = TcpListener(
            self.resolver,
            self.metrics,
            idle_timeout=self.config.tcp.idle_timeout,
            max_connections=self.config.tcp.max_connections,
            message_timeout=self.config.tcp.message_timeout,
            access=access,
            log_queries=self.config.log_queries,
        )
        for address in self.config.listen:
            reuse_port = self.config.workers > 1  # the kernel spreads queries over workers
            protocol = UdpListener(
                self.resolver,
                self.metrics,
                max_pending=self.config.max_pending,
                log_queries=self.config.log_queries,
                access=access,
                limiter=rate_limiter(self.config),
            )
            sock = sockets.udp_socket(address.host, address.port, reuse_port=reuse_port)
            self.udp_sockets.append(sock)
            transport: asyncio.DatagramTransport | UdpReaderThread
            if self.config.udp_reader_thread and datagram_batch.available():
                transport = UdpReaderThread(sock, f"udp {address}", self.metrics.dropped)
                protocol.read_in_thread(transport, loop)
            else:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: protocol,  # noqa: B023  # called before this await returns
                    sock=sock,
                )
            self.udp.append((transport, protocol))
            listener = sockets.tcp_listener(address.host, address.port, reuse_port=reuse_port)
            self.tcp_servers.append(
                await asyncio.start_server(self.tcp.handle, sock=listener, backlog=512)
            )
        http = HttpListener(
            self.metrics_registry,
            lambda: (self.ready, self.not_ready_reason),
            self.endpoint_table,
        )
        where = self.config.metrics_listen
        self.http_server = await http.start(where.host, where.port + self.worker)
        self._start_background()

    def _refresh_rows_ahead(self) -> None:
        """Give the current resolver's fast path its timer (core/fast_path.py)."""
        fast, loop, clock = self.resolver.fast, asyncio.get_running_loop(), self.resolver.clock

        # REFRESH_BATCH rows a turn; a reader thread may answer between two turns.
        refresh_due = in_turns(lambda: fast.refresh_due(clock()), loop)

        def on_due(at: float) -> None:
            loop.call_later(max(0.0, at - clock()), refresh_due)

        fast.on_due = on_due

        # All counted a turn, then REFRESH_BATCH rows made; a reader thread may answer between.
        drain_turn = in_turns(lambda: fast.drain_turn(clock()), loop)

        def on_backlog() -> None:  # from a reader thread: count its hand-off soon
            loop.call_soon_threadsafe(drain_turn)

        fast.on_backlog = on_backlog

    def watch_loops(self, token: str) -> None:
        """Loop probes (with this token, shared by all workers) reaching the resolver at any
        time stop the sidecar: a loop found by another worker's probe counts too."""
        self.resolver.set_loop_token(token)
        self.resolver.on_loop = lambda _path: self.loop_found.set()

    def metrics_registry(self) -> CollectorRegistry:
        """The Prometheus registry of this server's counters (at the first /metrics request:
        its imports wait until then, see server/http.py)."""
        from sidecar.metrics import registry

        return registry(self.metrics, self.snapshot)

    def snapshot(self) -> Snapshot:
        """At scrape time: the current resolver's state (a reload replaces it)."""
        self.metrics.dropped["kernel"] = sum(map(sockets.kernel_drops, self.udp_sockets))
        return self.resolver.snapshot()

    def endpoint_table(self) -> object:
        """/debug/endpoints and `dns-sidecar status`: the endpoint table as JSON."""
        table = self.resolver.endpoints
        checks = {z.name: str(z.health_check) for z in self.config.discovery_zones()}
        return {
            "discovery_zones": checks,
            "endpoints": [] if table is None else table.describe(self.resolver.clock()),
        }

    def _start_background(self) -> None:
        """(Re)start the background work of the current resolver and configuration."""
        for task in self.background:
            task.cancel()
        resolver, config = self.resolver, self.config
        work = [
            probe_down_upstreams(
                resolver.forwarder,
                [ups for _zone, ups in resolver.router.targets()],
                name_to_wire(config.upstream.probe_name) + TYPE_NS_IN,
                config.upstream.probe_interval,
            )
        ]
        if config.discovery_zones():
            from sidecar import discovery_wiring as wiring

            work.extend(wiring.background_work(config, resolver, self.cloudmap))
        self.background = [asyncio.ensure_future(coro) for coro in work]

    async def find_loops(self, send: bool = True) -> list[str]:
        """Ask every upstream for a name below its zone that no one else asks; report those
        that reach us (`send=False`: another worker asks, this one only listens).

        Like CoreDNS's `loop`: a forwarder that sends our own query back to us would make
        every miss circle until its deadline. Sent once, after the listeners are up.
        """
        resolver = self.resolver
        probes = resolver.loop_probes()
        if send:

            async def probe(server: HostPort, question: bytes) -> None:
                with contextlib.suppress(UpstreamError):
                    await resolver.forwarder.probe(server, question)

            await asyncio.gather(*(probe(server, question) for server, question in probes))
        return resolver.loops_seen

    def use(self, config: Config) -> None:
        """Apply a reloaded configuration; the cache survives when routing did not change."""
        keep = self.config.routing() == config.routing()
        self.cloudmap = cloudmap_sources(config)
        old = self.resolver
        self.resolver = build_resolver(
            config,
            self.metrics,
            self.resolver.cache if keep else None,
            self.resolver.endpoints,  # endpoint health survives any reload
            self.cloudmap,
            self.resolver.shaper if keep else None,
            # Pools made under another answer order go; their entries are served as the
            # upstream sent them until refreshed (their charges stay until they retire).
            self.resolver.rotator
            if keep and answer_orders(self.config) == answer_orders(config)
            else None,
            old.forwarder.budget,
        )
        self.watch_loops(old.loop_token)
        old.fast.clear()  # its rows may answer differently now; their counts are kept
        self._refresh_rows_ahead()
        old.forwarder.close()  # its sockets close as the queries still on them end
        access = ClientFilter(config.allow)
        for _transport, protocol in self.udp:
            protocol.configure(
                self.resolver,
                access=access,
                limiter=rate_limiter(config),
                max_pending=config.max_pending,
            )
        if self.tcp is not None:
            self.tcp.configure(
                self.resolver,
                access=access,
                idle_timeout=config.tcp.idle_timeout,
                max_connections=config.tcp.max_connections,
                message_timeout=config.tcp.message_timeout,
            )
        self.config = config
        self._start_background()

    def release_resolv_conf(self) -> None:
        """Put back the resolv.conf taken over at start; once, before the listeners close."""
        original, self.resolv_original = self.resolv_original, None
        if original is None:
            return
        log = logs.get()
        try:
            restored = resolv_conf.restore(original)
        except OSError as exc:
            log.error("cannot restore resolv.conf", extra={"fields": {"error": str(exc)}})
            return
        if restored:
            log.info("resolv.conf restored", extra={"fields": {"path": original.path}})
        else:
            log.warning("resolv.conf was changed by someone else; left as it is")

    async def drain(self, grace: float) -> None:
        """Stop taking new work, answer what is in flight (up to `grace` s), close."""
        self.release_resolv_conf()
        for task in self.background:
            task.cancel()
        for server in self.tcp_servers:
            server.close()
        tcp = self.tcp
        for _transport, protocol in self.udp:
            protocol.drain()
        if tcp is not None:
            tcp.drain()
        pending: set[asyncio.Future[None]] = {protocol.settled() for _t, protocol in self.udp}
        if tcp is not None:
            pending |= tcp.pending
        if pending:
            await asyncio.wait(pending, timeout=grace)
        if tcp is not None:
            await tcp.close_connections(timeout=1.0)
        for transport, _protocol in self.udp:
            transport.close()
        self.resolver.forwarder.close(now=True)  # what is still in flight ends here
        for server in self.tcp_servers:
            await server.wait_closed()
        if self.http_server is not None:
            self.http_server.close()
            await self.http_server.wait_closed()


async def serve(
    config: Config,
    reload: Callable[[], Config] | None = None,
    started: Callable[[Server], None] | None = None,
    *,
    worker: int = 0,
    loop_token: str | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT; the exit code. `worker`/`loop_token`: see run()."""
    log = logs.get()
    counters = Counters()
    cloudmap = cloudmap_sources(config)
    server = Server(config, build_resolver(config, counters, cloudmap=cloudmap), counters)
    server.cloudmap = cloudmap
    server.worker = worker
    server.watch_loops(loop_token or server.resolver.loop_token)
    try:
        await server.start()
    except OSError as exc:
        where = exc.fields() if isinstance(exc, sockets.CannotListen) else {}
        log.error("cannot listen", extra={"fields": {**where, "error": str(exc)}})
        await server.drain(0)
        return 1
    if config.manage_resolv_conf and worker == 0:  # listeners up: point resolv.conf at us
        try:
            server.resolv_original = resolv_conf.take_over(config.resolv_conf_path, config.listen)
        except (OSError, ConfigError) as exc:
            log.error("cannot manage resolv.conf", extra={"fields": {"error": str(exc)}})
            await server.drain(0)
            return 1
        fields = {
            "path": server.resolv_original.path,
            "nameserver": server.resolv_original.nameserver,
        }
        log.info("resolv.conf taken over", extra={"fields": fields})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, lambda: _reload(server, reload))
    log.info("started", extra={"fields": {**config.describe(), "worker": worker}})
    if config.udp_reader_thread and not datagram_batch.available():
        log.warning("udp_reader_thread: no recvmmsg here (not Linux); the event loop reads UDP")
    await server.find_loops(send=worker == 0)
    # What start-up made lives as long as the process: out of the collector's sight, so that
    # a full collection walks only what serving made since (a pause every answer waiting
    # behind it would show); the young threshold for serving. A second after the loop check
    # (collector.SETTLE_AFTER), so that its one full collection is not in the way of the
    # first answers.
    loop.call_later(collector.SETTLE_AFTER, collector.settle)
    if not server.loop_found.is_set():
        server.ready, server.not_ready_reason = True, ""
        if started is not None:
            started(server)
        stopped = asyncio.ensure_future(stop.wait())
        looped = asyncio.ensure_future(server.loop_found.wait())
        await asyncio.wait((stopped, looped), return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        looped.cancel()
    if server.loop_found.is_set():
        for loop_path in dict.fromkeys(server.resolver.loops_seen):
            log.error(
                "forwarding loop: our own query came back to us; refusing to run",
                extra={"fields": {"loop": loop_path}},
            )
        server.release_resolv_conf()
        await server.drain(0)
        return 1
    server.release_resolv_conf()  # the task's clients go back to the original nameservers
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
    if config.workers == 1:
        return uvloop.run(serve(config, reload))
    return supervise(config, reload)


def supervise(config: Config, reload: Callable[[], Config] | None) -> int:
    """`workers` > 1: fork the workers, pass SIGTERM/SIGINT/SIGHUP on to them, wait. If one
    exits with an error, stop the others and exit with that code. The workers share one loop
    token, so a loop probe sent by worker 0 is recognised by whichever worker it reaches.

    They are forked from this fully imported process (their pages shared copy-on-write, and
    kept shared: gc.freeze() keeps their collections off the objects they inherit); then this
    process becomes the lean parent of sidecar/supervisor.py."""
    token = os.urandom(6).hex()
    # Held until the parent's handlers are in place (see sidecar/supervisor.py).
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, supervisor.FORWARDED)
    if config.discovery_zones():  # imported here once, its pages shared by the workers
        import sidecar.discovery_wiring  # noqa: F401
    gc.collect()
    gc.freeze()
    gc.enable()  # off for start-up (sidecar/launch.py): the parent lives on, the workers settle
    children: list[int] = []
    try:
        for worker in range(config.workers):
            pid = os.fork()
            if pid == 0:  # the worker: its own event loop, never returns to the caller
                code = 1
                try:
                    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                    code = uvloop.run(serve(config, reload, worker=worker, loop_token=token))
                finally:
                    os._exit(code)
            children.append(pid)
    except OSError:  # no fork: the sidecar must not half-run
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise
    supervisor.become_lean(children, config.log_format, config.log_level)

    def log_error(message: str, fields: dict[str, object]) -> None:
        logs.get().error(message, extra={"fields": fields})

    return supervisor.supervise(children, log_error)


__all__ = ["HostPort", "Server", "build_resolver", "run", "serve"]
