"""Faults at the sidecar's own listeners: an address already taken at start, clients that reset
their TCP connections, datagrams the kernel drops because the receive buffer is full."""

from __future__ import annotations

import signal
import socket
import struct
import subprocess
import sys
import time

import dns.message
import dns.query
import pytest

from tests.fakes.nsd import NsdServer, free_port, loopback_host
from tests.integration.conftest import REPO_ROOT, StartSidecar, clean_env
from tests.integration.test_hostile import metric

pytestmark = pytest.mark.integration

RESETS = 200
BURST = 2000


@pytest.mark.parametrize("kind", [socket.SOCK_DGRAM, socket.SOCK_STREAM])
def test_cannot_listen_names_the_address_the_protocol_and_the_errno(
    kind: socket.SocketKind,
) -> None:
    host = loopback_host(9)
    port = free_port(host)
    protocol = "udp" if kind == socket.SOCK_DGRAM else "tcp"
    with socket.socket(socket.AF_INET, kind) as taken:
        taken.bind((host, port))
        proc = subprocess.run(
            [sys.executable, "-m", "sidecar", "--listen", f"{host}:{port}", "--upstream",
             "127.0.0.1:1", "--metrics-listen", f"{host}:{free_port(host)}", "--log-format",
             "text"],
            capture_output=True, text=True, timeout=30, check=False, cwd=REPO_ROOT,
            env=clean_env(),
        )  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if "cannot listen" in line]
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert f"address={host}:{port}" in lines[0]
    assert f"protocol={protocol}" in lines[0]
    assert "errno=EADDRINUSE" in lines[0]


def _reset_connection(host: str, port: int) -> None:
    """Connect and close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.connect((host, port))


def test_connections_the_client_resets_count_as_reset_not_refused(
    sidecar: StartSidecar, nsd_default: NsdServer
) -> None:
    sc = sidecar("--upstream", nsd_default.address)
    for _ in range(RESETS):
        _reset_connection(sc.addr, sc.port)
    # Most resets land before the listener accepts (getpeername fails); the rest while it
    # waits for a length prefix. Either way, none is an access-control refusal.
    deadline = time.monotonic() + 5
    while metric(sc, "dns_sidecar_dropped_total", reason="reset") == 0:
        assert time.monotonic() < deadline, "no reset counted"
        time.sleep(0.05)
    assert metric(sc, "dns_sidecar_dropped_total", reason="refused") == 0
    # The listener still serves.
    assert dns.query.tcp(
        dns.message.make_query("www.example.test.", "A"), sc.addr, port=sc.port, timeout=5
    ).answer


@pytest.mark.parametrize("reader_thread", ["true", "false"])
def test_datagrams_the_kernel_drops_on_a_full_receive_buffer_are_counted(
    sidecar: StartSidecar, nsd_default: NsdServer, reader_thread: str
) -> None:
    sc = sidecar("--upstream", nsd_default.address, "--udp-reader-thread", reader_thread)
    query = dns.message.make_query("www.example.test.", "A")
    assert dns.query.udp(query, sc.addr, port=sc.port, timeout=5).answer  # cached from here on
    received_before = metric(sc, "dns_sidecar_requests_total", proto="udp")
    assert metric(sc, "dns_sidecar_dropped_total", reason="kernel") == 0
    # Stopped, the sidecar reads nothing: the burst fills the socket's receive buffer (about
    # 200 KiB by default, each datagram costing a buffer of at least 768 bytes) and the kernel
    # drops the rest.
    sc.proc.send_signal(signal.SIGSTOP)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            for _ in range(BURST):
                client.sendto(query.to_wire(), (sc.addr, sc.port))
    finally:
        sc.proc.send_signal(signal.SIGCONT)

    def settled() -> tuple[float, float]:
        received = metric(sc, "dns_sidecar_requests_total", proto="udp") - received_before
        return received, metric(sc, "dns_sidecar_dropped_total", reason="kernel")

    deadline = time.monotonic() + 10
    while sum(settled()) < BURST:
        assert time.monotonic() < deadline, f"of {BURST} sent: received, kernel = {settled()}"
        time.sleep(0.05)
    received, kernel = settled()
    print(f"of {BURST} sent: {received:.0f} read, {kernel:.0f} dropped by the kernel")
    assert kernel > 0
    assert received + kernel == BURST  # every datagram either read or counted as dropped
