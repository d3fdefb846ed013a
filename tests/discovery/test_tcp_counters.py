"""The namespace's TCP counters and when they let the passive reader skip a dump."""

from __future__ import annotations

import socket

import pytest

from sidecar.discovery.tcp_counters import DumpGate, TcpCounters, parse_snmp, read_counters

SNMP = (
    b"Ip: Forwarding DefaultTTL\nIp: 1 64\n"
    b"Tcp: RtoAlgorithm RtoMin ActiveOpens PassiveOpens CurrEstab\n"
    b"Tcp: 1 200 77242 56269 3\n"
    b"Udp: InDatagrams\nUdp: 5\n"
)
TO = frozenset({("10.0.0.1", 80)})


def test_the_tcp_rows_are_read_by_name() -> None:
    assert parse_snmp(SNMP) == TcpCounters(active_opens=77242, established=3)
    assert parse_snmp(b"Tcp: ActiveOpens\n") is None
    assert parse_snmp(b"Tcp: ActiveOpens CurrEstab\nTcp: x 1\n") is None
    assert parse_snmp(b"") is None
    assert read_counters("/nonexistent/snmp") is None


def test_this_kernel_counts_an_active_open_and_an_established_connection() -> None:
    before = read_counters()
    if before is None:
        pytest.skip("no /proc/net/snmp here")
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        socket.create_connection(server.getsockname()),
        server.accept()[0],
    ):
        during = read_counters()
    assert during is not None
    assert during.active_opens > before.active_opens
    assert during.established >= 2


def test_connects_are_dumped_until_a_dump_finds_none_and_nothing_opened_since() -> None:
    gate = DumpGate()
    quiet = TcpCounters(active_opens=10, established=0)
    assert gate.need_connects(quiet, TO)  # never dumped yet
    gate.dumped(quiet, TO, connects_found=True)
    assert gate.need_connects(quiet, TO)  # a connect found is followed
    gate.dumped(quiet, TO, connects_found=False)
    assert not gate.need_connects(quiet, TO)
    assert gate.need_connects(TcpCounters(11, 0), TO)  # an active open since
    assert gate.need_connects(quiet, TO | {("10.0.0.2", 80)})  # new destinations
    assert gate.need_connects(None, TO)  # counters unreadable: never skip


def test_established_connections_are_read_only_when_there_are_some() -> None:
    assert not DumpGate.need_established(TcpCounters(10, 0))
    assert DumpGate.need_established(TcpCounters(10, 1))
    assert DumpGate.need_established(None)
