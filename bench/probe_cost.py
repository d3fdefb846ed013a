"""The CPU a sidecar spends probing 4,096 endpoints, for each max_probes_per_second given:

    .venv/bin/python -m bench.probe_cost 0 200

128 names x 32 A records on 127.1.0.0/16 served by NSD on loopback, one TCP listener (bound to
0.0.0.0, so it answers every 127.x address) accepting every probe, every name asked over TCP
every 2 s so that all of them stay asked; the sidecar's user + system CPU over 20 s, from /proc.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import dns.message
import dns.query

from tests.fakes.nsd import free_port, running_nsd

NAMES, PER_NAME, SECONDS = 128, 32, 20.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def zone() -> str:
    lines = ["$ORIGIN local.", "$TTL 60", "@ IN SOA ns hostmaster 1 3600 600 86400 30"]
    lines += ["@ IN NS ns", "ns IN A 127.0.0.1"]
    for n in range(NAMES):
        lines += [f"s{n} IN A 127.1.{n}.{j + 1}" for j in range(PER_NAME)]
    return "\n".join(lines) + "\n"


def accept_forever(listener: socket.socket) -> None:
    while True:
        conn, _ = listener.accept()
        conn.close()


def ask_all(port: int) -> None:
    for n in range(NAMES):
        query = dns.message.make_query(f"s{n}.local.", "A")
        dns.query.tcp(query, "127.0.0.1", port=port, timeout=3)


def measure(nsd_address: str, probe_port: int, rate: str) -> float:
    """The sidecar's share of one core while it probes every endpoint at `rate` a second."""
    port = free_port()
    sidecar = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "--listen", f"127.0.0.1:{port}",
         "--upstream", nsd_address, "--zone", f"local={nsd_address}",
         "--health-check", f"local=tcp:{probe_port}", "--max-endpoints", "5000",
         "--max-endpoint-probes-per-second", rate, "--passive-health", "off",
         "--log-level", "error", "--drain-seconds", "0"],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(1.5)
        ask_all(port)
        time.sleep(3.0)  # the first probes of every endpoint
        before, start = cpu_seconds(sidecar.pid), time.monotonic()
        while time.monotonic() - start < SECONDS:
            ask_all(port)
            time.sleep(2.0)
        return (cpu_seconds(sidecar.pid) - before) / (time.monotonic() - start)
    finally:
        sidecar.terminate()
        sidecar.wait()


def main(argv: Sequence[str] | None = None) -> int:
    rates = list(argv if argv is not None else sys.argv[1:]) or ["0", "200"]
    listener = socket.create_server(("0.0.0.0", 0), backlog=4096)
    threading.Thread(target=accept_forever, args=(listener,), daemon=True).start()
    with tempfile.TemporaryDirectory() as work, running_nsd({"local.": zone()}, Path(work)) as nsd:
        for rate in rates:
            share = measure(nsd.address, listener.getsockname()[1], rate)
            print(f"{NAMES * PER_NAME} endpoints, max_probes_per_second {rate}: "
                  f"{100 * share:.1f}% of one core")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
