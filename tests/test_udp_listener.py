"""The UDP listener's fast path, driven in-process with a recording transport (no sockets)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from dnslib import QTYPE, RR, A, DNSRecord

from sidecar.core import wire
from sidecar.core.counters import Counters
from sidecar.server.udp import UdpListener
from tests.listener_parts import cache_resolver

CLIENT = ("127.0.0.1", 40000)


class Recorder:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendto(self, data: bytes, addr: object) -> None:
        self.sent.append(data)

    def is_closing(self) -> bool:
        return False


def make_listener(shift: list[float], log_queries: float = 0.0) -> UdpListener:
    """A listener on a recording transport, its resolver's clock `shift[0]` s ahead."""
    metrics = Counters()
    resolver = cache_resolver(metrics, clock=lambda: time.monotonic() + shift[0])
    udp = UdpListener(resolver, metrics, log_queries=log_queries)
    udp.connection_made(Recorder())  # type: ignore[arg-type]
    return udp


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    # A miss is forwarded on a loop: give it one of its own (an earlier test's asyncio.run()
    # leaves none set).
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    asyncio.set_event_loop(None)
    loop.close()


@pytest.fixture
def clock() -> list[float]:
    """The resolver's clock, moved by hand: [seconds added to the real monotonic clock]."""
    return [0.0]


@pytest.fixture
def listener(loop: asyncio.AbstractEventLoop, clock: list[float]) -> Iterator[UdpListener]:
    udp = make_listener(clock)
    yield udp

    async def settled() -> None:
        udp.resolver.forwarder.close(now=True)  # what is in flight fails now
        await asyncio.wait_for(udp.settled(), 5.0)

    loop.run_until_complete(settled())


def query(name: str, qid: int) -> bytes:
    record = DNSRecord.question(name)
    record.header.id = qid
    return bytes(record.pack())


def store(udp: UdpListener, name: str, address: str, ttl: int = 60) -> None:
    reply = DNSRecord.question(name).reply()
    reply.add_answer(RR(name, QTYPE.A, rdata=A(address), ttl=ttl))
    msg = bytes(reply.pack())
    q = wire.parse_query(query(name, 1))
    udp.resolver.cache.store(q.key, msg, wire.parse_reply(msg), time.monotonic(), False)


def ask(udp: UdpListener, name: str, qid: int) -> DNSRecord:
    transport = udp.transport
    assert isinstance(transport, Recorder)
    before = len(transport.sent)
    udp.datagram_received(query(name, qid), CLIENT)
    assert len(transport.sent) == before + 1, "no reply (a miss would be forwarded)"
    return DNSRecord.parse(transport.sent[-1])


def test_repeated_queries_take_the_fast_path_with_their_own_id(listener: UdpListener) -> None:
    store(listener, "a.example", "192.0.2.1")
    first = ask(listener, "a.example", 1001)
    assert len(listener.fast) == 0  # asked once: no row yet
    second = ask(listener, "a.example", 1002)
    assert len(listener.fast) == 1  # twice within a second: a row
    third = ask(listener, "a.example", 1003)
    fourth = ask(listener, "a.example", 1004)
    ids = [r.header.id for r in (first, second, third, fourth)]
    assert ids == [1001, 1002, 1003, 1004]
    assert str(fourth.rr[0].rdata) == "192.0.2.1"
    assert listener.fast.get(query("a.example", 1)[2:]).hits == 2  # type: ignore[union-attr]
    listener.fast.flush()  # what a scrape does first
    metrics = listener.metrics
    assert metrics.cache_hits[0] == 4
    assert metrics.responses["cache"][0] == 4
    assert metrics.requests["udp"][QTYPE.A] == 4
    assert sum(metrics.durations["cache"].counts) == 4


def test_a_name_asked_seldom_gets_no_row(listener: UdpListener, clock: list[float]) -> None:
    store(listener, "a.example", "192.0.2.1", ttl=3600)
    for second in range(5):
        clock[0] = second * 1.5
        ask(listener, "a.example", second)
    assert len(listener.fast) == 0 and listener.metrics.cache_hits[0] == 5


def test_a_replaced_entry_is_not_served_from_the_fast_path(listener: UdpListener) -> None:
    store(listener, "a.example", "192.0.2.1")
    ask(listener, "a.example", 1)
    store(listener, "a.example", "192.0.2.2")  # a refresh replaces the entry
    assert len(listener.fast) == 0
    assert str(ask(listener, "a.example", 2).rr[0].rdata) == "192.0.2.2"


def test_ttl_counts_down_on_the_fast_path(listener: UdpListener, clock: list[float]) -> None:
    store(listener, "a.example", "192.0.2.1", ttl=60)
    assert ask(listener, "a.example", 1).rr[0].ttl == 60
    assert ask(listener, "a.example", 1).rr[0].ttl == 60  # now with a row
    clock[0] = 10.2  # ten seconds later
    assert ask(listener, "a.example", 2).rr[0].ttl == 50
    assert len(listener.fast) == 1  # the same row, rendered again


def test_an_expired_entry_leaves_the_fast_path(
    listener: UdpListener, clock: list[float], loop: asyncio.AbstractEventLoop
) -> None:
    store(listener, "a.example", "192.0.2.1", ttl=60)
    ask(listener, "a.example", 1)
    clock[0] = 61.0
    transport = listener.transport
    assert isinstance(transport, Recorder)

    async def asked() -> None:  # a miss is forwarded: on the loop
        listener.datagram_received(query("a.example", 2), CLIENT)

    loop.run_until_complete(asked())
    assert len(transport.sent) == 1  # no reply from the fast path: the miss path takes over
    assert len(listener.fast) == 0 and listener.in_flight == 1


def test_letter_case_is_kept_per_query(listener: UdpListener) -> None:
    store(listener, "a.example", "192.0.2.1")
    assert str(ask(listener, "A.Example", 1).q.qname) == "A.Example."
    assert str(ask(listener, "a.example", 2).q.qname) == "a.example."
    assert str(ask(listener, "A.Example", 3).q.qname) == "A.Example."
    assert len(listener.fast) == 2


def test_draining_stops_the_fast_path(listener: UdpListener) -> None:
    store(listener, "a.example", "192.0.2.1")
    ask(listener, "a.example", 1)
    listener.drain()
    transport = listener.transport
    assert isinstance(transport, Recorder)
    listener.datagram_received(query("a.example", 2), CLIENT)
    assert len(transport.sent) == 1


def test_logging_every_query_bypasses_the_fast_path(loop: asyncio.AbstractEventLoop) -> None:
    listener = make_listener([0.0], log_queries=1e-9)  # sampled so rarely nothing is written
    store(listener, "a.example", "192.0.2.1")
    ask(listener, "a.example", 1)
    ask(listener, "a.example", 2)
    assert len(listener.fast) == 0 and listener.metrics.cache_hits[0] == 2
