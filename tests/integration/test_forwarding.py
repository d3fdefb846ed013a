"""The sidecar as a process, through real clients (dig, dnspython), in front of real (NSD) and
scripted upstreams: the acceptance cases of forwarding, caching, truncation and failure."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from tests.fakes.nsd import NsdServer, free_port
from tests.fakes.scripted_upstream import (
    Answer,
    Delay,
    Garbage,
    NxDomain,
    ScriptedUpstream,
    Silent,
    TruncateUdp,
    WrongId,
    WrongQuestion,
)
from tests.integration.conftest import BIG_COUNT, REPO_ROOT, Dig, Sidecar, StartSidecar

pytestmark = pytest.mark.integration

# Keeps the failure cases quick: one client query gets at most 1 s, one attempt 0.5 s.
FAST_FAIL = ("--query-timeout", "1", "--attempt-timeout", "0.5")


def ask(
    sc: Sidecar,
    name: str,
    rtype: str = "A",
    *,
    tcp: bool = False,
    timeout: float = 3.0,
    use_edns: int | bool | None = None,
    payload: int | None = None,
    qid: int | None = None,
) -> dns.message.Message:
    """One query to the sidecar with dnspython; the reply (checked to answer our question)."""
    query = dns.message.make_query(name, rtype, use_edns=use_edns, payload=payload, id=qid)
    if tcp:
        return dns.query.tcp(query, sc.addr, port=sc.port, timeout=timeout)
    return dns.query.udp(query, sc.addr, port=sc.port, timeout=timeout)


def rdatas(reply: dns.message.Message, rtype: str = "A") -> list[str]:
    want = dns.rdatatype.from_text(rtype)
    return sorted(rr.to_text() for rrset in reply.answer if rrset.rdtype == want for rr in rrset)


def answer_ttl(reply: dns.message.Message) -> int:
    assert reply.answer, reply
    return min(rrset.ttl for rrset in reply.answer)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


@pytest.fixture(scope="module")
def routed(module_sidecar: StartSidecar, nsd_default: NsdServer, nsd_local: NsdServer) -> Sidecar:
    """A sidecar sending `local` to the NSD for local. and everything else to example.test's.

    Shared by the tests of this module that only look at answers, not at upstream counts.
    """
    return module_sidecar(
        "--upstream",
        nsd_default.address,
        "--zone",
        f"local={nsd_local.address}",
    )


# --- 1. zone routing --------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_zone_goes_to_its_upstream_and_the_rest_to_the_default_dig(
    routed: Sidecar, dig: Dig, transport: str
) -> None:
    options = ["+tcp"] if transport == "tcp" else []
    local = dig(routed.addr, routed.port, "resource-server.local.", "A", *options)
    assert local.status == "NOERROR", local.output
    assert sorted(local.rdatas("A")) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    default = dig(routed.addr, routed.port, "www.example.test.", "A", *options)
    assert default.status == "NOERROR", default.output
    assert default.rdatas("A") == ["192.0.2.10"]


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_zone_goes_to_its_upstream_and_the_rest_to_the_default_dnspython(
    routed: Sidecar, tcp: bool
) -> None:
    local = ask(routed, "resource-server.local.", tcp=tcp)
    assert local.rcode() == dns.rcode.NOERROR
    assert rdatas(local) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    default = ask(routed, "www.example.test.", tcp=tcp)
    assert default.rcode() == dns.rcode.NOERROR
    assert rdatas(default) == ["192.0.2.10"]
    # Each NSD serves only its own zone: a right answer for the other zone's name proves the
    # route (NSD refuses names outside its zones).
    missing = ask(routed, "missing.local.", tcp=tcp)
    assert missing.rcode() == dns.rcode.NXDOMAIN
    assert [rrset.rdtype for rrset in missing.authority] == [dns.rdatatype.SOA]


def test_listens_on_ipv6_loopback(sidecar: StartSidecar, nsd_local: NsdServer) -> None:
    sc = sidecar("--upstream", nsd_local.address, host="::1")
    assert rdatas(ask(sc, "resource-server.local.")) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert rdatas(ask(sc, "resource-server.local.", tcp=True)) == [
        "10.0.0.1",
        "10.0.0.2",
        "10.0.0.3",
    ]


def test_event_loop_reads_udp_when_the_reader_thread_is_off(
    sidecar: StartSidecar, nsd_local: NsdServer
) -> None:
    sc = sidecar("--upstream", nsd_local.address, "--udp-reader-thread", "false")
    for qid in range(1, 6):  # a miss, a hit, then hits from a fast-path row
        reply = ask(sc, "resource-server.local.", qid=qid)
        assert reply.id == qid and rdatas(reply) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    threads = sorted(p.name for p in Path(f"/proc/{sc.proc.pid}/task").iterdir())
    assert len(threads) == 1, threads  # no reader thread: the loop's thread only


# --- 2. positive caching ----------------------------------------------------------------------


def test_cached_answer_reaches_upstream_once_and_its_ttl_counts_down(
    sidecar: StartSidecar, scripted_upstream: ScriptedUpstream
) -> None:
    up = scripted_upstream
    up.set("cached.example.", Answer(("A 192.0.2.20",), ttl=60))
    sc = sidecar("--upstream", up.address)

    first = ask(sc, "cached.example.")
    time.sleep(1.1)  # TTLs are whole seconds: let one pass
    second = ask(sc, "cached.example.")
    third = ask(sc, "cached.example.", tcp=True)

    for reply in (first, second, third):
        assert reply.rcode() == dns.rcode.NOERROR
        assert rdatas(reply) == ["192.0.2.20"]
    assert up.count("cached.example.") == 1
    assert 58 <= answer_ttl(first) <= 60
    assert answer_ttl(third) < answer_ttl(first)
    assert answer_ttl(third) >= 57


def test_cache_hit_through_dig(routed: Sidecar, dig: Dig) -> None:
    # The short.local. record has TTL 5 at NSD; through the cache it never grows.
    first = dig(routed.addr, routed.port, "short.local.", "A")
    second = dig(routed.addr, routed.port, "short.local.", "A", "+tcp")
    assert first.rdatas("A") == second.rdatas("A") == ["10.0.0.5"]
    assert 0 < second.answer[0].ttl <= first.answer[0].ttl <= 5


# --- 3. negative caching ----------------------------------------------------------------------


def test_nxdomain_reaches_upstream_once_and_carries_soa(
    sidecar: StartSidecar, scripted_upstream: ScriptedUpstream
) -> None:
    up = scripted_upstream
    up.set("gone.example.", NxDomain(soa_ttl=300, minimum=20))
    sc = sidecar("--upstream", up.address)

    replies = [ask(sc, "gone.example."), ask(sc, "gone.example."), ask(sc, "gone.example.")]

    assert up.count("gone.example.") == 1
    for reply in replies:
        assert reply.rcode() == dns.rcode.NXDOMAIN
        assert not reply.answer
        (soa,) = reply.authority
        assert soa.rdtype == dns.rdatatype.SOA
        assert soa.name.to_text() == "example."
        # RFC 2308: a negative answer lives min(SOA TTL, SOA minimum) seconds.
        assert 0 < soa.ttl <= 20


@pytest.mark.parametrize("discovery", [True, False], ids=["discovery", "plain"])
def test_a_discovery_zone_keeps_negative_answers_only_negative_ttl(
    sidecar: StartSidecar, scripted_upstream: ScriptedUpstream, discovery: bool
) -> None:
    up = scripted_upstream
    up.set("gone.svc.test.", NxDomain(soa_ttl=300, minimum=300, zone="svc.test."))
    check = ["--health-check", "svc.test=tcp:1"] if discovery else []
    sc = sidecar("--upstream", up.address, "--zone", f"svc.test={up.address}", *check)

    first = ask(sc, "gone.svc.test.")
    assert first.rcode() == dns.rcode.NXDOMAIN
    (soa,) = first.authority
    assert soa.ttl == (5 if discovery else 60)  # discovery.negative_ttl, else max_negative_ttl
    assert ask(sc, "gone.svc.test.").rcode() == dns.rcode.NXDOMAIN
    assert up.count("gone.svc.test.") == 1
    time.sleep(5.3)
    assert ask(sc, "gone.svc.test.").rcode() == dns.rcode.NXDOMAIN
    assert up.count("gone.svc.test.") == (2 if discovery else 1)


def test_nxdomain_from_nsd_through_dig(routed: Sidecar, dig: Dig) -> None:
    result = dig(routed.addr, routed.port, "nothing-here.local.", "A")
    assert result.status == "NXDOMAIN", result.output
    assert [r.rtype for r in result.authority] == ["SOA"]
    assert 0 < result.authority[0].ttl <= 30


# --- 4. truncation ----------------------------------------------------------------------------


def test_truncated_upstream_reply_reaches_edns_client_whole(
    sidecar: StartSidecar, scripted_upstream: ScriptedUpstream, dig: Dig
) -> None:
    up = scripted_upstream
    up.set("big.example.", TruncateUdp(count=40))
    sc = sidecar("--upstream", up.address)

    result = dig(sc.addr, sc.port, "big.example.", "A", "+bufsize=4096", "+ignore")

    assert result.status == "NOERROR", result.output
    assert "tc" not in result.flags, result.output
    assert len(result.rdatas("A")) == 40
    assert len(set(result.rdatas("A"))) == 40
    assert up.count("big.example.", proto="tcp") >= 1


def test_truncated_upstream_reply_gives_tc_to_client_without_edns(
    sidecar: StartSidecar, scripted_upstream: ScriptedUpstream, dig: Dig
) -> None:
    up = scripted_upstream
    up.set("big.example.", TruncateUdp(count=40))
    sc = sidecar("--upstream", up.address)

    plain = dig(sc.addr, sc.port, "big.example.", "A", "+noedns", "+ignore")
    assert plain.status == "NOERROR", plain.output
    assert "tc" in plain.flags, plain.output
    assert len(plain.rdatas("A")) < 40

    # The same client retrying over TCP gets all of it (from the cache: upstream asked once).
    over_tcp = dig(sc.addr, sc.port, "big.example.", "A", "+noedns", "+tcp")
    assert len(over_tcp.rdatas("A")) == 40
    assert up.count("big.example.", proto="tcp") == 1

    # dnspython without EDNS sees the same: TC set, and the reply fits in 512 bytes.
    query = dns.message.make_query("big.example.", "A", use_edns=False)
    wire = _udp_raw(sc, query.to_wire())
    assert len(wire) <= 512
    assert dns.message.from_wire(wire).flags & dns.flags.TC


def test_big_rrset_from_nsd_fits_for_edns_client_and_truncates_for_plain(
    routed: Sidecar,
) -> None:
    whole = ask(routed, "big.local.", use_edns=0, payload=4096)
    assert not whole.flags & dns.flags.TC
    assert len(rdatas(whole)) == BIG_COUNT
    plain = ask(routed, "big.local.", use_edns=False)
    assert plain.flags & dns.flags.TC


def _udp_raw(sc: Sidecar, wire: bytes, timeout: float = 3.0) -> bytes:
    family = socket.AF_INET6 if ":" in sc.addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(wire, (sc.addr, sc.port))
        data, _ = sock.recvfrom(65535)
        return data


# --- 5. silence -------------------------------------------------------------------------------


def test_silent_upstream_gives_servfail_within_the_deadline(
    sidecar: StartSidecar, scripted_upstream: ScriptedUpstream
) -> None:
    up = scripted_upstream
    up.default = Silent()
    sc = sidecar("--upstream", up.address, *FAST_FAIL)

    started = time.monotonic()
    reply = ask(sc, "quiet.example.", timeout=5)
    elapsed = time.monotonic() - started

    assert reply.rcode() == dns.rcode.SERVFAIL
    assert elapsed < 1.75, f"SERVFAIL after {elapsed:.2f}s, deadline 1s"
    assert up.count("quiet.example.") >= 1


def test_silent_upstream_gives_servfail_to_dig(
    sidecar: StartSidecar, scripted_upstream: ScriptedUpstream, dig: Dig
) -> None:
    scripted_upstream.default = Silent()
    sc = sidecar("--upstream", scripted_upstream.address, *FAST_FAIL)
    result = dig(sc.addr, sc.port, "quiet.example.", "A", "+tcp")
    assert result.status == "SERVFAIL", result.output


# --- 6. replies that are not the answer -------------------------------------------------------

BAD_FIRST = [
    pytest.param(WrongId, id="wrong_id"),
    pytest.param(WrongQuestion, id="wrong_question"),
    pytest.param(Garbage, id="garbage"),
]


@pytest.mark.parametrize("kind", BAD_FIRST)
def test_bad_reply_is_ignored_and_the_right_one_taken(
    sidecar: StartSidecar,
    scripted_upstream: ScriptedUpstream,
    kind: type[WrongId | WrongQuestion | Garbage],
) -> None:
    up = scripted_upstream
    up.set("spoofed.example.", kind(then=Answer(("A 192.0.2.30",), ttl=60)))
    sc = sidecar("--upstream", up.address, *FAST_FAIL)

    reply = ask(sc, "spoofed.example.")

    assert reply.rcode() == dns.rcode.NOERROR
    assert rdatas(reply) == ["192.0.2.30"]
    assert "192.0.2.66" not in rdatas(reply)  # the wrong question's address
    assert up.count("spoofed.example.") == 1  # taken from the same exchange, no retry


@pytest.mark.parametrize("kind", BAD_FIRST)
def test_bad_reply_alone_gives_servfail(
    sidecar: StartSidecar,
    scripted_upstream: ScriptedUpstream,
    kind: type[WrongId | WrongQuestion | Garbage],
) -> None:
    up = scripted_upstream
    up.set("spoofed.example.", kind(then=None))
    sc = sidecar("--upstream", up.address, *FAST_FAIL)

    started = time.monotonic()
    reply = ask(sc, "spoofed.example.", timeout=5)

    assert reply.rcode() == dns.rcode.SERVFAIL
    assert time.monotonic() - started < 1.75
    assert not reply.answer


# --- 7. TCP pipelining ------------------------------------------------------------------------


def test_pipelined_tcp_queries_are_all_answered(routed: Sidecar) -> None:
    questions = [
        ("resource-server.local.", "A", ["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
        ("www.example.test.", "A", ["192.0.2.10"]),
        ("resource-server.local.", "AAAA", ["2001:db8::1"]),
    ]
    queries = [
        dns.message.make_query(name, rtype, id=0x1100 + i)
        for i, (name, rtype, _) in enumerate(questions)
    ]
    with socket.create_connection((routed.addr, routed.port), timeout=3) as sock:
        sock.sendall(
            b"".join(struct.pack("!H", len(w)) + w for w in (q.to_wire() for q in queries))
        )
        replies = {}
        for _ in queries:
            (length,) = struct.unpack("!H", _recv_exactly(sock, 2))
            reply = dns.message.from_wire(_recv_exactly(sock, length))
            replies[reply.id] = reply
    assert sorted(replies) == [q.id for q in queries]
    for query, (_name, rtype, expected) in zip(queries, questions, strict=True):
        reply = replies[query.id]
        assert query.is_response(reply)
        assert rdatas(reply, rtype) == expected


def test_pipelined_tcp_queries_slow_one_does_not_hold_back_the_others(
    sidecar: StartSidecar, scripted_upstream: ScriptedUpstream
) -> None:
    up = scripted_upstream
    up.set("slow.example.", Delay(0.6, then=Answer(("A 192.0.2.40",))))
    up.set("fast.example.", Answer(("A 192.0.2.41",)))
    sc = sidecar("--upstream", up.address)
    queries = [
        dns.message.make_query("slow.example.", "A", id=0x2201),
        dns.message.make_query("fast.example.", "A", id=0x2202),
    ]
    with socket.create_connection((sc.addr, sc.port), timeout=3) as sock:
        sock.sendall(
            b"".join(struct.pack("!H", len(w)) + w for w in (q.to_wire() for q in queries))
        )
        order = []
        for _ in queries:
            (length,) = struct.unpack("!H", _recv_exactly(sock, 2))
            order.append(dns.message.from_wire(_recv_exactly(sock, length)).id)
    assert order == [0x2202, 0x2201]


# --- 8. case ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "names",
    [
        ("resource-server.local.", "Resource-Server.LOCAL."),
        ("Resource-Server.LOCAL.", "resource-server.local."),
    ],
    ids=["lower-first", "mixed-first"],
)
def test_question_case_is_echoed_and_shares_the_cache_entry(
    sidecar: StartSidecar, scripted_upstream: ScriptedUpstream, names: tuple[str, str]
) -> None:
    up = scripted_upstream
    up.set("resource-server.local.", Answer(("A 10.0.0.1", "A 10.0.0.2", "A 10.0.0.3")))
    sc = sidecar("--upstream", up.address)

    for name in names:
        query = dns.message.make_query(name, "A")
        wire = _udp_raw(sc, query.to_wire())
        reply = dns.message.from_wire(wire)
        assert reply.id == query.id
        assert reply.question[0].name.to_text() == name  # byte for byte, in the client's case
        # the echoed question, as bytes: exactly the client's
        assert wire[12 : 12 + len(name) + 1 + 4] == query.to_wire()[12 : 12 + len(name) + 1 + 4]
        assert rdatas(reply) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert up.count("resource-server.local.") == 1


def test_question_case_through_dig(routed: Sidecar, dig: Dig) -> None:
    result = dig(routed.addr, routed.port, "Resource-Server.LOCAL.", "A")
    assert result.question == "Resource-Server.LOCAL.", result.output
    assert sorted(result.rdatas("A")) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


# --- 9. other types, IDs ----------------------------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
@pytest.mark.parametrize(
    ("name", "rtype", "expected"),
    [
        ("resource-server.local.", "AAAA", ["2001:db8::1"]),
        ("resource-server.local.", "TXT", ['"resource server of the local zone"']),
        ("www.example.test.", "AAAA", ["2001:db8::10"]),
        ("www.example.test.", "TXT", ['"default upstream"']),
    ],
)
def test_other_types_pass_through_with_the_client_id(
    routed: Sidecar, name: str, rtype: str, expected: list[str], tcp: bool
) -> None:
    for qid in (0x0001, 0xBEEF):  # the second from the cache
        reply = ask(routed, name, rtype, tcp=tcp, qid=qid)
        assert reply.id == qid
        assert reply.rcode() == dns.rcode.NOERROR
        assert rdatas(reply, rtype) == expected


def test_aaaa_and_txt_through_dig(routed: Sidecar, dig: Dig) -> None:
    aaaa = dig(routed.addr, routed.port, "resource-server.local.", "AAAA")
    assert aaaa.rdatas("AAAA") == ["2001:db8::1"], aaaa.output
    txt = dig(routed.addr, routed.port, "www.example.test.", "TXT", "+tcp")
    assert txt.rdatas("TXT") == ['"default upstream"'], txt.output


# --- 10. configuration errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--listen", "127.0.0.1:99999"), ("--query-timeout", "0"), ("--zone", "local=127.0.0.1:0")],
)
def test_bad_config_value_exits_2_with_one_line_naming_it(flag: str, value: str) -> None:
    # An upstream on loopback, so that even a sidecar that failed to reject the value would
    # never ask the machine's resolver anything.
    upstream = f"127.0.0.1:{free_port('127.0.0.1')}"
    argv = [sys.executable, "-m", "sidecar", "--upstream", upstream, flag, value]
    if flag != "--listen":
        argv += ["--listen", f"127.0.0.1:{free_port('127.0.0.1')}"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=15, cwd=REPO_ROOT)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert flag in lines[0]


# --- 11. SIGTERM ------------------------------------------------------------------------------


@pytest.mark.parametrize("drain", ["0", "0.3"])
def test_sigterm_exits_0(
    sidecar: StartSidecar, scripted_upstream: ScriptedUpstream, drain: str
) -> None:
    sc = sidecar("--upstream", scripted_upstream.address, "--drain-seconds", drain)
    assert rdatas(ask(sc, "before-stop.example.")) == ["192.0.2.1"]
    started = time.monotonic()
    assert sc.stop() == 0, sc.stderr_text()
    assert time.monotonic() - started < float(drain) + 3
