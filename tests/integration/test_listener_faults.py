"""Faults at the sidecar's own listeners: an address already taken at start, clients that reset
their TCP connections, datagrams the kernel drops because the receive buffer is full."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tests.fakes.nsd import free_port, loopback_host
from tests.integration.conftest import REPO_ROOT, clean_env

pytestmark = pytest.mark.integration


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
