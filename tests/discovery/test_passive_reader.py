"""The reader against this machine's kernel: real loopback connections, real netlink dumps."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from sidecar.discovery import passive_reader
from sidecar.discovery.sock_diag import CONNECTED, CONNECTING, TCP_ESTABLISHED

pytestmark = pytest.mark.skipif(
    passive_reader.unavailable() is not None, reason="no socket diagnostics here"
)


@pytest.fixture
def connected() -> Iterator[tuple[int, int]]:
    """Three connections to one listener and two to another, both ends in this process."""
    servers = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    ends: list[socket.socket] = []
    for server, count in zip(servers, (3, 2), strict=True):
        for _ in range(count):
            ends.append(socket.create_connection(server.getsockname()))
            ends.append(server.accept()[0])
    try:
        yield servers[0].getsockname()[1], servers[1].getsockname()[1]
    finally:
        for s in ends + servers:
            s.close()


def test_a_dump_returns_the_connections_to_the_destinations_only(
    connected: tuple[int, int],
) -> None:
    first, second = connected
    found = passive_reader.dump({("127.0.0.1", first)}, 100)
    assert [(s.port, s.state) for s in found] == [(first, TCP_ESTABLISHED)] * 3
    both = passive_reader.dump({("127.0.0.1", first), ("127.0.0.1", second)}, 100)
    assert sorted(s.port for s in both) == sorted([first] * 3 + [second] * 2)
    assert passive_reader.dump({("127.0.0.1", first)}, 100, CONNECTING) == []
    assert len(passive_reader.dump({("127.0.0.1", first)}, 2, CONNECTING | CONNECTED)) == 2


def test_many_ports_are_one_dump_filtered_here(connected: tuple[int, int]) -> None:
    first, _ = connected
    others = {("127.0.0.1", port) for port in range(1, passive_reader.MAX_PORT_DUMPS + 1)}
    assert len(passive_reader._dumps(others | {("127.0.0.1", first)})) == 1
    found = passive_reader.dump(others | {("127.0.0.1", first)}, 100)
    assert [s.port for s in found] == [first] * 3
