"""Addresses: an IP literal and a port. A leaf module, imported by the configuration, the core
and the servers alike.

Besides the value itself it owns the two questions every part of the sidecar asks of a listen
address, so that each is answered once: where a local client reaches it (a wildcard is reached
through loopback) and whether a datagram sent to some address could arrive at it (a forwarding
loop). Parsing lives here too, because the helper commands (healthcheck, status) parse an
``--address`` without loading the whole configuration.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import NamedTuple

from sidecar.errors import ConfigError

DNS_PORT = 53

HOSTPORT_ALLOWED = (
    "an IP address with an optional port: 1.2.3.4, 1.2.3.4:53, ::1, [::1] or [::1]:53 "
    "(no hostnames; port 1..65535)"
)


class HostPort(NamedTuple):
    """An IP literal and a port; ``host`` is normalized by :mod:`ipaddress`, without brackets.
    A tuple: hashed and compared in C (a miss looks an upstream up in three dicts)."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@functools.lru_cache(maxsize=256)
def label(server: HostPort) -> str:
    """`str(server)`, made once per server: the metrics' label (one per upstream reply)."""
    return str(server)


def _parse_port(text: str, whole: str, key: str) -> int:
    if not text.isascii() or not text.isdigit():  # int() would also take "+53", " 53", "٥٣"
        raise ConfigError(key, whole, HOSTPORT_ALLOWED)
    port = int(text)
    if not 1 <= port <= 65535:
        raise ConfigError(key, whole, "port must be 1..65535")
    return port


def parse_hostport(text: str, default_port: int, key: str) -> HostPort:
    """Parse ``1.2.3.4``, ``1.2.3.4:53``, ``::1``, ``[::1]`` or ``[::1]:53``.

    Errors are ConfigErrors naming ``key``: every caller reads an operator's setting or flag.
    """
    s = text.strip()
    port = default_port
    want_v6 = False
    if s.startswith("["):
        close = s.find("]")
        if close < 0:
            raise ConfigError(key, text, HOSTPORT_ALLOWED)
        host, rest = s[1:close], s[close + 1 :]
        want_v6 = True
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(key, text, HOSTPORT_ALLOWED)
            port = _parse_port(rest[1:], text, key)
    elif s.count(":") == 1:
        host, port_text = s.split(":")
        port = _parse_port(port_text, text, key)
    else:
        host = s  # an IPv4 address without port, or a bare IPv6 address
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(key, text, HOSTPORT_ALLOWED) from None
    if want_v6 and ip.version != 6:
        raise ConfigError(key, text, "brackets are only for IPv6 addresses")
    return HostPort(str(ip), port)


def is_wildcard(host: str) -> bool:
    """Whether ``host`` is an unspecified address (0.0.0.0 or ::): a socket bound to it
    receives on every local address."""
    return ipaddress.ip_address(host).is_unspecified


def reachable_at(listen: HostPort) -> HostPort:
    """Where a client on this host reaches a socket listening on ``listen``.

    A wildcard cannot be a destination, so it is reached through the loopback address of its
    family (0.0.0.0 through 127.0.0.1, :: through ::1); any other address is its own answer.
    """
    if not is_wildcard(listen.host):
        return listen
    loopback = "::1" if ipaddress.ip_address(listen.host).version == 6 else "127.0.0.1"
    return HostPort(loopback, listen.port)


def covers(listen: HostPort, addr: HostPort, *, wildcard_covers_all: bool) -> bool:
    """Whether a datagram sent to ``addr`` could arrive at our socket listening on ``listen``.

    A wildcard listen address certainly receives what is sent to loopback (of either family:
    an IPv6 socket may take IPv4 too) or to a wildcard. With ``wildcard_covers_all`` it is
    assumed to receive on every address, since the host's own addresses are not known here:
    the safe guess when picking upstreams from resolv.conf (a wrong guess only skips a
    candidate), while a configured upstream is rejected only when it certainly is us.
    """
    if listen.port != addr.port:
        return False
    if listen.host == addr.host:
        return True
    if not is_wildcard(listen.host):
        return False
    ip = ipaddress.ip_address(addr.host)
    return wildcard_covers_all or ip.is_loopback or ip.is_unspecified
