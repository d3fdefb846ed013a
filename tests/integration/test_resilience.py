"""Resilience of the running sidecar: coalescing, serve-stale, failover, loop refusal, drain on
SIGTERM, prefetch, probing a down upstream back, bounded work and SIGHUP reload.

Every server here is on loopback: the scripted upstream and NSD of the integration fixtures, and
sidecars started either by the `sidecar` fixture or, where a test needs the process before it
answers (or one that must never answer), by `raw_sidecar` below.
"""

from __future__ import annotations

import contextlib
import math
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest

from tests.fakes.nsd import NsdServer
from tests.fakes.scripted_upstream import (
    Answer,
    Delay,
    NxDomain,
    ScriptedUpstream,
    Silent,
)
from tests.integration.conftest import READY_NAME, REPO_ROOT, Sidecar, StartSidecar, clean_env
from tests.processes import end_all

pytestmark = pytest.mark.integration

# Stop at once on SIGTERM where the drain window is not what a test is about.
NO_DRAIN = ("--drain-seconds", "0")

FreePort = Callable[..., int]
Loopback = Callable[[], str]


# --- helpers ----------------------------------------------------------------------------------


def ask(
    addr: str, port: int, name: str, rtype: str = "A", timeout: float = 3.0
) -> tuple[dns.message.Message, float]:
    """One UDP query (EDNS, random ID); the reply and the seconds it took."""
    query = dns.message.make_query(name, dns.rdatatype.from_text(rtype))
    started = time.monotonic()
    reply = dns.query.udp(query, addr, port=port, timeout=timeout)
    return reply, time.monotonic() - started


def ask_sidecar(
    sc: Sidecar, name: str, rtype: str = "A", timeout: float = 3.0
) -> tuple[dns.message.Message, float]:
    return ask(sc.addr, sc.port, name, rtype, timeout)


def a_records(reply: dns.message.Message) -> list[str]:
    return sorted(
        rd.to_text() for rrset in reply.answer if rrset.rdtype == dns.rdatatype.A for rd in rrset
    )


def ttls(reply: dns.message.Message) -> set[int]:
    return {rrset.ttl for rrset in (*reply.answer, *reply.authority)}


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll `predicate` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def wait_for_text(sc: Sidecar, text: str, timeout: float) -> bool:
    return wait_until(lambda: text in sc.stderr_text(), timeout)


class PendingQuery:
    """A UDP query sent now whose reply is read later (so a test can act while it is in flight).

    Use as a context manager: the socket is closed when the block ends.
    """

    def __init__(self, addr: str, port: int, name: str, rtype: str = "A") -> None:
        self.query = dns.message.make_query(name, dns.rdatatype.from_text(rtype))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect((addr, port))
        self.sent = time.monotonic()
        self.sock.send(self.query.to_wire())

    def reply(self, timeout: float) -> dns.message.Message:
        """The reply carrying our ID; raises TimeoutError when none comes within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no reply to {self.query.question[0]} within {timeout}s")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            reply = dns.message.from_wire(data)
            if reply.id == self.query.id:
                return reply

    def __enter__(self) -> PendingQuery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


RawSidecar = Callable[..., Sidecar]


@pytest.fixture
def raw_sidecar(tmp_path: Path, free_port: FreePort) -> Iterator[RawSidecar]:
    """raw_sidecar(host, port, *args) starts `python -m sidecar --listen host:port --log-format
    text --metrics-listen host:FREE *args` and returns at once (no readiness wait). Stopped
    (SIGTERM, then SIGKILL) at teardown if still running.

    The caller must make sure the arguments name every upstream (`--upstream`, or a `--config`
    file that sets `upstreams`): the sidecar must never fall back to the host's resolver.
    """
    started: list[Sidecar] = []

    def start(host: str, port: int, *args: str) -> Sidecar:
        metrics_port = free_port(host)
        while metrics_port == port:
            metrics_port = free_port(host)
        argv = [
            sys.executable,
            "-m",
            "sidecar",
            "--listen",
            f"{host}:{port}",
            "--log-format",
            "text",
            "--metrics-listen",
            f"{host}:{metrics_port}",
            *args,
        ]
        stderr_path = tmp_path / f"raw-sidecar-{len(started)}.stderr"
        with stderr_path.open("wb") as err:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                cwd=REPO_ROOT,
                env=clean_env(),
            )
        sc = Sidecar(host, port, proc, stderr_path, argv)
        started.append(sc)
        return sc

    yield start

    end_all([sc.proc for sc in started], signal.SIGTERM)


def wait_answering(sc: Sidecar, timeout: float = 15.0) -> None:
    """Wait until `sc` answers a CHAOS query (answered locally, any reply counts); fail if it
    exits or stays mute."""
    query = dns.message.make_query(READY_NAME, dns.rdatatype.TXT, dns.rdataclass.CH)
    deadline = time.monotonic() + timeout
    while True:
        if sc.proc.poll() is not None:
            pytest.fail(f"sidecar exited with {sc.proc.returncode}:\n{sc.stderr_text()}")
        with contextlib.suppress(dns.exception.Timeout, OSError):
            dns.query.udp(query, sc.addr, port=sc.port, timeout=0.25)
            return
        if time.monotonic() > deadline:
            pytest.fail(f"sidecar did not answer on {sc.addr}:{sc.port}:\n{sc.stderr_text()}")
        time.sleep(0.02)


@pytest.fixture
def silent_upstream(loopback: Loopback) -> Iterator[ScriptedUpstream]:
    """A second scripted upstream, on its own loopback address, that never answers."""
    with ScriptedUpstream(host=loopback(), default=Silent()) as upstream:
        yield upstream


# --- 1. coalescing ----------------------------------------------------------------------------


def test_identical_concurrent_misses_share_one_upstream_query(
    sidecar: StartSidecar, scripted_upstream: ScriptedUpstream
) -> None:
    name = "coalesce.example.test."
    scripted_upstream.set(name, Delay(0.4, Answer(("A 192.0.2.77",), ttl=60)))
    sc = sidecar("--upstream", scripted_upstream.address, *NO_DRAIN)

    count = 300
    ids = list(range(1000, 1000 + 7 * count, 7))  # 300 distinct IDs
    queries = {qid: dns.message.make_query(name, dns.rdatatype.A) for qid in ids}
    for qid, query in queries.items():
        query.id = qid
    replies: dict[int, dns.message.Message] = {}
    with contextlib.ExitStack() as stack, selectors.DefaultSelector() as selector:
        socks: dict[int, socket.socket] = {}
        for qid in ids:
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            sock.setblocking(False)
            sock.connect((sc.addr, sc.port))
            selector.register(sock, selectors.EVENT_READ, qid)
            socks[qid] = sock
        # All 300 go out before the upstream's 0.4 s delay is over.
        started = time.monotonic()
        for qid, sock in socks.items():
            sock.send(queries[qid].to_wire())
        sent_in = time.monotonic() - started
        deadline = started + 5.0
        while len(replies) < count and time.monotonic() < deadline:
            for key, _events in selector.select(timeout=max(0.0, deadline - time.monotonic())):
                sock_ready = key.fileobj
                assert isinstance(sock_ready, socket.socket)
                with contextlib.suppress(BlockingIOError):
                    replies[key.data] = dns.message.from_wire(sock_ready.recv(65535))

    assert sent_in < 0.3, f"sending the queries took {sent_in:.3f}s, longer than the delay"
    assert len(replies) == count, f"{count - len(replies)} of {count} queries got no reply"
    assert scripted_upstream.count(name) == 1, scripted_upstream.queries(name)
    for qid, reply in replies.items():
        assert reply.id == qid
        assert reply.rcode() == dns.rcode.NOERROR, reply
        assert reply.question == queries[qid].question
        assert a_records(reply) == ["192.0.2.77"], reply


# --- 2. serve-stale ---------------------------------------------------------------------------


def test_expired_answer_served_stale_but_nxdomain_replaces_it(
    sidecar: StartSidecar, scripted_upstream: ScriptedUpstream
) -> None:
    stale_name = "stale.example.test."
    gone_name = "gone.example.test."
    scripted_upstream.set(stale_name, Answer(("A 192.0.2.31",), ttl=1))
    scripted_upstream.set(gone_name, Answer(("A 192.0.2.32",), ttl=1))
    sc = sidecar("--upstream", scripted_upstream.address, *NO_DRAIN)

    stored = time.monotonic()
    first, _ = ask_sidecar(sc, stale_name)
    assert a_records(first) == ["192.0.2.31"]
    first_gone, _ = ask_sidecar(sc, gone_name)
    assert a_records(first_gone) == ["192.0.2.32"]
    assert scripted_upstream.count(stale_name) == 1
    assert scripted_upstream.count(gone_name) == 1

    scripted_upstream.set(stale_name, Silent())
    scripted_upstream.set(gone_name, NxDomain())
    # TTL 1 s: both entries expire ~1 s after they were stored; wait until 2 s after that.
    time.sleep(max(0.0, stored + 3.05 - time.monotonic()))

    reply, took = ask_sidecar(sc, stale_name, timeout=3.0)
    assert reply.rcode() == dns.rcode.NOERROR, reply
    assert a_records(reply) == ["192.0.2.31"], reply
    assert took < 2.0, f"the stale answer took {took:.2f}s"
    assert ttls(reply) == {30}, reply
    assert scripted_upstream.count(stale_name) >= 2  # the refresh was tried

    reply, _ = ask_sidecar(sc, gone_name, timeout=3.0)
    assert reply.rcode() == dns.rcode.NXDOMAIN, reply
    assert not reply.answer, reply
    assert scripted_upstream.count(gone_name) == 2
    # The fresh NXDOMAIN replaced the entry: asked again, still NXDOMAIN (now from the cache).
    again, _ = ask_sidecar(sc, gone_name)
    assert again.rcode() == dns.rcode.NXDOMAIN, again
    assert scripted_upstream.count(gone_name) == 2


# --- 3. failover ------------------------------------------------------------------------------


def test_failover_past_an_upstream_where_nothing_listens(
    sidecar: StartSidecar,
    scripted_upstream: ScriptedUpstream,
    nsd_local: NsdServer,
    loopback: Loopback,
    free_port: FreePort,
) -> None:
    dead_host = loopback()
    dead = f"{dead_host}:{free_port(dead_host)}"
    sc = sidecar(
        "--upstream",
        scripted_upstream.address,
        "--zone",
        f"local={dead},{nsd_local.address}",
        *NO_DRAIN,
    )
    reply, took = ask_sidecar(sc, "resource-server.local.", timeout=5.0)
    assert reply.rcode() == dns.rcode.NOERROR, reply
    assert a_records(reply) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert took < 2.5, f"took {took:.2f}s"


def test_failover_past_a_silent_upstream_then_skip_it(
    sidecar: StartSidecar,
    scripted_upstream: ScriptedUpstream,
    silent_upstream: ScriptedUpstream,
) -> None:
    sc = sidecar(
        "--upstream",
        scripted_upstream.address,
        "--zone",
        f"local={silent_upstream.address},{scripted_upstream.address}",
        "--probe-interval",
        "300",  # no background probe may add to the silent upstream's log during the test
        *NO_DRAIN,
    )
    for name in ("first.local.", "second.local."):
        reply, took = ask_sidecar(sc, name, timeout=5.0)
        assert reply.rcode() == dns.rcode.NOERROR, reply
        assert a_records(reply) == ["192.0.2.1"]
        assert took < 1.5, f"{name} took {took:.2f}s"
        assert silent_upstream.count(name) == 1  # asked first, timed out (one failure)
    assert wait_for_text(sc, "upstream down", 2.0), sc.stderr_text()

    seen = silent_upstream.count()
    reply, took = ask_sidecar(sc, "third.local.", timeout=5.0)
    assert reply.rcode() == dns.rcode.NOERROR, reply
    assert took < 0.5, f"the down upstream was not skipped: {took:.2f}s"
    assert silent_upstream.count() == seen, silent_upstream.queries()
    assert scripted_upstream.count("third.local.") == 1


# --- 4. loop refusal --------------------------------------------------------------------------


def test_upstream_equal_to_listen_address_is_refused_at_start(
    loopback: Loopback, free_port: FreePort
) -> None:
    host = loopback()
    address = f"{host}:{free_port(host)}"
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "--listen", address, "--upstream", address],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=REPO_ROOT,
        env=clean_env(),
        check=False,
    )
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert address in lines[0] and "loop" in lines[0], lines[0]


@pytest.mark.parametrize("workers", ["1", "3"])
def test_loop_through_another_forwarder_stops_the_second_sidecar(
    sidecar: StartSidecar,
    raw_sidecar: RawSidecar,
    loopback: Loopback,
    free_port: FreePort,
    workers: str,
) -> None:
    b_host = loopback()
    b_port = free_port(b_host)
    # A forwards to B, where nothing listens yet: A's own start-up probe gets no answer.
    a = sidecar("--upstream", f"{b_host}:{b_port}", *NO_DRAIN)
    # With several workers the probe of B's worker 0 may come back to any of them.
    b = raw_sidecar(
        b_host, b_port, "--upstream", f"{a.addr}:{a.port}", "--workers", workers, *NO_DRAIN
    )
    try:
        returncode = b.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("B kept running although its queries come back through A:\n" + b.stderr_text())
    assert returncode != 0, b.stderr_text()
    assert "forwarding loop" in b.stderr_text(), b.stderr_text()
    assert a.proc.poll() is None, a.stderr_text()


# --- 5. SIGTERM drain -------------------------------------------------------------------------


def test_sigterm_answers_in_flight_and_drain_window_queries_then_exits_0(
    sidecar: StartSidecar, scripted_upstream: ScriptedUpstream
) -> None:
    slow = "slow.example.test."
    scripted_upstream.set(slow, Delay(1.0, Answer(("A 192.0.2.51",))))
    # The attempt timeout (1 s by default) must outlast the upstream's 1 s delay.
    sc = sidecar(
        "--upstream", scripted_upstream.address, "--attempt-timeout", "2",
        "--drain-seconds", "2",  # the default
    )  # fmt: skip

    with PendingQuery(sc.addr, sc.port, slow) as in_flight:
        assert scripted_upstream.wait_for(1, slow, timeout=3.0), sc.stderr_text()
        sc.proc.send_signal(signal.SIGTERM)
        term_sent = time.monotonic()
        time.sleep(0.5)  # into the drain window
        late, _ = ask_sidecar(sc, "late.example.test.", timeout=2.0)
        assert late.rcode() == dns.rcode.NOERROR, late
        assert a_records(late) == ["192.0.2.1"]
        reply = in_flight.reply(timeout=4.0)
    assert reply.rcode() == dns.rcode.NOERROR, reply
    assert a_records(reply) == ["192.0.2.51"]
    try:
        returncode = sc.proc.wait(timeout=max(0.0, term_sent + 5.0 - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail("no exit within 5 s of SIGTERM:\n" + sc.stderr_text())
    assert returncode == 0, sc.stderr_text()
    assert time.monotonic() - term_sent < 5.0


def test_sigterm_without_drain_window_still_answers_in_flight(
    sidecar: StartSidecar, scripted_upstream: ScriptedUpstream
) -> None:
    slow = "slow.example.test."
    scripted_upstream.set(slow, Delay(1.0, Answer(("A 192.0.2.52",))))
    sc = sidecar("--upstream", scripted_upstream.address, "--attempt-timeout", "2", *NO_DRAIN)

    with PendingQuery(sc.addr, sc.port, slow) as in_flight:
        assert scripted_upstream.wait_for(1, slow, timeout=3.0), sc.stderr_text()
        sc.proc.send_signal(signal.SIGTERM)
        term_sent = time.monotonic()
        reply = in_flight.reply(timeout=4.0)
    assert reply.rcode() == dns.rcode.NOERROR, reply
    assert a_records(reply) == ["192.0.2.52"]
    try:
        returncode = sc.proc.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        pytest.fail("no exit within 5 s of SIGTERM:\n" + sc.stderr_text())
    assert returncode == 0, sc.stderr_text()
    assert time.monotonic() - term_sent < 5.0


# --- 6. prefetch ------------------------------------------------------------------------------


def test_prefetch_refreshes_a_popular_name_before_it_expires(
    sidecar: StartSidecar, scripted_upstream: ScriptedUpstream
) -> None:
    name = "popular.example.test."
    scripted_upstream.set(name, Answer(("A 192.0.2.61",), ttl=4))
    sc = sidecar("--upstream", scripted_upstream.address, "--prefetch-percent", "50", *NO_DRAIN)

    t0 = time.monotonic()
    reply, _ = ask_sidecar(sc, name)
    assert a_records(reply) == ["192.0.2.61"]
    assert scripted_upstream.count(name) == 1

    time.sleep(max(0.0, t0 + 2.5 - time.monotonic()))  # past 50 % of the TTL
    reply, took = ask_sidecar(sc, name)
    assert a_records(reply) == ["192.0.2.61"]
    assert took < 0.25, f"a hit took {took:.3f}s"
    assert ttls(reply) <= {1, 2}, reply  # the old entry, counting down

    assert scripted_upstream.wait_for(2, name, timeout=max(0.0, t0 + 4.0 - time.monotonic()))
    refreshed_at = scripted_upstream.queries(name)[1].at
    assert refreshed_at < t0 + 4.0

    time.sleep(max(0.0, t0 + 4.5 - time.monotonic()))  # the first entry has expired by now
    asked_at = time.monotonic()
    reply, took = ask_sidecar(sc, name)
    assert a_records(reply) == ["192.0.2.61"]
    assert took < 0.25, f"took {took:.3f}s"
    assert scripted_upstream.count(name) == 2
    [ttl] = ttls(reply)
    expected = math.ceil(refreshed_at + 4 - asked_at)  # what remains of the refreshed entry
    assert expected - 1 <= ttl <= expected + 1, (ttl, expected)


# --- 7. probing a down upstream back ----------------------------------------------------------


def test_probe_brings_a_down_upstream_back(
    sidecar: StartSidecar,
    scripted_upstream: ScriptedUpstream,
    silent_upstream: ScriptedUpstream,
) -> None:
    primary = silent_upstream  # silent for now
    sc = sidecar(
        "--upstream",
        scripted_upstream.address,
        "--zone",
        f"local={primary.address},{scripted_upstream.address}",
        "--probe-interval",
        "0.2",
        "--attempt-timeout",
        "0.5",
        *NO_DRAIN,
    )
    for name in ("one.local.", "two.local."):
        reply, _ = ask_sidecar(sc, name, timeout=5.0)
        assert a_records(reply) == ["192.0.2.1"], reply  # from the second upstream
    assert primary.count("one.local.") == 1 and primary.count("two.local.") == 1
    assert wait_for_text(sc, "upstream down", 2.0), sc.stderr_text()
    assert "upstream up" not in sc.stderr_text()

    primary.default = Answer(("A 192.0.2.71",))
    assert wait_for_text(sc, "upstream up", 5.0), sc.stderr_text()

    reply, took = ask_sidecar(sc, "three.local.")
    assert a_records(reply) == ["192.0.2.71"], reply
    assert primary.count("three.local.") == 1
    assert scripted_upstream.count("three.local.") == 0
    assert took < 0.5, f"took {took:.2f}s"


# --- 8. bounded work --------------------------------------------------------------------------


def test_beyond_max_inflight_a_miss_gets_servfail_at_once(
    sidecar: StartSidecar, scripted_upstream: ScriptedUpstream
) -> None:
    slow = "slow.example.test."
    scripted_upstream.set(slow, Delay(1.0, Answer(("A 192.0.2.81",))))
    sc = sidecar(
        "--upstream",
        scripted_upstream.address,
        "--max-inflight",
        "1",
        "--attempt-timeout",
        "2",  # longer than the upstream's delay
        *NO_DRAIN,
    )

    with PendingQuery(sc.addr, sc.port, slow) as in_flight:
        assert scripted_upstream.wait_for(1, slow, timeout=3.0), sc.stderr_text()
        reply, took = ask_sidecar(sc, "other.example.test.", timeout=2.0)
        assert reply.rcode() == dns.rcode.SERVFAIL, reply
        assert took < 0.3, f"SERVFAIL took {took:.3f}s"
        assert scripted_upstream.count("other.example.test.") == 0
        first = in_flight.reply(timeout=3.0)
    assert a_records(first) == ["192.0.2.81"], first


# --- 9. SIGHUP reload -------------------------------------------------------------------------


def test_sighup_reload_keeps_the_cache_and_refuses_a_bad_file(
    raw_sidecar: RawSidecar,
    scripted_upstream: ScriptedUpstream,
    loopback: Loopback,
    free_port: FreePort,
    tmp_path: Path,
) -> None:
    config = tmp_path / "sidecar.toml"

    def write(max_ttl: int) -> None:
        # `upstreams` always set: the sidecar must never fall back to the machine's resolver.
        config.write_text(
            f'upstreams = ["{scripted_upstream.address}"]\n\n[cache]\nmax_ttl = {max_ttl}\n'
        )

    write(3600)
    host = loopback()
    sc = raw_sidecar(host, free_port(host), "--config", str(config), *NO_DRAIN)
    wait_answering(sc)
    # SIGHUP is handled once "started" is logged (before that it would end the process).
    assert wait_for_text(sc, "started", 5.0), sc.stderr_text()

    name = "reload.example.test."
    reply, _ = ask_sidecar(sc, name)
    assert a_records(reply) == ["192.0.2.1"]
    assert scripted_upstream.count(name) == 1

    write(1800)
    sc.proc.send_signal(signal.SIGHUP)
    assert wait_for_text(sc, "reloaded", 5.0), sc.stderr_text()
    [reloaded] = [line for line in sc.stderr_text().splitlines() if " reloaded " in line]
    assert "1800" in reloaded, reloaded  # the new max_ttl was read
    reply, _ = ask_sidecar(sc, name)
    assert a_records(reply) == ["192.0.2.1"]
    assert scripted_upstream.count(name) == 1, "the reload dropped the cache"

    write(0)  # max_ttl must be at least 1
    sc.proc.send_signal(signal.SIGHUP)
    assert wait_for_text(sc, "reload refused", 5.0), sc.stderr_text()
    assert sc.proc.poll() is None, sc.stderr_text()
    reply, _ = ask_sidecar(sc, "after-refusal.example.test.")
    assert a_records(reply) == ["192.0.2.1"], reply
    reply, _ = ask_sidecar(sc, name)
    assert a_records(reply) == ["192.0.2.1"]
    assert scripted_upstream.count(name) == 1
    assert sc.proc.poll() is None, sc.stderr_text()


@pytest.mark.integration
def test_upstream_that_refuses_fails_fast_without_hammering_it(
    sidecar: StartSidecar, loopback: Loopback, free_port: FreePort
) -> None:
    """Nothing listens at the only upstream: the kernel refuses at once. The client gets
    SERVFAIL at once, and the upstream is not asked again and again until the deadline."""
    dead_host = loopback()
    metrics_host = loopback()
    metrics = f"{metrics_host}:{free_port(metrics_host)}"
    sc = sidecar(
        "--upstream", f"{dead_host}:{free_port(dead_host)}", "--metrics-listen", metrics, *NO_DRAIN
    )
    reply, took = ask_sidecar(sc, "nowhere.test.", timeout=5.0)
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert took < 0.5, f"took {took:.2f}s"
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=2) as response:
        text = response.read().decode()
    refused = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("dns_sidecar_upstream_errors_total{") and 'reason="unreachable"' in line
    ]
    # One attempt for the query, perhaps one for the start-up loop check: never thousands.
    assert 1 <= sum(refused) <= 3, refused


# --- workers ------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()]


def _requests(url: str) -> float:
    with urllib.request.urlopen(url, timeout=2) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("dns_sidecar_requests_total{")
    )


def test_workers_share_the_address_and_stop_together(
    sidecar: StartSidecar, scripted_upstream: ScriptedUpstream, loopback: Loopback,
    free_port: FreePort,
) -> None:  # fmt: skip
    host = loopback()
    port = free_port(host)
    while free_port(host) == port + 1:  # the second worker's HTTP port must be free too
        port = free_port(host)
    sc = sidecar(
        "--upstream", scripted_upstream.address, "--workers", "2",
        "--metrics-listen", f"{host}:{port}", *NO_DRAIN,
    )  # fmt: skip
    for index in range(60):  # a fresh socket (source port) each: the kernel spreads them
        reply, _ = ask_sidecar(sc, f"w{index % 5}.example.test.")
        assert reply.rcode() == dns.rcode.NOERROR
    per_worker = [_requests(f"http://{host}:{port + i}/metrics") for i in range(2)]
    assert 60 <= sum(per_worker) <= 63, per_worker  # and the fixture's readiness queries
    assert min(per_worker) > 0, per_worker
    workers = _children(sc.proc.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)  # one worker dies: the sidecar must not half-run
    assert sc.proc.wait(timeout=5) == 128 + signal.SIGKILL, sc.stderr_text()
    assert "a worker failed" in sc.stderr_text()
    assert wait_until(lambda: not Path(f"/proc/{workers[0]}").exists(), 5.0)
