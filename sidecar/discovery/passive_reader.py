"""The socket-diagnostics reader: a netlink dump of the application's TCP connections to the
known endpoints every `interval`, handed to the endpoint table.

Cost: with 1,000 application connections a dump of every one of them costs ~3 ms of CPU
(kernel and parsing; 400 bytes of tcp_info a socket), so only connects (SYN_SENT: few, and what
a blackhole shows first) are read every round; established connections (RTT, retransmissions)
are read every ESTABLISHED_EVERY-th round (1 s at the default interval) and stand in between.
A round whose dump would find nothing is skipped, from the namespace's TCP counters
(discovery/tcp_counters.py). Destinations are dumped per (family, port) so the kernel's port
filter applies, unless they have more than MAX_PORT_DUMPS ports (then one dump of the family,
filtered in user space).

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
    CONNECTED,
    CONNECTING,
    NETLINK_SOCK_DIAG,
    TCP_SYN_SENT,
    TcpSocket,
    destination_key,
    dump_request,
    parse_dump,
)
from sidecar.discovery.tcp_counters import DumpGate, read_counters

Destination = tuple[str, int]  # endpoint address, port
ESTABLISHED_EVERY = 4  # rounds between two reads of the established connections
MAX_PORT_DUMPS = 8  # destination ports per family dumped one by one, at most


def _dumps(destinations: set[Destination]) -> list[tuple[int, int | None, list[Destination]]]:
    """(family, port or None for any, destinations) of each dump that covers `destinations`."""
    out: list[tuple[int, int | None, list[Destination]]] = []
    for family, version in ((AF_INET, 4), (AF_INET6, 6)):
        wanted = [d for d in destinations if (":" in d[0]) == (version == 6)]
        ports = sorted({port for _, port in wanted})
        if len(ports) > MAX_PORT_DUMPS:
            out.append((family, None, wanted))
        else:
            out += [(family, p, [d for d in wanted if d[1] == p]) for p in ports]
    return out


def dump(
    destinations: set[Destination], max_sockets: int, states: int = CONNECTING | CONNECTED
) -> list[TcpSocket]:
    """The TCP sockets of this namespace in `states` (sock_diag bits) connected or connecting
    to `destinations`, at most `max_sockets`. Raises OSError (or sock_diag.DumpError) where
    socket diagnostics fail."""
    found: list[TcpSocket] = []
    keys = {destination_key(address, port) for address, port in destinations}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as sock:
        for seq, (family, port, wanted) in enumerate(_dumps(destinations), 1):
            sock.send(dump_request(family, wanted, seq, states=states, port=port))
            done = False
            while not done:  # read to the end even past the cap: the next dump needs it
                sockets, done = parse_dump(sock.recv(1 << 16), keys)
                found += sockets[: max(max_sockets - len(found), 0)]
    return found


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
    table.on_first.append(endpoints_added.set)
    rounds = 0
    gate = DumpGate()
    try:
        while True:
            if not table.endpoints:
                endpoints_added.clear()
                await endpoints_added.wait()
                continue
            destinations = frozenset(
                (e.address, check.port if e.port is None else e.port)
                for e in table.endpoints.values()
                if (check := checks.get(e.zone)) is not None
            )
            now = clock()
            complete = rounds % ESTABLISHED_EVERY == 0
            rounds += 1
            counters = read_counters()
            states = CONNECTING if gate.need_connects(counters, destinations) else 0
            if complete and gate.need_established(counters):
                states |= CONNECTED
            sockets = []
            if states:
                try:
                    sockets = dump(set(destinations), settings.max_sockets, states)
                except OSError:  # e.g. ENOBUFS under memory pressure: this round sees nothing
                    states = 0
            if states & CONNECTING:
                found = any(s.state == TCP_SYN_SENT for s in sockets)
                gate.dumped(counters, destinations, found)
            traffic = watch.summarise(sockets, now, complete=complete)
            for endpoint, reason in table.passive(traffic, now):
                logs.endpoint_changed(
                    endpoint.zone,
                    endpoint.name,
                    endpoint.health_name,
                    now,
                    source="passive",
                    reason=reason,
                )
            await asyncio.sleep(settings.interval)
    finally:
        table.on_first.remove(endpoints_added.set)
