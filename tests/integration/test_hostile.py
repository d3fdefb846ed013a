"""Hostile input against the running sidecar: malformed queries over UDP and TCP, junk TCP
streams, a flood, forged upstream replies for every ID, out-of-bailiwick records, clients
outside `allow`, and hundreds of idle TCP connections.

Every packet goes to loopback: the sidecar, NSD and the fake upstreams of the integration
fixtures. Floods are bounded in count and time.
"""

from __future__ import annotations

import contextlib
import random
import re
import select
import signal
import socket
import struct
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from dnslib import QTYPE, RR, A, DNSRecord

from tests.fakes.hostile_traffic import (
    CASES,
    HostileCase,
    frame,
    hostile_datagrams,
    junk_tcp_stream,
)
from tests.fakes.hostile_upstream import ANSWER_ADDRESS, HeldUpstream
from tests.fakes.nsd import NsdServer
from tests.integration.conftest import Dig, Sidecar, StartSidecar

pytestmark = pytest.mark.integration

Loopback = Callable[[], str]
RESOURCE_SERVER = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


# --- helpers ----------------------------------------------------------------------------------


def probe_query(qid: int) -> bytes:
    """`id.server CH TXT`: answered by the sidecar itself, in order after what came before."""
    record = DNSRecord.question("id.server", "TXT", "CH")
    record.header.id = qid
    return bytes(record.pack())


def udp_replies(sc: Sidecar, data: bytes, source: str = "127.0.0.1") -> list[bytes]:
    """Send `data`, then a probe the sidecar answers itself; every reply before the probe's.
    The sidecar handles datagrams from one socket in order, so this needs no waiting."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(3.0)
        sock.sendto(data, (sc.addr, sc.port))
        sock.sendto(probe_query(0xBEEF), (sc.addr, sc.port))
        replies = []
        while True:
            reply = sock.recv(65535)
            if reply[:2] == b"\xbe\xef":
                return replies
            replies.append(reply)


def tcp_session(
    sc: Sidecar, data: bytes, timeout: float = 3.0, want: int | None = None
) -> tuple[list[bytes], bool]:
    """Send `data` on a new connection; the framed messages read back (until `want` of them
    came, the sidecar closed the connection, or `timeout`) and whether it was closed."""
    with socket.create_connection((sc.addr, sc.port), timeout=timeout) as sock:
        sock.sendall(data)
        buffer = b""
        deadline = time.monotonic() + timeout
        closed = False
        while time.monotonic() < deadline:
            if want is not None and len(split_frames(buffer)) >= want:
                break
            ready, _, _ = select.select([sock], [], [], deadline - time.monotonic())
            if not ready:
                break
            try:
                chunk = sock.recv(65535)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                closed = True
                break
            buffer += chunk
        return split_frames(buffer), closed


def split_frames(buffer: bytes) -> list[bytes]:
    messages = []
    while len(buffer) >= 2:
        (size,) = struct.unpack("!H", buffer[:2])
        if len(buffer) < 2 + size:
            break
        messages.append(buffer[2 : 2 + size])
        buffer = buffer[2 + size :]
    return messages


def metrics_url(sc: Sidecar) -> str:
    return "http://" + sc.args[sc.args.index("--metrics-listen") + 1] + "/metrics"


def metric(sc: Sidecar, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    with urllib.request.urlopen(metrics_url(sc), timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        match = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total


def rss_mb(sc: Sidecar) -> float:
    with open(f"/proc/{sc.proc.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def a_records(reply: dns.message.Message) -> list[str]:
    return sorted(
        rd.to_text() for rrset in reply.answer if rrset.rdtype == dns.rdatatype.A for rd in rrset
    )


def assert_answers_correctly(sc: Sidecar) -> None:
    """A valid query, over UDP and over TCP, gets the right answer from NSD (via the cache)."""
    query = dns.message.make_query("resource-server.local.", "A")
    udp = dns.query.udp(query, sc.addr, port=sc.port, timeout=5)
    assert a_records(udp) == RESOURCE_SERVER
    tcp = dns.query.tcp(query, sc.addr, port=sc.port, timeout=5)
    assert a_records(tcp) == RESOURCE_SERVER


def no_tracebacks(sc: Sidecar) -> None:
    text = sc.stderr_text()
    assert "Traceback" not in text and "query failed" not in text, text[-3000:]


@pytest.fixture(scope="module")
def shared(module_sidecar: StartSidecar, nsd_local: NsdServer) -> Sidecar:
    """One sidecar for the per-case tests: NSD's `local.` for everything."""
    return module_sidecar("--upstream", nsd_local.address)


# --- 1. malformed queries, case by case -------------------------------------------------------


def check_reply(case: HostileCase, replies: list[bytes]) -> None:
    if case.reply is None:
        assert replies == [], f"{case.name}: answered {replies!r}"
        return
    (reply,) = replies
    assert reply[:2] == case.data[:2]
    rcode = reply[3] & 0x0F  # read by hand: dnspython refuses an UPDATE echoing an A question
    assert rcode == case.reply, f"{case.name}: {dns.rcode.to_text(rcode)}"
    if case.name == "ANY":
        full = dns.message.from_wire(reply)
        (rrset,) = full.answer
        assert rrset.rdtype == dns.rdatatype.HINFO
        assert rrset[0].cpu == b"RFC8482" and rrset[0].os == b""


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_udp_hostile_query_gets_its_rcode_or_silence(shared: Sidecar, case: HostileCase) -> None:
    check_reply(case, udp_replies(shared, case.data))


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_tcp_hostile_query_gets_its_rcode_or_a_closed_connection(
    shared: Sidecar, case: HostileCase
) -> None:
    want = None if case.reply is None else 2  # the case's reply and the probe's
    messages, closed = tcp_session(shared, frame(case.data) + frame(probe_query(0xBEEF)), want=want)
    replies = [m for m in messages if m[:2] != b"\xbe\xef"]
    if case.reply is None:
        assert closed and messages == [], f"{case.name}: {messages!r}"
        return
    check_reply(case, replies)
    assert any(m[:2] == b"\xbe\xef" for m in messages), "the connection went on"


def test_malformed_refused_and_answered_are_counted(shared: Sidecar) -> None:
    before = {
        r: metric(shared, "dns_sidecar_dropped_total", reason=r) for r in ("malformed", "refused")
    }
    for case in CASES:
        udp_replies(shared, case.data)
    malformed = sum(1 for case in CASES if not case.readable)
    refused = sum(1 for case in CASES if case.reply == dns.rcode.REFUSED)
    after = {
        r: metric(shared, "dns_sidecar_dropped_total", reason=r) for r in ("malformed", "refused")
    }
    assert after["malformed"] - before["malformed"] == malformed
    assert after["refused"] - before["refused"] == refused
    no_tracebacks(shared)


def test_any_and_axfr_through_dig(shared: Sidecar, dig: Dig) -> None:
    any_reply = dig(shared.addr, shared.port, "resource-server.local", "ANY")
    assert any_reply.status == "NOERROR"
    assert [(r.rtype, r.rdata) for r in any_reply.answer] == [("HINFO", '"RFC8482" ""')]
    axfr = dig(shared.addr, shared.port, "local", "AXFR")  # dig asks over TCP
    assert "Transfer failed" in axfr.output, axfr.output


# --- 2. TCP: lengths that lie, halves, stalls -------------------------------------------------


@pytest.fixture
def quick_tcp(sidecar: StartSidecar, nsd_local: NsdServer) -> Sidecar:
    return sidecar(
        "--upstream",
        nsd_local.address,
        "--tcp-message-timeout",
        "0.5",
        "--tcp-idle-timeout",
        "3",
    )


def closed_within(sc: Sidecar, data: bytes, timeout: float) -> float:
    """Seconds until the sidecar closes a connection on which `data` was sent."""
    started = time.monotonic()
    messages, closed = tcp_session(sc, data, timeout=timeout)
    assert closed, f"still open after {timeout}s"
    assert messages == []
    return time.monotonic() - started


def test_tcp_length_promising_more_than_comes_is_closed_at_the_message_deadline(
    quick_tcp: Sidecar,
) -> None:
    took = closed_within(quick_tcp, b"\x01\x00" + b"\x12\x34" * 20, timeout=6)
    assert 0.4 < took < 2.5  # the 0.5 s message deadline, not the 3 s idle timeout


def test_tcp_half_a_length_prefix_is_closed_at_the_idle_timeout(quick_tcp: Sidecar) -> None:
    took = closed_within(quick_tcp, b"\x00", timeout=8)
    assert 2.8 < took < 6


def test_tcp_zero_length_message_closes_the_connection(quick_tcp: Sidecar) -> None:
    assert closed_within(quick_tcp, b"\x00\x00", timeout=2) < 1.0


def test_tcp_half_message_then_hang_up_leaves_the_sidecar_serving(quick_tcp: Sidecar) -> None:
    query = frame(dns.message.make_query("resource-server.local.", "A").to_wire())
    for cut in range(1, len(query)):
        with socket.create_connection((quick_tcp.addr, quick_tcp.port), timeout=2) as sock:
            sock.sendall(query[:cut])
    assert_answers_correctly(quick_tcp)
    no_tracebacks(quick_tcp)


def test_tcp_client_that_never_reads_is_let_go(quick_tcp: Sidecar) -> None:
    """Pipelined queries for a big answer and no reads: once the kernel's buffers are full the
    replies are not buffered without bound; the connection is dropped after the idle timeout
    and the sidecar goes on serving everyone else."""
    query = dns.message.make_query("big.local.", "A")  # 40 A records, about 700 bytes
    dns.query.tcp(query, quick_tcp.addr, port=quick_tcp.port, timeout=3)  # now cached
    burst = frame(query.to_wire()) * 30_000  # about 20 MB of answers
    with socket.create_connection((quick_tcp.addr, quick_tcp.port), timeout=5) as sock:
        sock.setblocking(False)
        sent = 0
        progress = time.monotonic()
        while sent < len(burst) and time.monotonic() - progress < 0.5:
            try:
                sent += sock.send(burst[sent : sent + 65536])
                progress = time.monotonic()
            except BlockingIOError:
                time.sleep(0.005)
        assert_answers_correctly(quick_tcp)  # others are served meanwhile
        stalled = time.monotonic()
        reset = None
        while reset is None and time.monotonic() - stalled < 10:
            try:
                sock.send(b"\x00")
            except BlockingIOError:
                pass
            except (ConnectionResetError, BrokenPipeError):
                reset = time.monotonic() - stalled
            time.sleep(0.05)
    assert reset is not None, "the sidecar still holds a client that never reads"
    assert quick_tcp.proc.poll() is None
    assert_answers_correctly(quick_tcp)
    no_tracebacks(quick_tcp)


# --- 3. acceptance: a flood of hostile datagrams and junk TCP streams --------------------------


FLOOD_DATAGRAMS = 30_000
JUNK_STREAMS = 200
RSS_LIMIT_MB = 150


def test_flood_of_hostile_datagrams_and_junk_tcp_streams(
    sidecar: StartSidecar, nsd_local: NsdServer, capsys: pytest.CaptureFixture[str]
) -> None:
    sc = sidecar("--upstream", nsd_local.address)
    assert_answers_correctly(sc)
    rss_start = rss_mb(sc)
    rng = random.Random(8)
    traffic = hostile_datagrams(rng)
    senders = []
    for i in range(8):  # several clients, several source addresses
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((f"127.0.0.{20 + i}", 0))
        sock.setblocking(False)
        senders.append(sock)
    rss_peak = rss_start
    started = time.monotonic()
    try:
        for n in range(FLOOD_DATAGRAMS):
            with contextlib.suppress(BlockingIOError):
                senders[n % len(senders)].sendto(next(traffic), (sc.addr, sc.port))
            if n % 200 == 199:
                time.sleep(0.03)  # about 6000 per second: most reach the parser
                rss_peak = max(rss_peak, rss_mb(sc))
        flood_seconds = time.monotonic() - started
        streams = []
        for _ in range(JUNK_STREAMS):
            conn = socket.create_connection((sc.addr, sc.port), timeout=2)
            with contextlib.suppress(OSError):
                conn.sendall(junk_tcp_stream(rng))
            if rng.random() < 0.5:
                conn.close()  # hang up at once; the rest stall until the end
            else:
                streams.append(conn)
        time.sleep(1.0)
        rss_peak = max(rss_peak, rss_mb(sc))
        assert sc.proc.poll() is None, sc.stderr_text()[-3000:]
        assert_answers_correctly(sc)
        rss_end = rss_mb(sc)
    finally:
        for sock in senders:
            sock.close()
        for conn in streams if "streams" in locals() else []:
            conn.close()
    malformed = metric(sc, "dns_sidecar_dropped_total", reason="malformed")
    overload = metric(sc, "dns_sidecar_dropped_total", reason="overload")
    with capsys.disabled():
        print(
            f"\nflood: {FLOOD_DATAGRAMS} datagrams in {flood_seconds:.2f}s, {JUNK_STREAMS} junk "
            f"TCP streams; RSS {rss_start:.1f} -> peak {rss_peak:.1f} -> {rss_end:.1f} MB; "
            f"dropped malformed={malformed:.0f} overload={overload:.0f}"
        )
    assert rss_peak < RSS_LIMIT_MB
    assert malformed > FLOOD_DATAGRAMS / 4  # most of the flood reached the parser
    no_tracebacks(sc)


# --- 4. acceptance: forged replies for every ID ------------------------------------------------


@pytest.fixture
def held_upstream(loopback: Loopback) -> Iterator[HeldUpstream]:
    with HeldUpstream(loopback()) as upstream:
        yield upstream


def forged_replies(seen_raw: bytes, poison: str) -> bytes:
    """A reply to the held query with the poison address; its first two bytes are the ID."""
    query = DNSRecord.parse(seen_raw)
    reply = query.reply()
    reply.add_answer(RR(query.q.qname, QTYPE.A, ttl=86400, rdata=A(poison)))
    return bytes(reply.pack())


def flood(sock: socket.socket, template: bytes, target: tuple[str, int], skip: int = -1) -> float:
    """Send `template` with every ID but `skip` to `target`; the seconds it took."""
    started = time.monotonic()
    body = template[2:]
    for qid in range(65536):
        if qid == skip:
            continue
        while True:
            try:
                sock.sendto(struct.pack("!H", qid) + body, target)
                break
            except BlockingIOError:
                select.select([], [sock], [], 0.1)
    return time.monotonic() - started


def test_forged_replies_for_every_id_are_never_taken_or_cached(
    sidecar: StartSidecar,
    held_upstream: HeldUpstream,
    loopback: Loopback,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sc = sidecar(
        "--upstream",
        held_upstream.address,
        "--attempt-timeout",
        "20",
        "--query-timeout",
        "25",
    )
    name = "spoof.example.test."
    held_upstream.hold(name)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(0.5)
    query = dns.message.make_query(name, "A")
    client.sendto(query.to_wire(), (sc.addr, sc.port))
    seen = held_upstream.wait_query(name)
    poison = forged_replies(seen.raw, "6.6.6.6")
    timings = {}
    try:
        # Wrong source address: a forger on another loopback address, every ID.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as forger:
            forger.bind((loopback(), 0))
            forger.setblocking(False)
            timings["wrong address"] = flood(forger, poison, seen.source)
        # Wrong source port: the upstream's own address, another port, every ID.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as forger:
            forger.bind((held_upstream.host, 0))
            forger.setblocking(False)
            timings["wrong port"] = flood(forger, poison, seen.source)
        # Right address and port (the upstream's own socket): every wrong ID, and the right ID
        # with another question. Counted as mismatches, and the wait goes on.
        mismatch_before = metric(sc, "dns_sidecar_upstream_errors_total", reason="mismatch")
        other_question = forged_replies(
            bytes(DNSRecord.question("other.example.test", "A").pack()), "6.6.6.6"
        )
        held_upstream.sock.sendto(struct.pack("!H", seen.id) + other_question[2:], seen.source)
        timings["right source, wrong ID"] = flood(
            held_upstream.sock, poison, seen.source, skip=seen.id
        )
        time.sleep(0.5)
        with pytest.raises(TimeoutError):
            client.recv(65535)  # nothing taken: the client still waits
        mismatches = (
            metric(sc, "dns_sidecar_upstream_errors_total", reason="mismatch") - mismatch_before
        )
        assert mismatches > 0
        assert held_upstream.count(name) == 1  # the attempt was never ended early
        held_upstream.release(name)
        client.settimeout(5)
        reply = dns.message.from_wire(client.recv(65535))
        assert a_records(reply) == [ANSWER_ADDRESS]
    finally:
        client.close()
    again = dns.query.udp(query, sc.addr, port=sc.port, timeout=3)
    assert a_records(again) == [ANSWER_ADDRESS]  # the cache holds the real answer
    assert held_upstream.count(name) == 1
    with capsys.disabled():
        print(
            "\nforged: "
            + ", ".join(f"{what} {seconds:.2f}s" for what, seconds in timings.items())
            + f" (65536 each); mismatches counted {mismatches:.0f}"
        )
    no_tracebacks(sc)


# --- 5. bailiwick ------------------------------------------------------------------------------


def test_out_of_bailiwick_records_are_not_cached(
    sidecar: StartSidecar, held_upstream: HeldUpstream
) -> None:
    sc = sidecar("--upstream", held_upstream.address)
    held_upstream.extra["bail.example.test."] = [
        RR("www.bank.test.", QTYPE.A, ttl=86400, rdata=A("6.6.6.6"))
    ]
    query = dns.message.make_query("bail.example.test.", "A")
    for _ in range(2):
        reply = dns.query.udp(query, sc.addr, port=sc.port, timeout=3)
        assert ANSWER_ADDRESS in a_records(reply)
    assert held_upstream.count("bail.example.test.") == 2  # served each time, never cached
    victim = dns.query.udp(
        dns.message.make_query("www.bank.test.", "A"), sc.addr, port=sc.port, timeout=3
    )
    assert a_records(victim) == [ANSWER_ADDRESS]  # asked upstream, never the poison
    clean = dns.message.make_query("clean.example.test.", "A")
    for _ in range(2):
        dns.query.udp(clean, sc.addr, port=sc.port, timeout=3)
    assert held_upstream.count("clean.example.test.") == 1  # a clean answer is cached


# --- 6. acceptance: access control -------------------------------------------------------------


def test_allow_one_address_refuses_the_rest(sidecar: StartSidecar, nsd_local: NsdServer) -> None:
    sc = sidecar("--upstream", nsd_local.address, "--allow", "127.0.0.1/32")
    query = dns.message.make_query("resource-server.local.", "A")
    outsider = dns.query.udp(query, sc.addr, port=sc.port, timeout=3, source="127.0.0.12")
    assert outsider.rcode() == dns.rcode.REFUSED and outsider.answer == []
    insider = dns.query.udp(query, sc.addr, port=sc.port, timeout=3, source="127.0.0.1")
    assert a_records(insider) == RESOURCE_SERVER
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.12", 0))
        sock.settimeout(3)
        sock.connect((sc.addr, sc.port))
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(frame(query.to_wire()))
            assert sock.recv(65535) == b""  # closed without an answer
    tcp = dns.query.tcp(query, sc.addr, port=sc.port, timeout=3, source="127.0.0.1")
    assert a_records(tcp) == RESOURCE_SERVER
    assert metric(sc, "dns_sidecar_dropped_total", reason="refused") == 2


def test_sighup_applies_a_new_allow_list(
    sidecar: StartSidecar, nsd_local: NsdServer, tmp_path: Path
) -> None:
    config = tmp_path / "sidecar.toml"
    config.write_text('allow = ["127.0.0.1/32"]\n')
    sc = sidecar("--config", str(config), "--upstream", nsd_local.address)
    query = dns.message.make_query("resource-server.local.", "A")
    before = dns.query.udp(query, sc.addr, port=sc.port, timeout=3, source="127.0.0.12")
    assert before.rcode() == dns.rcode.REFUSED
    config.write_text('allow = ["127.0.0.0/8"]\n')
    sc.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reloaded" not in sc.stderr_text():
        assert time.monotonic() < deadline, sc.stderr_text()
        time.sleep(0.05)
    after = dns.query.udp(query, sc.addr, port=sc.port, timeout=3, source="127.0.0.12")
    assert a_records(after) == RESOURCE_SERVER


def test_rate_limit_drops_a_client_beyond_its_rate(
    sidecar: StartSidecar, nsd_local: NsdServer
) -> None:
    sc = sidecar("--upstream", nsd_local.address, "--rate-limit", "20")
    query = dns.message.make_query("resource-server.local.", "A")
    answered = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.31", 0))
        sock.settimeout(0.3)
        for _ in range(100):
            sock.sendto(query.to_wire(), (sc.addr, sc.port))
        with contextlib.suppress(TimeoutError):
            while True:
                sock.recv(65535)
                answered += 1
    assert 20 <= answered < 30  # the burst, and what refilled meanwhile
    other = dns.query.udp(query, sc.addr, port=sc.port, timeout=3, source="127.0.0.32")
    assert a_records(other) == RESOURCE_SERVER  # another client has its own bucket
    assert metric(sc, "dns_sidecar_dropped_total", reason="overload") >= 70


# --- 7. acceptance: idle TCP connections -------------------------------------------------------


def test_300_idle_tcp_connections_do_not_stop_queries(
    sidecar: StartSidecar, nsd_local: NsdServer, dig: Dig
) -> None:
    sc = sidecar("--upstream", nsd_local.address)  # tcp.max_connections 256
    idle = []
    try:
        for _ in range(300):
            idle.append(socket.create_connection((sc.addr, sc.port), timeout=3))
        time.sleep(0.3)  # all accepted (and the oldest 44 closed to make room)
        assert_answers_correctly(sc)
        tcp = dig(sc.addr, sc.port, "resource-server.local", "A", "+tcp")
        assert sorted(tcp.rdatas("A")) == RESOURCE_SERVER
        udp = dig(sc.addr, sc.port, "resource-server.local", "A")
        assert sorted(udp.rdatas("A")) == RESOURCE_SERVER
        # The quietest idle connections were closed to make room; the newest are still open.
        closed = [is_closed(sock) for sock in idle]
        assert sum(closed) >= 300 - 256 and not any(closed[-100:])
    finally:
        for sock in idle:
            sock.close()
    no_tracebacks(sc)


def is_closed(sock: socket.socket) -> bool:
    ready, _, _ = select.select([sock], [], [], 0)
    if not ready:
        return False
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
