"""The leaf address module: where a local client reaches a listen address, and what it covers."""

from __future__ import annotations

import pytest

from sidecar.addresses import HostPort, covers, is_wildcard, parse_hostport, reachable_at


@pytest.mark.parametrize(
    ("listen", "reached"),
    [
        (HostPort("0.0.0.0", 53), HostPort("127.0.0.1", 53)),
        (HostPort("::", 5353), HostPort("::1", 5353)),
        (HostPort("127.0.0.1", 53), HostPort("127.0.0.1", 53)),
        (HostPort("10.0.0.2", 9153), HostPort("10.0.0.2", 9153)),
        (HostPort("::1", 53), HostPort("::1", 53)),
        (HostPort("fd00::2", 53), HostPort("fd00::2", 53)),
    ],
)
def test_a_wildcard_is_reached_through_the_loopback_of_its_family(
    listen: HostPort, reached: HostPort
) -> None:
    assert reachable_at(listen) == reached


@pytest.mark.parametrize(
    ("host", "wildcard"),
    [("0.0.0.0", True), ("::", True), ("127.0.0.1", False), ("::1", False), ("10.0.0.2", False)],
)
def test_is_wildcard(host: str, wildcard: bool) -> None:
    assert is_wildcard(host) is wildcard


@pytest.mark.parametrize(
    ("listen", "addr", "certain", "assumed"),
    [
        ("127.0.0.1:53", "127.0.0.1:53", True, True),  # the same address
        ("127.0.0.1:53", "127.0.0.1:5353", False, False),  # another port is never us
        ("127.0.0.1:53", "10.0.0.2:53", False, False),
        ("0.0.0.0:53", "127.0.0.1:53", True, True),  # a wildcard takes loopback
        ("0.0.0.0:53", "127.0.0.53:53", True, True),  # all of 127/8
        ("::", "::1", True, True),
        ("::", "127.0.0.1", True, True),  # an IPv6 socket may take IPv4 too
        ("0.0.0.0:53", "0.0.0.0:53", True, True),
        ("0.0.0.0:53", "10.0.0.2:53", False, True),  # maybe one of our addresses
        ("0.0.0.0:5353", "10.0.0.2:53", False, False),
    ],
)
def test_covers(listen: str, addr: str, certain: bool, assumed: bool) -> None:
    ours, to = parse_hostport(listen, 53, "listen"), parse_hostport(addr, 53, "upstreams")
    assert covers(ours, to, wildcard_covers_all=False) is certain
    assert covers(ours, to, wildcard_covers_all=True) is assumed
