"""Admission on the UDP listener, in-process with a recording transport (no sockets): the
allowed networks, REFUSED for others, silence for their garbage, the rate limit, reloads.
"""

from __future__ import annotations

import time

import pytest
from dnslib import QTYPE, RR, A, DNSRecord

from sidecar.core import wire
from sidecar.core.access import ClientFilter, RateLimiter, parse_networks
from sidecar.core.counters import Counters
from sidecar.server.udp import UdpListener
from tests.listener_parts import cache_resolver

ALLOWED = ("127.0.0.1", 40000)
OUTSIDER = ("127.0.0.12", 40000)


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, object]] = []

    def sendto(self, data: bytes, addr: object) -> None:
        self.sent.append((data, addr))

    def is_closing(self) -> bool:
        return False


def make_listener(limiter: RateLimiter | None = None) -> tuple[UdpListener, Recorder]:
    metrics = Counters()
    resolver = cache_resolver(metrics)
    access = ClientFilter(parse_networks(["127.0.0.1/32"]))
    udp = UdpListener(resolver, metrics, access=access, limiter=limiter)
    recorder = Recorder()
    udp.connection_made(recorder)  # type: ignore[arg-type]
    reply = DNSRecord.question("a.example").reply()
    reply.add_answer(RR("a.example", QTYPE.A, rdata=A("192.0.2.1"), ttl=60))
    msg = bytes(reply.pack())
    q = wire.parse_query(query(1))
    resolver.cache.store(q.key, msg, wire.parse_reply(msg), time.monotonic(), False)
    return udp, recorder


def query(qid: int) -> bytes:
    record = DNSRecord.question("a.example")
    record.header.id = qid
    return bytes(record.pack())


def test_allowed_client_is_answered_and_outsider_refused() -> None:
    udp, sent = make_listener()
    udp.datagram_received(query(1), ALLOWED)
    udp.datagram_received(query(2), OUTSIDER)
    (answer, to_allowed), (refusal, to_outsider) = sent.sent
    assert (to_allowed, to_outsider) == (ALLOWED, OUTSIDER)
    assert DNSRecord.parse(answer).header.rcode == wire.NOERROR
    refused = DNSRecord.parse(refusal)
    assert refused.header.rcode == wire.REFUSED and refused.header.id == 2
    assert refused.rr == [] and str(refused.q.qname) == "a.example."
    assert udp.metrics.dropped == {
        "malformed": 0,
        "refused": 1,
        "overload": 0,
        "reset": 0,
        "kernel": 0,
    }
    assert udp.metrics.responses["local"][wire.REFUSED] == 1


def test_outsider_never_gets_a_fast_path_hit() -> None:
    udp, sent = make_listener()
    udp.datagram_received(query(7), ALLOWED)
    udp.datagram_received(query(7), ALLOWED)  # asked twice: the same bytes are on the fast path
    assert udp.fast
    udp.datagram_received(query(7), OUTSIDER)
    assert DNSRecord.parse(sent.sent[-1][0]).header.rcode == wire.REFUSED


def test_an_allowed_client_known_before_takes_the_fast_path() -> None:
    udp, sent = make_listener()
    for qid in (1, 2, 3, 4):
        udp.datagram_received(query(qid), ALLOWED)
    row = udp.fast.get(query(1)[2:])
    assert row is not None and row.hits == 2  # the second query made the row
    assert [DNSRecord.parse(data).header.id for data, _addr in sent.sent] == [1, 2, 3, 4]


def test_with_a_rate_limit_every_query_takes_a_token_even_on_the_fast_path() -> None:
    udp, sent = make_listener(RateLimiter(rate=2.0))  # a burst of 2
    for qid in range(5):
        udp.datagram_received(query(qid), ALLOWED)
    assert len(sent.sent) == 2 and udp.metrics.dropped["overload"] == 3


@pytest.mark.parametrize("data", [b"", b"\x00" * 11, b"\x12\x34\x81\x80" + bytes(8), b"junk" * 9])
def test_outsider_garbage_gets_silence(data: bytes) -> None:
    udp, sent = make_listener()
    udp.datagram_received(data, OUTSIDER)
    assert sent.sent == []
    assert udp.metrics.dropped["refused"] == 1


def test_verdicts_of_known_clients_are_one_lookup() -> None:
    udp, _sent = make_listener()
    udp.datagram_received(query(1), ALLOWED)
    udp.datagram_received(query(2), OUTSIDER)
    assert udp.admitted == {"127.0.0.1": True, "127.0.0.12": False}


def test_rate_limit_drops_silently_beyond_the_burst() -> None:
    udp, sent = make_listener(RateLimiter(5))
    for qid in range(20):
        udp.datagram_received(query(qid), ALLOWED)
    assert len(sent.sent) == 5
    assert udp.metrics.dropped["overload"] == 15
    assert udp.admitted == {}  # with a rate limit every query goes through the bucket


def test_reload_changes_who_is_allowed() -> None:
    udp, sent = make_listener()
    udp.datagram_received(query(1), OUTSIDER)
    access = ClientFilter(parse_networks(["127.0.0.0/8"]))
    udp.configure(udp.resolver, access=access, limiter=None, max_pending=4096)
    udp.datagram_received(query(2), OUTSIDER)
    assert DNSRecord.parse(sent.sent[-1][0]).header.rcode == wire.NOERROR
