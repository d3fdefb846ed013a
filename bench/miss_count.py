"""Instructions per miss of the whole sidecar process: `python -m bench.miss_count`.

The benchmark's sidecar (bench/servers.py: this tree installed as the image installs it, its
flags) runs under valgrind's callgrind, NSD on loopback answers its upstream queries, and a
client here keeps WINDOW queries for new names in flight (a reply in, the next query out), as
the all-miss row's dnsperf keeps the socket full. Under callgrind the sidecar runs ~50 times
slower than the client and NSD, so its socket is always full and every run meets the same
conditions: two runs of one build agree to ~0.07% (bench.miss_cost's CPU time moves +-5%, the
host's speed with it). After `--warm-up` misses the counters are zeroed (`callgrind_control
-z`) and dumped after `--names` more (`-d`); what it prints is the dump's total over the
names. It covers what bench.miss_path leaves out: the listener, the sockets, the upstream
transport and the event loop. Callgrind counts user space only: work a change saves or adds
in the kernel (a system call) does not show here.

    .venv/bin/python -m bench.miss_count [--names 3000] [--window 200] [--out /tmp/mc.out]

`callgrind_annotate --inclusive=yes OUT.1` shows the C side (uvloop's callbacks, system
calls' wrappers, the interpreter, and the compiled query path's functions by name in
sidecar/native__mypyc); interpreted Python functions show as the interpreter's frames.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench import zones
from bench.image import image_bin
from bench.miss_path import callgrind
from bench.servers import Nsd, Sidecar, build_query


class CallgrindSidecar(Sidecar):
    """The benchmark's sidecar under callgrind, its dumps written to `out` (`out.1`, ...)."""

    def __init__(self, workdir: Path, upstream: str, out: Path) -> None:
        super().__init__(
            "sidecar", "127.0.0.78", workdir, None, upstream, {}, 100_000, ["--drain-seconds", "0"]
        )
        self.out = out

    def command(self) -> list[str]:
        callgrind_run = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.out}"]
        return [*callgrind_run, str(image_bin() / "python"), *super().command()]


def ask_window(sock: socket.socket, names: Sequence[str], window: int) -> None:
    """Ask every name once, `window` in flight: each reply lets the next query go."""
    sent = 0
    for _ in range(min(window, len(names))):
        sock.send(build_query(names[sent], qid=sent & 0xFFFF))
        sent += 1
    for _ in range(len(names)):
        try:
            sock.recv(4096)
        except TimeoutError:
            raise SystemExit(f"no reply within {sock.gettimeout()} s: a query was lost") from None
        if sent < len(names):
            sock.send(build_query(names[sent], qid=sent & 0xFFFF))
            sent += 1


def summary(dump: Path) -> int:
    """The total of a callgrind dump (its `summary:` line)."""
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith("summary:"):
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
    for stale in [args.out, *args.out.parent.glob(args.out.name + ".*")]:
        stale.unlink(missing_ok=True)  # an older run's dumps
    sidecar = CallgrindSidecar(work / "sidecar", nsd.address, args.out)
    try:
        sidecar.start(timeout=120.0)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((sidecar.host, sidecar.port))
            sock.settimeout(60.0)
            ask_window(sock, [f"w{i}.{zones.MISS_ZONE}" for i in range(args.warm_up)], args.window)
            callgrind("-z", sidecar.pid)
            ask_window(sock, [f"m{i}.{zones.MISS_ZONE}" for i in range(args.names)], args.window)
            callgrind("-d", sidecar.pid)
    finally:
        sidecar.stop()
        nsd.stop()
    total = summary(Path(f"{args.out}.1"))
    print(
        f"{total / args.names:,.0f} instructions per miss ({total:,} over {args.names:,} misses,"
        f" {args.window} in flight; dump {args.out}.1)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
