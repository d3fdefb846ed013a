"""Who may ask: the client networks allowed (`allow`) and an optional per-client rate limit.

Theory of operation
- A sidecar bound to 0.0.0.0 on an instance with a public address must not be an open resolver
  (amplification, cache snooping). So only clients in `allow` are served; by default loopback,
  RFC 1918, RFC 6598 (carrier-grade NAT), link-local and unique-local IPv6: the addresses a
  task and its VPC can have, and nothing routable from the internet.
- The check runs for every datagram, so its verdict is kept per client address string in a
  dict (`verdicts`) that the UDP listener reads directly: one dict lookup for a known client.
  The dict is bounded (`MAX_VERDICTS`); when full it is emptied, so spoofed source addresses
  cost at most one address parse each and never memory.
- An IPv4 client reaching an IPv6 socket appears as ::ffff:a.b.c.d and is judged as a.b.c.d.
- The rate limit is a token bucket per client address: `rate` queries per second, bursts of
  up to `rate` at once. The table of buckets is bounded (`MAX_CLIENTS`, oldest forgotten
  first). Off (None) by default: a task's own processes are trusted to be busy.

No sockets here; time comes in as `now`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_ALLOW = (
    "127.0.0.0/8",  # loopback
    "::1/128",
    "10.0.0.0/8",  # RFC 1918
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",  # RFC 6598, shared address space
    "169.254.0.0/16",  # link-local (the ECS task metadata and Route 53 Resolver live here)
    "fc00::/7",  # unique local IPv6
    "fe80::/10",  # link-local IPv6
)

MAX_VERDICTS = 4096
MAX_CLIENTS = 10_000


class ClientFilter:
    """Is a client address inside one of the allowed networks? Verdicts are cached."""

    def __init__(self, networks: Sequence[IpNetwork]) -> None:
        self.networks = tuple(networks)
        # (first, last) address as integers, per IP version: no ipaddress objects per query.
        self._ranges: dict[int, tuple[tuple[int, int], ...]] = {
            version: tuple(
                (int(net.network_address), int(net.broadcast_address))
                for net in self.networks
                if net.version == version
            )
            for version in (4, 6)
        }
        # Keyed by the address as the socket reports it (a str; typed as the socket layer
        # types it, so the listener can look it up without a conversion).
        self.verdicts: dict[str | int, bool] = {}

    def __repr__(self) -> str:
        return f"<ClientFilter allow={[str(n) for n in self.networks]} known={len(self.verdicts)}>"

    @property
    def allows_everyone(self) -> bool:
        """Every IPv4 and IPv6 address is allowed (the default): no check is needed."""
        return {4, 6} <= {net.version for net in self.networks if net.prefixlen == 0}

    def allowed(self, host: str | int) -> bool:
        verdict = self.verdicts.get(host)
        if verdict is None:
            verdict = self.check(host)
        return verdict

    def check(self, host: str | int) -> bool:
        """Judge `host` (an address as the socket reports it) and remember the verdict."""
        verdict = self._judge(str(host))
        if len(self.verdicts) >= MAX_VERDICTS:
            self.verdicts.clear()
        self.verdicts[host] = verdict
        return verdict

    def _judge(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False  # not an IP address (a UNIX socket path, say): not a client we know
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        value = int(ip)
        return any(first <= value <= last for first, last in self._ranges[ip.version])


class RateLimiter:
    """A token bucket per client: `rate` queries per second, bursts of up to `rate`."""

    def __init__(self, rate: float, max_clients: int = MAX_CLIENTS) -> None:
        self.rate = rate
        self.burst = max(rate, 1.0)
        self.max_clients = max_clients
        self._buckets: dict[str, list[float]] = {}  # client -> [tokens, at]

    def __repr__(self) -> str:
        return f"<RateLimiter rate={self.rate} clients={len(self._buckets)}>"

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, host: str, now: float) -> bool:
        """Take one token from `host`'s bucket; False when it is empty."""
        bucket = self._buckets.get(host)
        if bucket is None:
            if len(self._buckets) >= self.max_clients:
                del self._buckets[next(iter(self._buckets))]  # the oldest client first
            self._buckets[host] = [self.burst - 1.0, now]
            return True
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True


def parse_networks(texts: Sequence[str]) -> tuple[IpNetwork, ...]:
    """Networks from CIDR strings (the defaults, tests; sidecar.config validates user input)."""
    return tuple(ipaddress.ip_network(text) for text in texts)


EVERYONE = parse_networks(("0.0.0.0/0", "::/0"))
