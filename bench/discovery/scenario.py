"""What the benchmark does, as data: the timeline, the addresses, the setups compared.

Theory of operation
- One client task (one network namespace, one address, several application processes) calls a
  service of six HTTP backends through a DNS setup under test. The backends and the upstream
  DNS server (the "VPC resolver": NSD serving `local.` with the backends' A records) sit in a
  second namespace on the same /24, as tasks of one awsvpc service do.
- Everything runs on one clock: t = 0 is the start of the measured window, events are seconds
  after it. `Timeline.scaled` shortens the whole timeline (and the record TTL with it) when a
  quicker run is wanted; the defaults are the issue's.
- glibc sorts same-subnet IPv4 answers by the longest prefix shared with the client's address
  (RFC 6724 rule 9). `rule9_order` computes that order; the backend that
  dies is the one the client's glibc puts first and the one that slows down is its second
  choice, so the setups without health checks show what the issue is about.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace

SERVICE = "resource-server.local"
ZONE = "local"
BACKEND_PORT = 8080
SUBNET_PREFIX = 24
CLIENT_ADDR = "10.0.1.88"  # the client task's ENI address (its namespace's veth)
UPSTREAM_ADDR = "10.0.1.2"  # the "VPC resolver": base of the subnet + 2
BACKEND_ADDRS = (
    "10.0.1.23",
    "10.0.1.46",
    "10.0.1.71",
    "10.0.1.104",
    "10.0.1.139",
    "10.0.1.201",
)


def rule9_order(client: str, addresses: list[str] | tuple[str, ...]) -> list[str]:
    """The order glibc's getaddrinfo gives same-subnet IPv4 `addresses` for a client at `client`
    (all in one /SUBNET_PREFIX): longest common prefix with the client first, ties in the
    server's order (glibc's sort is stable on the original position)."""
    me = int(ipaddress.IPv4Address(client))

    def common(address: str) -> int:
        diff = me ^ int(ipaddress.IPv4Address(address))
        return 32 - diff.bit_length()

    return sorted(addresses, key=lambda a: -common(a))


RULE9 = rule9_order(CLIENT_ADDR, BACKEND_ADDRS)
DEAD = RULE9[0]  # glibc's first choice for the client: it dies at `death`
SLOW = RULE9[1]  # glibc's second choice: +100 ms from `slow`


@dataclass(frozen=True)
class Timeline:
    """Seconds after t = 0 (the start of the measured window)."""

    death: float = 10.0  # DEAD's listener closes (connections refused)
    slow: float = 20.0  # SLOW answers `slow_delay` later, health checks included
    deregister_after: float = 30.0  # after the death, DEAD's record leaves the upstream
    back: float = 60.0  # DEAD listens again and is registered again
    duration: float = 75.0  # end of the measured window
    ttl: int = 60  # of the service's A records upstream
    slow_delay: float = 0.100
    warmup: float = 3.0  # clients run this long before t = 0 (not measured)

    @property
    def deregister(self) -> float:
        return self.death + self.deregister_after

    def scaled(self, factor: float) -> Timeline:
        """Every time (and the TTL) times `factor`; delays and the warm-up stay as they are."""
        if factor == 1.0:
            return self
        return replace(
            self,
            death=self.death * factor,
            slow=self.slow * factor,
            deregister_after=self.deregister_after * factor,
            back=self.back * factor,
            duration=self.duration * factor,
            ttl=max(1, round(self.ttl * factor)),
        )

    def events(self) -> list[tuple[float, str]]:
        """(t, what) in time order: what each event does, in words for the report."""
        return sorted(
            [
                (self.death, f"{DEAD} dies (listener closed)"),
                (self.slow, f"{SLOW} answers {self.slow_delay * 1000:.0f} ms slower"),
                (self.deregister, f"{DEAD} deregistered upstream"),
                (self.back, f"{DEAD} back and registered again"),
            ]
        )

    def alive(self, address: str, t: float) -> bool:
        return address != DEAD or not self.death <= t < self.back

    def registered(self, address: str, t: float) -> bool:
        return address != DEAD or not self.deregister <= t < self.back

    def is_slow(self, address: str, t: float) -> bool:
        return address == SLOW and t >= self.slow

    def should_share(self, address: str, t: float) -> bool:
        """Alive, fast and registered at `t`: one of the backends that ought to share the load."""
        return (
            self.alive(address, t) and self.registered(address, t) and not self.is_slow(address, t)
        )


@dataclass(frozen=True)
class Setup:
    """One DNS setup under test: what answers the client task's resolv.conf."""

    key: str
    title: str
    server: str  # "sidecar", "dnsmasq" or "none" (resolv.conf names the upstream itself)
    sidecar_args: tuple[str, ...] = ()


SIDECAR_BASE = (
    "--health-check",
    f"{ZONE}=http:{BACKEND_PORT}/health",
)

SETUPS: dict[str, Setup] = {
    s.key: s
    for s in (
        Setup(
            "sidecar",
            "sidecar, health checks, max-answers 1",
            "sidecar",
            (*SIDECAR_BASE, "--max-answers", f"{ZONE}=1"),
        ),
        Setup("sidecar-whole", "sidecar, health checks, whole answers", "sidecar", SIDECAR_BASE),
        Setup("direct", "direct to the upstream (no local cache)", "none"),
        Setup("dnsmasq", "dnsmasq as a plain local cache", "dnsmasq"),
    )
}
# The three. sidecar-whole (whole answers: what glibc's re-sorting does to them) is
# left out by default to keep the run under one of the two cores: `--setups all` adds it.
DEFAULT_SETUPS = ("sidecar", "direct", "dnsmasq")
