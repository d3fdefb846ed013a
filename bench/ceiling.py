"""What a Python cache-hit path can reach here: `python -m bench.ceiling`.

Toy responders answer the 1,000 cache-hit names of the benchmark from a dict of finished
replies (the query's bytes after the ID -> the reply's bytes after the ID), with nothing else:
no TTL, no metrics, no checks. They differ only in how datagrams come in and go out:

- `protocol`: an asyncio.DatagramProtocol on uvloop: `datagram_received`, `transport.sendto`
  (what the sidecar does with `udp_reader_thread = false`);
- `reader`: uvloop's `add_reader` on a plain non-blocking socket; each wake-up drains up to 64
  datagrams with `sock.recvfrom` and answers each with `sock.sendto`;
- `blocking`: no event loop at all: a plain blocking socket, `recvfrom` then `sendto`, in a loop
  (the least a Python process can do per datagram);
- `thread`: the same loop in a thread of its own while the main thread sits in an idle uvloop
  loop: the reader thread without batches (sidecar/server/udp_thread.py before recvmmsg);
- `batch`: that thread reading and answering in batches with the sidecar's own recvmmsg /
  sendmmsg wrapper and its batch closure (sidecar/server/datagram_batch.py), over this table
  with rows that never expire: the sidecar's model.
- `batch-cold`: the same closure with no rows: each query is answered the way the sidecar's
  reader thread answers a hit with no row (`FastPath.answer_cold`): `wire.parse_query`, a dict
  lookup of the cache key, `Entry.render_with_ttl` with the TTL left, and nothing else (no
  counting, no hand-off, no admission). With `--names 100000` it is the ceiling of the
  100,000-name row of `make bench`.

They run pinned to the server core next to dnsmasq and the sidecar, and each is measured with
the benchmark's dnsperf settings, in A B C D D C B A order, for a few rounds, and then with one
query in flight (the benchmark's p50/p99 row: `load.one_in_flight`), and at half of each one's
own QPS of the round (the benchmark's p99-at-half-load row: dnsperf -Q, 1.5 s). The result,
`bench/results/ceiling.md`, is the ceiling the sidecar's hit path can approach in one process,
in throughput, in the latency of a query that comes alone and in the tail at half load.

`python -m bench.ceiling serve --mode MODE --listen HOST:PORT` runs one responder.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import socket
import statistics
import struct
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench import load, zones
from bench.image import image_python, interpreter_line
from bench.run import ROOT, cpu_busy_share, log, steal_mark, stolen_since
from bench.servers import Dnsmasq, Nsd, Server, Sidecar

MODES = ("protocol", "reader", "blocking", "thread", "batch", "batch-cold")
HALF_LOAD_SECONDS = 1.5  # as bench/run.py's latency runs


def reply_table(names: Sequence[str]) -> dict[bytes, bytes]:
    """query[2:] -> reply[2:] for an A query with RD and no EDNS (what dnsperf sends)."""
    table: dict[bytes, bytes] = {}
    for i, name in enumerate(names):
        question = b"".join(bytes((len(x),)) + x.encode() for x in name.split(".")) + b"\x00"
        question += struct.pack("!HH", 1, 1)
        query_tail = struct.pack("!HHHHH", 0x0100, 1, 0, 0, 0) + question
        address = bytes((127, 1, i // 250 % 250, i % 250 + 1))  # as bench/zones.py
        answer = struct.pack("!HHHIH", 0xC00C, 1, 1, 3600, 4) + address
        table[query_tail] = struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0) + question + answer
    return table


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, table: dict[bytes, bytes]) -> None:
        self.table = table
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        tail = self.table.get(data[2:])
        if tail is not None and self.transport is not None:
            self.transport.sendto(data[:2] + tail, addr)


def _serve_blocking(host: str, port: int) -> None:
    table = reply_table(zones.hit_names(1000))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, port))
    recvfrom, sendto, get = sock.recvfrom, sock.sendto, table.get
    while True:
        data, addr = recvfrom(512)
        tail = get(data[2:])
        if tail is not None:
            sendto(data[:2] + tail, addr)


class _Row:
    """A reply that never expires, as the sidecar's batch server reads a fast-path row."""

    __slots__ = ("next_tail", "tail", "valid_until")

    def __init__(self, tail: bytes) -> None:
        self.tail = tail
        self.next_tail = lambda: tail
        self.valid_until = float("inf")


def _serve_batches(host: str, port: int) -> None:
    import time

    from sidecar.server.datagram_batch import DatagramBatch

    rows = {key: _Row(tail) for key, tail in reply_table(zones.hit_names(1000)).items()}
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, port))
    batch = DatagramBatch(sock)
    # The sidecar's own batch closure, over this table: no counting, nothing lent.
    serve = batch.server(rows.get, None, lambda _served: None, lambda _rest: None, time.monotonic)
    while True:
        serve(batch.receive())


def _serve_cold(host: str, port: int, names: int) -> None:
    import math
    import time

    from sidecar.core import wire
    from sidecar.core.cache import Entry
    from sidecar.server.datagram_batch import DatagramBatch

    entries: dict[bytes, Entry] = {}
    expires = time.monotonic() + 3600
    for query_tail, reply_tail in reply_table(zones.hit_names(names)).items():
        q = wire.parse_query(b"\0\0" + query_tail)
        msg = b"\0\0" + reply_tail
        entries[q.key] = Entry(
            msg, wire.parse_reply(msg), ttl=3600, expires=expires, negative=False, do=False,
            patch_ttls=True,
        )  # fmt: skip
    get, parse, udp_limit, ceil = entries.get, wire.parse_query, wire.udp_limit, math.ceil

    def answer_cold(data: bytes, now: float, _cold: list[object]) -> bytes | None:
        q = parse(data)
        entry = get(q.key)
        if entry is None or entry.expires <= now:
            return None
        return entry.render_with_ttl(data, q, ceil(entry.expires - now), udp_limit(q.edns_size))

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, port))
    batch = DatagramBatch(sock)
    no_rows: dict[bytes, _Row] = {}
    serve = batch.server(
        no_rows.get, None, lambda _s: None, lambda _r: None, time.monotonic, answer_cold
    )
    while True:
        serve(batch.receive())


async def _serve(mode: str, host: str, port: int) -> None:
    table = reply_table(zones.hit_names(1000))
    loop = asyncio.get_running_loop()
    if mode == "protocol":
        await loop.create_datagram_endpoint(lambda: _Protocol(table), local_addr=(host, port))
    elif mode == "reader":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host, port))
        sock.setblocking(False)
        recvfrom, sendto, get = sock.recvfrom, sock.sendto, table.get

        def readable() -> None:
            for _ in range(64):
                try:
                    data, addr = recvfrom(512)
                except BlockingIOError:
                    return
                tail = get(data[2:])
                if tail is not None:
                    # A full socket buffer drops the reply, as a busy server does.
                    with contextlib.suppress(BlockingIOError):
                        sendto(data[:2] + tail, addr)

        loop.add_reader(sock.fileno(), readable)
    await asyncio.Event().wait()  # until SIGTERM


def serve(argv: Sequence[str]) -> int:
    import signal

    import uvloop

    parser = argparse.ArgumentParser(prog="python -m bench.ceiling serve")
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--names", type=int, default=1000)
    args = parser.parse_args(argv)
    host, port = args.listen.rsplit(":", 1)
    signal.signal(signal.SIGTERM, lambda _s, _f: sys.exit(0))
    if args.mode == "blocking":
        _serve_blocking(host, int(port))
    if args.mode in ("thread", "batch", "batch-cold"):
        import threading

        if args.mode == "batch-cold":
            threading.Thread(
                target=_serve_cold, args=(host, int(port), args.names), daemon=True
            ).start()
        else:
            target = _serve_blocking if args.mode == "thread" else _serve_batches
            threading.Thread(target=target, args=(host, int(port)), daemon=True).start()
    uvloop.run(_serve(args.mode, host, int(port)))
    return 0


class Responder(Server):
    kind = "responder"

    def __init__(
        self, mode: str, host: str, workdir: Path, cpus: str | None, names: int = 1000
    ) -> None:
        super().__init__(f"python-{mode}", host, workdir, cpus)
        self.mode = mode
        self.names = names

    def command(self) -> list[str]:
        exe = str(image_python())  # the sidecar's interpreter (bench/image.py)
        return [
            *(exe, "-m", "bench.ceiling", "serve", "--mode", self.mode),
            *("--listen", self.address, "--names", str(self.names)),
        ]


def measure(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ceiling.md")
    parser.add_argument("--names", type=int, default=1000, help="cached names, asked shuffled")
    parser.add_argument("--modes", default=",".join(MODES), help="toy responders, comma-separated")
    parser.add_argument(
        "--latency-count", type=int, default=5000, help="queries one at a time, per server/round"
    )
    args = parser.parse_args(argv)
    names = zones.hit_names(args.names)
    random.Random(7).shuffle(names)
    modes = args.modes.split(",")
    os.sched_setaffinity(0, {0})
    os.environ["PYTHONPATH"] = str(ROOT)  # the responders import bench
    busy = cpu_busy_share()
    mark = steal_mark()
    work = Path(tempfile.mkdtemp(prefix="dns-bench-ceiling-"))
    nsd = Nsd("127.0.21.1", work / "nsd", None, {zones.BENCH_ZONE: zones.bench_zone(args.names)})
    servers: list[Server] = []
    results: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}  # the server's CPU time / run time
    latency: dict[str, dict[str, list[float]]] = {}  # p50/p99 at one query in flight, by round
    half: dict[str, dict[str, list[float]]] = {}  # p50/p99 at half of the round's QPS
    try:
        nsd.start()
        servers = [
            Dnsmasq("dnsmasq", "127.0.20.3", work / "dnsmasq", "1", nsd.address, {}, 210000),
            Sidecar("sidecar", "127.0.20.1", work / "sidecar", "1", nsd.address, {}, 210000),
            *(
                Responder(m, f"127.0.20.{6 + i}", work / m, "1", args.names)
                for i, m in enumerate(modes)
            ),
        ]
        for server in servers:
            server.start()
        data = zones.write_query_file(work / "hits.txt", names)
        for server in servers:
            load.dnsperf(server.address, data, seconds=60, once=True, clients=4, outstanding=200)
        for round_no in range(args.rounds):
            order = servers[round_no % len(servers) :] + servers[: round_no % len(servers)]
            for server in [*order, *reversed(order)]:
                cpu0 = server.cpu_seconds()
                res = load.dnsperf(server.address, data, seconds=args.seconds)
                results.setdefault(server.label, []).append(res.qps)
                busy_share = (server.cpu_seconds() - cpu0) / res.runtime if res.runtime else 0
                cpu.setdefault(server.label, []).append(busy_share)
            for server in order:
                samples, _lost = load.one_in_flight(
                    server.address, names, count=args.latency_count, seconds=args.seconds
                )
                p50, p99 = load.percentiles(samples, (50, 99))
                by_p = latency.setdefault(server.label, {})
                by_p.setdefault("p50", []).append(p50 * 1e6)
                by_p.setdefault("p99", []).append(p99 * 1e6)
            for server in order:
                rate = statistics.mean(results[server.label][-2:]) / 2
                res = load.dnsperf(
                    server.address,
                    data,
                    seconds=HALF_LOAD_SECONDS,
                    rate=rate,
                    verbose=True,
                    output=work / "half-load.txt",
                )
                p50, p99 = load.percentiles(res.latencies, (50, 99))
                by_p = half.setdefault(server.label, {})
                by_p.setdefault("p50", []).append(p50 * 1e6)
                by_p.setdefault("p99", []).append(p99 * 1e6)
            log(
                f"ceiling round {round_no + 1}: "
                + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in results.items())
                + "; p50 at one in flight "
                + ", ".join(f"{k} {v['p50'][-1]:.1f} us" for k, v in latency.items())
            )
    finally:
        for server in servers:
            server.stop()
        nsd.stop()
        shutil.rmtree(work, ignore_errors=True)
    stolen = stolen_since(mark)
    base = statistics.median(results["dnsmasq"])
    lines = [
        "# The ceiling of a Python cache-hit path on this machine",
        "",
        f"`python -m bench.ceiling`: {args.rounds} rounds, each server {2 * args.rounds} runs "
        f"of {args.seconds:g} s (dnsperf -c 10 -q 100, {args.names:,} cached names, asked "
        "shuffled), servers pinned to CPU 1, dnsperf to CPU 0. "
        f"Machine busy before the run: {busy:.0%}; CPU taken by the hypervisor during it: "
        f"{stolen:.0%}. "
        "See bench/ceiling.py for the toy responders. "
        f"The sidecar and the toys run on {interpreter_line()}.",
        "",
        "| server | median QPS | / dnsmasq | server CPU busy | us of CPU per query | runs |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for label, values in results.items():
        med = statistics.median(values)
        busy_med = statistics.median(cpu[label])
        runs = ", ".join(f"{v / 1000:.0f}k" for v in values)
        lines.append(
            f"| {label} | {med:,.0f} | {med / base:.2f} | {busy_med:.0%} | "
            f"{busy_med * 1e6 / med:.1f} | {runs} |"
        )
    lines += [
        "",
        "A server below 100% CPU is waiting for queries: dnsperf (one thread on the other "
        "core) is the limit there, not the server.",
        "",
        "Latency with one query in flight (`load.one_in_flight`, the benchmark's own measure: "
        f"up to {args.latency_count:,} queries one at a time per round, the same names), "
        "median of rounds:",
        "",
        "| server | p50 us | / dnsmasq | p99 us | / dnsmasq | p50 by round |",
        "|---|---:|---:|---:|---:|---|",
    ]
    base50 = statistics.median(latency["dnsmasq"]["p50"])
    base99 = statistics.median(latency["dnsmasq"]["p99"])
    for label, by_p in latency.items():
        p50, p99 = statistics.median(by_p["p50"]), statistics.median(by_p["p99"])
        rounds = ", ".join(f"{v:.1f}" for v in by_p["p50"])
        lines.append(
            f"| {label} | {p50:.1f} | {p50 / base50:.2f}x | {p99:.1f} | {p99 / base99:.2f}x | "
            f"{rounds} |"
        )
    lines += [
        "",
        f"Latency at half of each server's QPS of the round (dnsperf -Q, {HALF_LOAD_SECONDS:g} s, "
        "the benchmark's p99-at-half-load row), median of rounds:",
        "",
        "| server | p50 us | p99 us | / dnsmasq | p99 by round |",
        "|---|---:|---:|---:|---|",
    ]
    half99 = statistics.median(half["dnsmasq"]["p99"])
    for label, by_p in half.items():
        p50, p99 = statistics.median(by_p["p50"]), statistics.median(by_p["p99"])
        rounds = ", ".join(f"{v:,.0f}" for v in by_p["p99"])
        lines.append(f"| {label} | {p50:.0f} | {p99:,.0f} | {p99 / half99:.2f}x | {rounds} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"]:
        return serve(args[1:])
    return measure(args)


if __name__ == "__main__":
    sys.exit(main())
