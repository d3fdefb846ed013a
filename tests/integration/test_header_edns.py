"""Header and EDNS rules of the replies the sidecar writes itself, over real sockets with dig
and dnspython as clients: opcode echoed, NOTIMP for another opcode, BADVERS for EDNS version
above 0, an OPT in every reply to an EDNS client, CD copied on QUERY.

Every packet goes to loopback: the sidecar and NSD's `local.` zone.
"""

from __future__ import annotations

import socket
import struct
import time

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import pytest

from tests.fakes.nsd import NsdServer
from tests.fakes.scripted_upstream import Answer, ScriptedUpstream, Silent
from tests.integration.conftest import Dig, Sidecar, StartSidecar

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shared(module_sidecar: StartSidecar, nsd_local: NsdServer) -> Sidecar:
    return module_sidecar("--upstream", nsd_local.address)


def ask_tcp(sc: Sidecar, data: bytes) -> bytes:
    with socket.create_connection((sc.addr, sc.port), timeout=3) as sock:
        sock.sendall(struct.pack("!H", len(data)) + data)
        length = struct.unpack("!H", sock.recv(2, socket.MSG_WAITALL))[0]
        return sock.recv(length, socket.MSG_WAITALL)


def ask(sc: Sidecar, query: dns.message.Message, transport: str) -> dns.message.Message:
    if transport == "udp":
        return dns.query.udp(query, sc.addr, port=sc.port, timeout=3)
    return dns.message.from_wire(ask_tcp(sc, query.to_wire()))


@pytest.mark.parametrize("opcode", ["status", "notify"])
def test_dig_accepts_the_notimp_reply_to_another_opcode(
    shared: Sidecar, dig: Dig, opcode: str
) -> None:
    result = dig(shared.addr, shared.port, "resource-server.local", "A", f"+opcode={opcode}")
    assert result.returncode == 0, result.output
    assert "mismatch" not in result.output.lower(), result.output
    assert result.status == "NOTIMP", result.output
    assert opcode.upper() in result.output, result.output


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize("opcode", [dns.opcode.STATUS, dns.opcode.NOTIFY, dns.opcode.UPDATE])
def test_another_opcode_gets_notimp_with_nothing_claimed(
    shared: Sidecar, transport: str, opcode: int
) -> None:
    query = dns.message.make_query("local", "SOA", use_edns=0)  # UPDATE's zone section: SOA
    query.set_opcode(opcode)
    query.flags |= dns.flags.CD | dns.flags.AD | 0x0040  # CD, AD and Z: none may come back
    reply = ask(shared, query, transport)
    assert reply.opcode() == opcode
    assert reply.rcode() == dns.rcode.NOTIMP
    assert reply.flags & (dns.flags.AA | dns.flags.RA | dns.flags.AD | dns.flags.CD | 0x0040) == 0
    assert reply.edns == 0, "the client's OPT was readable: the reply carries one"


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_edns_version_above_zero_is_badvers_with_an_opt_of_version_zero(
    shared: Sidecar, transport: str
) -> None:
    query = dns.message.make_query("resource-server.local", "A", use_edns=1)
    reply = ask(shared, query, transport)
    assert reply.rcode() == dns.rcode.BADVERS
    assert reply.edns == 0
    assert reply.answer == []


def test_dig_edns1_without_negotiation_gets_badvers(shared: Sidecar, dig: Dig) -> None:
    result = dig(
        shared.addr, shared.port, "resource-server.local", "A", "+edns=1", "+noednsnegotiation"
    )
    assert result.status == "BADVERS", result.output
    assert result.answer == []


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_refused_chaos_question_from_an_edns_client_carries_an_opt(
    shared: Sidecar, transport: str
) -> None:
    query = dns.message.make_query("nothing.here", "TXT", "CH", use_edns=0)
    reply = ask(shared, query, transport)
    assert reply.rcode() == dns.rcode.REFUSED
    assert reply.edns == 0


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_chaos_answer_copies_cd_and_carries_an_opt(shared: Sidecar, transport: str) -> None:
    query = dns.message.make_query("id.server", "TXT", "CH", use_edns=0, want_dnssec=True)
    query.flags |= dns.flags.CD
    reply = ask(shared, query, transport)
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.flags & dns.flags.CD
    assert reply.edns == 0 and reply.ednsflags & dns.flags.DO


def ede_codes(reply: dns.message.Message) -> list[int]:
    return [
        int(option.code)
        for option in reply.options
        if isinstance(option, dns.edns.EDEOption)  # RFC 8914 option 15
    ]


def test_refused_by_access_control_says_prohibited(
    sidecar: StartSidecar, nsd_local: NsdServer
) -> None:
    sc = sidecar("--upstream", nsd_local.address, "--allow", "127.0.0.1/32")
    query = dns.message.make_query("resource-server.local", "A", use_edns=0)
    outsider = dns.query.udp(query, sc.addr, port=sc.port, timeout=3, source="127.0.0.12")
    assert outsider.rcode() == dns.rcode.REFUSED
    assert ede_codes(outsider) == [dns.edns.EDECode.PROHIBITED]
    plain = dns.message.make_query("resource-server.local", "A")
    assert dns.query.udp(plain, sc.addr, port=sc.port, timeout=3, source="127.0.0.12").edns < 0


def test_servfail_after_every_attempt_timed_out_says_no_reachable_authority(
    sidecar: StartSidecar,
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # bound, never answers
        silent.bind(("127.0.0.1", 0))
        upstream = f"127.0.0.1:{silent.getsockname()[1]}"
        sc = sidecar(
            "--upstream",
            upstream,
            "--attempt-timeout",
            "0.2",
            "--query-timeout",
            "0.5",
        )
        query = dns.message.make_query("resource-server.local", "A", use_edns=0)
        for _ in range(2):  # the fetch that fails, then the failure memory's answer
            reply = dns.query.udp(query, sc.addr, port=sc.port, timeout=3)
            assert reply.rcode() == dns.rcode.SERVFAIL
            assert ede_codes(reply) == [dns.edns.EDECode.NO_REACHABLE_AUTHORITY]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_stale_answer_says_so_and_echoes_do(
    sidecar: StartSidecar, scripted_upstream: ScriptedUpstream, transport: str
) -> None:
    name = "stale.example.test."
    scripted_upstream.set(name, Answer(("A 192.0.2.31",), ttl=1))
    sc = sidecar("--upstream", scripted_upstream.address)
    query = dns.message.make_query(name, "A", use_edns=0, want_dnssec=True)
    stored = time.monotonic()
    fresh = ask(sc, query, transport)
    assert fresh.answer and ede_codes(fresh) == []
    scripted_upstream.set(name, Silent())
    time.sleep(max(0.0, stored + 2.05 - time.monotonic()))  # expired a second ago
    stale = ask(sc, query, transport)
    assert stale.rcode() == dns.rcode.NOERROR and stale.answer
    assert ede_codes(stale) == [dns.edns.EDECode.STALE_ANSWER]
    assert stale.ednsflags & dns.flags.DO


def test_cache_hits_and_fast_path_rows_clear_z_copy_cd_and_echo_no_unknown_option(
    shared: Sidecar,
) -> None:
    unknown = dns.edns.GenericOption(65001, b"hello")  # an option the sidecar does not know
    for cd in (False, True):
        query = dns.message.make_query("resource-server.local", "A", use_edns=0, options=[unknown])
        query.flags |= 0x0040 | (dns.flags.CD if cd else 0)  # Z set: must come back clear
        wire_query = query.to_wire()
        for _ in range(5):  # a miss, then hits: the same bytes reach the fast path's rows
            reply = dns.message.from_wire(
                dns.query.udp(query, shared.addr, port=shared.port, timeout=3).to_wire()
            )
            assert reply.rcode() == dns.rcode.NOERROR and reply.answer
            assert reply.flags & 0x0040 == 0
            assert bool(reply.flags & dns.flags.CD) == cd
            assert reply.edns == 0 and not reply.options
        tcp = dns.message.from_wire(ask_tcp(shared, wire_query))
        assert tcp.flags & 0x0040 == 0 and bool(tcp.flags & dns.flags.CD) == cd
        assert not tcp.options
