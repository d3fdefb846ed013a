"""Instructions per miss of the whole sidecar process: `python -m bench.miss_count`.

The sidecar runs from this tree on the image's kind of interpreter under valgrind's callgrind,
NSD on loopback answers its upstream queries, and a client here keeps WINDOW queries for new
names in flight (a reply in, the next query out), as the all-miss row's dnsperf keeps the
socket full. Under callgrind the sidecar runs ~50 times slower than the client and NSD, so its
socket is always full and every run meets the same conditions: two runs of one build agree to
~0.05% (bench.miss_cost's CPU time moves +-5%, the host's speed with it). After `--warm-up`
misses the counters are zeroed (`callgrind_control -z`) and dumped after `--names` more
(`-d`); what it prints is the dump's total over the names. It covers what bench.miss_path
leaves out: the listener, the sockets, the upstream transport and the event loop.

    .venv/bin/python -m bench.miss_count [--names 3000] [--window 200] [--out /tmp/mc.out]

`callgrind_annotate --inclusive=yes OUT.1` shows the C side (uvloop's callbacks, system
calls, the interpreter); Python functions show as the interpreter's frames.
"""

from __future__ import annotations

import argparse
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench import zones
from bench.image import image_bin
from bench.run import ROOT
from bench.servers import Nsd, Sidecar, free_port


def query(qid: int, name: str) -> bytes:
    """A plain A query for `name` (no EDNS), its ID `qid` (mod 2**16)."""
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p)
    return struct.pack("!HHHHHH", qid & 0xFFFF, 0x0100, 1, 0, 0, 0) + labels + b"\0\0\1\0\1"


def ask_window(sock: socket.socket, names: Sequence[str], window: int) -> None:
    """Ask every name once, `window` in flight: each reply lets the next query go."""
    sent = 0
    for _ in range(min(window, len(names))):
        sock.send(query(sent, names[sent]))
        sent += 1
    for _ in range(len(names)):
        try:
            sock.recv(4096)
        except TimeoutError:
            raise SystemExit(f"no reply within {sock.gettimeout()} s: a query was lost") from None
        if sent < len(names):
            sock.send(query(sent, names[sent]))
            sent += 1


def wait_serving(sock: socket.socket, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.send(query(1, f"ready.{zones.MISS_ZONE}"))
            sock.recv(4096)
            return
        except OSError:  # refused (not bound yet) or timed out
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def summary(dump: Path) -> int:
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise SystemExit(f"{dump}: no summary line")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", type=int, default=3000, help="misses counted")
    parser.add_argument("--warm-up", type=int, default=1000, help="misses before the count")
    parser.add_argument("--window", type=int, default=200, help="queries in flight")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "miss_count")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="miss-count-"))
    nsd = Nsd("127.0.0.77", work / "nsd", None, {zones.BENCH_ZONE: zones.bench_zone(1)})
    nsd.start()
    host = "127.0.0.78"
    sidecar = Sidecar("sidecar", host, work / "sidecar", None, nsd.address, {}, 100_000)
    sidecar.port = free_port(host)
    flags = sidecar.command()[1:]  # the benchmark's flags, for this tree's `python -m sidecar`
    for stale in args.out.parent.glob(args.out.name + "*"):
        stale.unlink()
    command = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={args.out}",
        str(image_bin() / "python"), "-m", "sidecar", *flags, "--drain-seconds", "0",
    ]  # fmt: skip
    with (work / "sidecar.log").open("wb") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=sidecar.env(), stdout=log, stderr=log)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((host, sidecar.port))
            sock.settimeout(2.0)
            wait_serving(sock, timeout=120.0)
            sock.settimeout(60.0)
            ask_window(sock, [f"w{i}.{zones.MISS_ZONE}" for i in range(args.warm_up)], args.window)
            subprocess.run(
                ["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True
            )
            ask_window(sock, [f"m{i}.{zones.MISS_ZONE}" for i in range(args.names)], args.window)
            subprocess.run(
                ["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True
            )
    finally:
        proc.terminate()
        proc.wait(60)
        nsd.stop()
    total = summary(Path(f"{args.out}.1"))
    print(
        f"{total / args.names:,.0f} instructions per miss ({total:,} over {args.names:,} misses,"
        f" {args.window} in flight; dump {args.out}.1)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
