"""Resident memory per cached answer, measured: the figures in docs/configuration.md.

    python -m tests.memory_per_entry [--names 5000]

For each kind of answer a fresh sidecar runs in front of NSD on loopback with a budget that
never binds; one name of the kind is asked (so every code path has run), then `names` more,
each three times in a row over UDP (the third from a fast-path row), or once (no row). The
figure is the growth of VmRSS (/proc) divided by the names. Not part of `make test`: it takes
about a minute, and RSS is a whole-process figure.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dns.message
import dns.query

from tests.fakes.nsd import free_port, loopback_host, running_nsd
from tests.integration.conftest import clean_env

ZONE = "mem.test"
# kind: (A records per name, sidecar flags, asks per name)
KINDS: dict[str, tuple[int, list[str], int]] = {
    "1 A record, no row": (1, [], 1),
    "1 A record, with a row": (1, [], 3),
    "3 A records, answer_order upstream, with a row": (3, ["--answer-order", "upstream"], 3),
    "3 A records, rotated, no row": (3, [], 1),
    "3 A records, rotated, with a row": (3, [], 3),
    "8 A records, rotated, with a row": (8, [], 3),
    "32 A records, discovery zone, with a row": (32, ["--health-check", f"{ZONE}=tcp:DEAD"], 3),
}


def zone_text(names: int, addresses: int) -> str:
    lines = [f"$ORIGIN {ZONE}.", "$TTL 3600", "@ IN SOA ns hostmaster 1 3600 600 86400 30"]
    lines += ["@ IN NS ns", "ns IN A 127.0.0.1"]
    for i in range(names + 1):
        lines += [f"n{i} IN A 127.0.{40 + j // 250}.{j % 250 + 1}" for j in range(addresses)]
    return "\n".join(lines) + "\n"


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def ask(host: str, port: int, index: int, times: int) -> None:
    for _ in range(times):
        query = dns.message.make_query(f"n{index}.{ZONE}.", "A", use_edns=0, payload=4096)
        dns.query.udp(query, host, port=port, timeout=3.0)


def measure(kind: str, names: int, work: Path) -> float:
    addresses, flags, asks = KINDS[kind]
    if addresses == 32:
        names = min(names, 300)  # ~190 KB each
    dead = str(free_port(loopback_host(3)))
    with running_nsd({f"{ZONE}.": zone_text(names, addresses)}, work / "nsd") as nsd:
        host = loopback_host(1)
        port, metrics = free_port(host), free_port(host)
        argv = [sys.executable, "-m", "sidecar", "--listen", f"{host}:{port}"]
        argv += ["--metrics-listen", f"{host}:{metrics}", "--upstream", nsd.address]
        argv += ["--cache-max-bytes", str(1 << 32), "--log-level", "warning"]
        argv += [flag.replace("DEAD", dead) for flag in flags]
        proc = subprocess.Popen(argv, env=clean_env(), stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.5)
            ask(host, port, names, asks)  # every code path once
            time.sleep(1.5)
            idle = rss_kib(proc.pid)
            for index in range(names):
                ask(host, port, index, asks)
            time.sleep(0.5)
            return (rss_kib(proc.pid) - idle) * 1024 / names
        finally:
            proc.terminate()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for n, kind in enumerate(KINDS):
            work = Path(tmp) / str(n)
            work.mkdir()
            print(f"{kind}: {measure(kind, args.names, work) / 1024:.2f} KiB per name", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
