"""The test doubles themselves: NSD answers what its zone says, the scripted upstream does what
it is told. If these fail, the forwarding tests' verdicts mean nothing."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from tests.fakes.nsd import NsdServer, running_nsd
from tests.fakes.scripted_upstream import (
    WRONG_QUESTION_NAME,
    Answer,
    Delay,
    Garbage,
    NxDomain,
    Refused,
    ScriptedUpstream,
    ServFail,
    Silent,
    TruncateUdp,
    WrongId,
    WrongQuestion,
)
from tests.integration.conftest import BIG_COUNT, Dig

pytestmark = pytest.mark.integration


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("connection closed")
        data += chunk
    return data


# --- nsd --------------------------------------------------------------------------------------


def test_nsd_answers_with_dig(nsd_local: NsdServer, dig: Dig) -> None:
    result = dig(nsd_local.host, nsd_local.port, "resource-server.local.", "A")
    assert result.status == "NOERROR", result.output
    assert sorted(result.rdatas("A")) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert {r.ttl for r in result.answer} == {60}
    assert "aa" in result.flags


def test_nsd_negative_answer_has_soa(nsd_local: NsdServer, dig: Dig) -> None:
    result = dig(nsd_local.host, nsd_local.port, "missing.local.", "A")
    assert result.status == "NXDOMAIN", result.output
    assert [r.rtype for r in result.authority] == ["SOA"]
    assert result.authority[0].ttl == 30
    assert result.authority[0].rdata.split()[-1] == "30"


def test_nsd_big_rrset_truncates_over_udp_without_edns(nsd_local: NsdServer, dig: Dig) -> None:
    small = dig(nsd_local.host, nsd_local.port, "big.local.", "A", "+noedns", "+ignore")
    assert "tc" in small.flags, small.output
    whole = dig(nsd_local.host, nsd_local.port, "big.local.", "A", "+bufsize=4096")
    assert "tc" not in whole.flags
    assert len(whole.rdatas("A")) == BIG_COUNT
    over_tcp = dig(nsd_local.host, nsd_local.port, "big.local.", "A", "+tcp", "+noedns")
    assert len(over_tcp.rdatas("A")) == BIG_COUNT


def test_nsd_default_zone(nsd_default: NsdServer) -> None:
    query = dns.message.make_query("www.example.test.", dns.rdatatype.A)
    reply = dns.query.tcp(query, nsd_default.host, port=nsd_default.port, timeout=2)
    assert [rr.to_text() for rrset in reply.answer for rr in rrset] == ["192.0.2.10"]


def test_nsd_on_ipv6_loopback(tmp_path: Path) -> None:
    zone = "$ORIGIN v6.test.\n@ 60 IN SOA ns hm 1 60 60 60 60\n@ 60 IN NS ns\nns 60 IN A 10.9.9.9\n"
    with running_nsd({"v6.test.": zone}, tmp_path, host="::1") as server:
        assert server.address == f"[::1]:{server.port}"
        query = dns.message.make_query("ns.v6.test.", dns.rdatatype.A)
        reply = dns.query.udp(query, "::1", port=server.port, timeout=2)
        assert [rr.to_text() for rrset in reply.answer for rr in rrset] == ["10.9.9.9"]
    assert server.proc is None


def test_nsd_stops(tmp_path: Path) -> None:
    zone = "$ORIGIN s.test.\n@ 60 IN SOA ns hm 1 60 60 60 60\n@ 60 IN NS ns\nns 60 IN A 10.9.9.8\n"
    with running_nsd({"s.test.": zone}, tmp_path) as server:
        proc = server.proc
        assert proc is not None
    assert proc.returncode is not None
    query = dns.message.make_query("ns.s.test.", dns.rdatatype.A)
    with pytest.raises((dns.exception.Timeout, ConnectionRefusedError)):
        dns.query.udp(query, server.host, port=server.port, timeout=0.3)


# --- scripted upstream ------------------------------------------------------------------------


def _q(name: str, rtype: str = "A", **kwargs: object) -> dns.message.QueryMessage:
    return dns.message.make_query(name, rtype, **kwargs)  # type: ignore[arg-type]


def test_scripted_answer_and_log(scripted_upstream: ScriptedUpstream) -> None:
    up = scripted_upstream
    up.set("a.example.", Answer(("A 192.0.2.7", "A 192.0.2.8", "TXT hi"), ttl=42))
    reply = dns.query.udp(
        _q("A.Example.", use_edns=0, payload=1400), up.host, port=up.port, timeout=2
    )
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.question[0].name.to_text() == "A.Example."
    assert sorted(rr.to_text() for rr in reply.answer[0]) == ["192.0.2.7", "192.0.2.8"]
    assert reply.answer[0].ttl == 42
    dns.query.tcp(_q("a.example.", "TXT", use_edns=False), up.host, port=up.port, timeout=2)

    (udp,) = up.queries("a.example.", proto="udp")
    assert (udp.qname, udp.qtype, udp.edns, udp.payload) == ("A.Example.", "A", True, 1400)
    (tcp,) = up.queries("a.example.", proto="tcp")
    assert (tcp.qtype, tcp.edns, tcp.payload) == ("TXT", False, None)
    assert up.count("a.example.") == 2
    assert up.count(proto="tcp") == 1
    assert up.count("other.example.") == 0


def test_scripted_truncate_udp(scripted_upstream: ScriptedUpstream) -> None:
    up = scripted_upstream
    up.set("big.example.", TruncateUdp())
    over_udp = dns.query.udp(
        _q("big.example.", use_edns=0, payload=4096), up.host, port=up.port, timeout=2
    )
    assert over_udp.flags & dns.flags.TC
    assert not over_udp.answer
    over_tcp = dns.query.tcp(_q("big.example."), up.host, port=up.port, timeout=2)
    assert not over_tcp.flags & dns.flags.TC
    assert len(over_tcp.answer[0]) == 40


@pytest.mark.parametrize(
    ("behaviour", "rcode"),
    [(ServFail(), dns.rcode.SERVFAIL), (Refused(), dns.rcode.REFUSED)],
)
def test_scripted_rcodes(
    scripted_upstream: ScriptedUpstream, behaviour: ServFail | Refused, rcode: dns.rcode.Rcode
) -> None:
    scripted_upstream.default = behaviour
    reply = dns.query.udp(
        _q("x.example."), scripted_upstream.host, port=scripted_upstream.port, timeout=2
    )
    assert reply.rcode() == rcode


def test_scripted_nxdomain(scripted_upstream: ScriptedUpstream) -> None:
    up = scripted_upstream
    up.set("gone.example.", NxDomain(soa_ttl=20, minimum=10))
    reply = dns.query.udp(_q("gone.example."), up.host, port=up.port, timeout=2)
    assert reply.rcode() == dns.rcode.NXDOMAIN
    (soa,) = reply.authority
    assert soa.name.to_text() == "example."
    assert soa.ttl == 20
    assert soa[0].minimum == 10


def test_scripted_silent(scripted_upstream: ScriptedUpstream) -> None:
    scripted_upstream.default = Silent()
    with pytest.raises(dns.exception.Timeout):
        dns.query.udp(
            _q("x.example."), scripted_upstream.host, port=scripted_upstream.port, timeout=0.3
        )
    assert scripted_upstream.count("x.example.") == 1


def _udp_exchange(up: ScriptedUpstream, query: dns.message.Message, n: int) -> list[bytes]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.sendto(query.to_wire(), (up.host, up.port))
        return [sock.recv(65535) for _ in range(n)]


def test_scripted_wrong_id_then_right(scripted_upstream: ScriptedUpstream) -> None:
    scripted_upstream.default = WrongId()
    query = _q("x.example.")
    first, second = _udp_exchange(scripted_upstream, query, 2)
    assert struct.unpack("!H", first[:2])[0] != query.id
    assert dns.message.from_wire(second).id == query.id


def test_scripted_wrong_question_then_right(scripted_upstream: ScriptedUpstream) -> None:
    scripted_upstream.default = WrongQuestion()
    query = _q("x.example.")
    first, second = _udp_exchange(scripted_upstream, query, 2)
    wrong = dns.message.from_wire(first)
    assert wrong.id == query.id
    assert wrong.question[0].name.to_text() == WRONG_QUESTION_NAME
    assert query.is_response(dns.message.from_wire(second))


def test_scripted_garbage_then_right(scripted_upstream: ScriptedUpstream) -> None:
    scripted_upstream.default = Garbage()
    query = _q("x.example.")
    first, second = _udp_exchange(scripted_upstream, query, 2)
    assert struct.unpack("!H", first[:2])[0] == query.id
    with pytest.raises(dns.exception.DNSException):
        dns.message.from_wire(first)
    assert query.is_response(dns.message.from_wire(second))


def test_scripted_wrong_id_alone(scripted_upstream: ScriptedUpstream) -> None:
    scripted_upstream.default = WrongId(then=None)
    query = _q("x.example.")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        sock.sendto(query.to_wire(), (scripted_upstream.host, scripted_upstream.port))
        sock.recv(65535)
        with pytest.raises(TimeoutError):
            sock.recv(65535)


def test_scripted_delay(scripted_upstream: ScriptedUpstream) -> None:
    scripted_upstream.default = Delay(0.4, then=ServFail())
    started = time.monotonic()
    reply = dns.query.udp(
        _q("x.example."), scripted_upstream.host, port=scripted_upstream.port, timeout=2
    )
    assert time.monotonic() - started >= 0.4
    assert reply.rcode() == dns.rcode.SERVFAIL


def test_scripted_tcp_pipelined(scripted_upstream: ScriptedUpstream) -> None:
    up = scripted_upstream
    up.set("slow.example.", Delay(0.3, then=Answer(("A 192.0.2.3",))))
    queries = [_q(f"{n}.example.") for n in ("slow", "fast1", "fast2")]
    with socket.create_connection((up.host, up.port), timeout=2) as sock:
        sock.sendall(
            b"".join(struct.pack("!H", len(w)) + w for w in (q.to_wire() for q in queries))
        )
        replies = []
        for _ in queries:
            (length,) = struct.unpack("!H", _recv_exactly(sock, 2))
            replies.append(dns.message.from_wire(_recv_exactly(sock, length)))
    # the delayed one comes last: the fake answers each query on its own
    assert [r.id for r in replies] == [queries[1].id, queries[2].id, queries[0].id]
    assert up.count(proto="tcp") == 3


def test_scripted_behaviour_changes_while_running(scripted_upstream: ScriptedUpstream) -> None:
    up = scripted_upstream
    assert (
        dns.query.udp(_q("c.example."), up.host, port=up.port, timeout=2).rcode()
        == dns.rcode.NOERROR
    )
    up.set("c.example.", Refused())
    assert (
        dns.query.udp(_q("c.example."), up.host, port=up.port, timeout=2).rcode()
        == dns.rcode.REFUSED
    )
    up.unset("c.example.")
    assert (
        dns.query.udp(_q("c.example."), up.host, port=up.port, timeout=2).rcode()
        == dns.rcode.NOERROR
    )


def test_scripted_stop_with_open_connection_and_pending_delay() -> None:
    with ScriptedUpstream(default=Delay(30)) as up:
        client = socket.create_connection((up.host, up.port), timeout=2)
        with client:
            wire = _q("x.example.").to_wire()
            client.sendall(struct.pack("!H", len(wire)) + wire)
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with udp:
                udp.sendto(wire, (up.host, up.port))
                assert up.wait_for(2, "x.example.", timeout=2)
                up.stop()
            assert client.recv(10) == b""  # closed by the stop, no reply sent


def test_scripted_nodata_for_the_root_name(scripted_upstream: ScriptedUpstream) -> None:
    # A sidecar's health probe asks ". NS": the default Answer has no NS, so NODATA with an SOA.
    reply = dns.query.udp(
        _q(".", "NS"), scripted_upstream.host, port=scripted_upstream.port, timeout=2
    )
    assert reply.rcode() == dns.rcode.NOERROR
    assert not reply.answer
    assert [rrset.name.to_text() for rrset in reply.authority] == ["."]
    assert scripted_upstream.errors == []


def test_scripted_upstream_drops_what_goes_over_its_packet_limit() -> None:
    with ScriptedUpstream() as up:
        up.max_packets_per_second = 5
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((up.host, up.port))
            for number in range(8):
                sock.send(dns.message.make_query(f"n{number}.example.", "A").to_wire())
            assert up.wait_for(8)
            sock.settimeout(1.0)
            answered = {dns.message.from_wire(sock.recv(512)).question[0].name for _ in range(5)}
            sock.settimeout(0.3)
            with pytest.raises(TimeoutError):
                sock.recv(512)
        assert [r.dropped for r in up.queries()] == [False] * 5 + [True] * 3
        assert len(answered) == 5
