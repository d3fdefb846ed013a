"""The socket-diagnostics reader: one netlink dump of the application's TCP connections to the
known endpoints every `interval`, handed to the endpoint table.

The wire format is in discovery/sock_diag.py, what a dump means in discovery/passive.py and
discovery/endpoints.py; this module only opens the netlink socket and keeps time. It reads the
sockets of the network namespace it runs in: in `host` and `awsvpc` mode (Fargate included)
that is the application's; a sidecar in another namespace sees none of them. No privilege is
needed. The loop sleeps, with no timer, while the table has no endpoint.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Mapping
from time import monotonic

from sidecar import logs
from sidecar.config import HealthCheck
from sidecar.discovery.endpoints import EndpointTable
from sidecar.discovery.passive import PassiveSettings, PassiveWatch
from sidecar.discovery.sock_diag import (
    AF_INET,
    AF_INET6,
    NETLINK_SOCK_DIAG,
    TcpSocket,
    destination_key,
    dump_request,
    parse_dump,
)

Destination = tuple[str, int]  # endpoint address, port


def dump(destinations: set[Destination], max_sockets: int) -> list[TcpSocket]:
    """The TCP sockets of this namespace connected or connecting to `destinations`, at most
    `max_sockets`. Raises OSError (or sock_diag.DumpError) where socket diagnostics fail."""
    found: list[TcpSocket] = []
    keys = {destination_key(address, port) for address, port in destinations}
    for family, version in ((AF_INET, 4), (AF_INET6, 6)):
        wanted = [d for d in destinations if (":" in d[0]) == (version == 6)]
        if not wanted:
            continue
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as sock:
            sock.send(dump_request(family, list(wanted), seq=1))
            done = False
            while not done and len(found) < max_sockets:
                sockets, done = parse_dump(sock.recv(1 << 16), keys)
                found += sockets
    return found[:max_sockets]


def unavailable() -> str | None:
    """Why socket diagnostics cannot be read here, or None when they can."""
    if not hasattr(socket, "AF_NETLINK"):
        return "no netlink on this platform"
    try:
        dump({("127.0.0.1", 1)}, 1)
    except Exception as e:  # OSError, DumpError: whatever the kernel says, passive is off
        return f"socket diagnostics failed: {e!r}"
    return None


async def run_passive_health(
    table: EndpointTable,
    checks: Mapping[str, HealthCheck],
    settings: PassiveSettings,
    clock: Callable[[], float] = monotonic,
) -> None:
    """Forever: dump the application's connections to the table's endpoints (at the zone's
    check port) every `settings.interval` and apply them; demotions are logged."""
    watch = PassiveWatch(settings)
    endpoints_added = asyncio.Event()
    table.on_first = endpoints_added.set
    try:
        while True:
            if not table.endpoints:
                endpoints_added.clear()
                await endpoints_added.wait()
                continue
            destinations: set[Destination] = {
                (e.address, check.port)
                for e in table.endpoints.values()
                if (check := checks.get(e.zone)) is not None
            }
            now = clock()
            try:
                sockets = dump(destinations, settings.max_sockets)
            except OSError:  # e.g. ENOBUFS under memory pressure: this round sees nothing
                sockets = []
            traffic = watch.summarise(sockets, now)
            for endpoint, reason in table.passive(traffic, now):
                logs.endpoint_changed(
                    endpoint.zone,
                    endpoint.address,
                    endpoint.health_name,
                    now,
                    source="passive",
                    reason=reason,
                )
            await asyncio.sleep(settings.interval)
    finally:
        table.on_first = None
