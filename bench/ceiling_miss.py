"""What a Python cache-miss path can reach here: `python -m bench.ceiling_miss`.

Toy forwarders do the work of a sidecar miss and nothing more: read the client's query, send
its question upstream (NSD on loopback) under a new ID, match the reply by that ID, store the
reply's bytes in a dict keyed by the question, and send the reply to the client under the
client's ID. No TTL, no checks, no metrics, no retries. Two styles the sidecar could adopt:

- `callback`: uvloop, `add_reader` on the client socket and on the upstream socket; each wake-up
  drains up to 64 datagrams with `recvfrom` and answers with `sendto`; no task per query;
- `batch`: the sidecar's model: a reader thread takes client datagrams in batches with the
  sidecar's recvmmsg wrapper (sidecar/server/datagram_batch.py), answers names stored before
  from their stored reply (the sidecar's batch closure, the replies as its rows) and forwards
  the batch's misses upstream itself; the event loop reads the upstream replies
  (`add_reader`), stores them and answers clients.

Each is measured with dnsmasq and the sidecar on the all-miss workload (a fresh set of names
per run, each asked once, answered by NSD's wildcard; the dnsperf settings of the all-miss row),
CPU seconds per miss from /proc (user + system) and QPS; servers pinned to CPU 1.

`python -m bench.ceiling_miss serve --mode MODE --listen HOST:PORT --upstream HOST:PORT` runs one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import load, zones
from bench.run import ROOT, cpu_busy_share, log
from bench.servers import VENV_BIN, Dnsmasq, Nsd, Server, Sidecar

MODES = ("callback", "batch")
Address = tuple[str, int]


class StoredReply:
    """A stored reply as the batch server reads a row: current for ever, one tail."""

    __slots__ = ("next_tail", "tail", "valid_until")

    def __init__(self, tail: bytes) -> None:
        self.tail = tail
        self.valid_until = math.inf
        self.next_tail = lambda: tail


class Forwarder:
    """The miss path's state: queries waiting upstream by ID, and the replies stored."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.waiting: dict[int, tuple[bytes, bytes, Address]] = {}  # id -> (cid, question, addr)
        # question (the query after the ID) -> the reply after its ID
        self.replies: dict[bytes, StoredReply] = {}
        self.next_id = 0

    def forward(self, data: bytes, addr: Address) -> None:
        """Send one client query upstream under a new ID."""
        self.next_id = query_id = (self.next_id + 1) & 0xFFFF
        question = data[2:]
        self.waiting[query_id] = (data[:2], question, addr)
        with contextlib.suppress(BlockingIOError):
            self.upstream.send(query_id.to_bytes(2, "big") + question)

    def upstream_readable(self) -> None:
        """Match up to 64 upstream replies by ID, store each, answer its client."""
        recv, sendto, waiting, replies = (
            self.upstream.recv,
            self.client.sendto,
            self.waiting,
            self.replies,
        )
        for _ in range(64):
            try:
                reply = recv(4096)
            except BlockingIOError:
                return
            asked = waiting.pop(int.from_bytes(reply[:2], "big"), None)
            if asked is None:
                continue
            client_id, question, addr = asked
            tail = reply[2:]
            replies[question] = StoredReply(tail)
            with contextlib.suppress(BlockingIOError):
                sendto(client_id + tail, addr)


def _sockets(host: str, port: int, upstream: Address) -> tuple[socket.socket, socket.socket]:
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind((host, port))
    up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    up.connect(upstream)
    up.setblocking(False)
    return client, up


def _client_reader(forwarder: Forwarder) -> Callable[[], None]:
    recvfrom, forward = forwarder.client.recvfrom, forwarder.forward

    def readable() -> None:
        for _ in range(64):
            try:
                data, addr = recvfrom(512)
            except BlockingIOError:
                return
            forward(data, addr)

    return readable


def _batch_thread(forwarder: Forwarder, loop: asyncio.AbstractEventLoop) -> None:
    import time

    from sidecar.server.datagram_batch import DatagramBatch

    batch = DatagramBatch(forwarder.client)
    forward = forwarder.forward

    def lend(rest: list[tuple[bytes, tuple[str | int, ...]]]) -> None:
        for data, addr in rest:
            forward(data, addr)  # type: ignore[arg-type]

    # The sidecar's batch closure, the stored replies as its rows: a name asked before is
    # answered in the thread (`python -m bench.mixed --toy`), a new one goes to `lend`.
    serve = batch.server(forwarder.replies.get, None, lambda _served: None, lend, time.monotonic)
    while True:
        serve(batch.receive())


async def _serve(mode: str, host: str, port: int, upstream: Address) -> None:
    loop = asyncio.get_running_loop()
    client, up = _sockets(host, port, upstream)
    forwarder = Forwarder(client, up)
    loop.add_reader(up.fileno(), forwarder.upstream_readable)
    if mode == "callback":
        client.setblocking(False)
        loop.add_reader(client.fileno(), _client_reader(forwarder))
    else:
        threading.Thread(target=_batch_thread, args=(forwarder, loop), daemon=True).start()
    await asyncio.Event().wait()  # until SIGTERM


def serve(argv: Sequence[str]) -> int:
    import signal

    import uvloop

    parser = argparse.ArgumentParser(prog="python -m bench.ceiling_miss serve")
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args(argv)
    host, port = args.listen.rsplit(":", 1)
    up_host, up_port = args.upstream.rsplit(":", 1)
    signal.signal(signal.SIGTERM, lambda _s, _f: sys.exit(0))
    uvloop.run(_serve(args.mode, host, int(port), (up_host, int(up_port))))
    return 0


class MissResponder(Server):
    kind = "responder"

    def __init__(
        self, mode: str, host: str, workdir: Path, cpus: str | None, upstream: str
    ) -> None:
        super().__init__(f"python-{mode}", host, workdir, cpus)
        self.mode = mode
        self.upstream = upstream

    def command(self) -> list[str]:
        exe = str(VENV_BIN / "python")
        return [
            *(exe, "-m", "bench.ceiling_miss", "serve", "--mode", self.mode),
            *("--listen", self.address, "--upstream", self.upstream),
        ]


def measure(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling_miss")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--names", type=int, default=20000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ceiling-miss.md")
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {0})
    os.environ["PYTHONPATH"] = str(ROOT)  # the responders import bench
    busy = cpu_busy_share()
    work = Path(tempfile.mkdtemp(prefix="dns-bench-ceiling-miss-"))
    nsd = Nsd("127.0.22.1", work / "nsd", "0", {zones.BENCH_ZONE: zones.bench_zone(1)})
    servers: list[Server] = []
    qps: dict[str, list[float]] = {}
    cost: dict[str, list[float]] = {}  # us of server CPU per query sent
    try:
        nsd.start()
        servers = [
            Dnsmasq("dnsmasq", "127.0.22.3", work / "dnsmasq", "1", nsd.address, {}, 10**6),
            Sidecar("sidecar", "127.0.22.2", work / "sidecar", "1", nsd.address, {}, 10**6),
            *(
                MissResponder(m, f"127.0.22.{6 + i}", work / m, "1", nsd.address)
                for i, m in enumerate(MODES)
            ),
        ]
        for server in servers:
            server.start()
        run = 0
        for round_no in range(args.rounds):
            order = servers[round_no % len(servers) :] + servers[: round_no % len(servers)]
            for server in order:
                run += 1
                names = [f"c{run}n{i}.{zones.MISS_ZONE}" for i in range(args.names)]
                data = zones.write_query_file(work / f"miss{run}.txt", names)
                cpu0 = server.cpu_seconds()
                res = load.dnsperf(
                    server.address,
                    data,
                    seconds=60,
                    once=True,
                    clients=10,
                    outstanding=100,
                    timeout=2,
                )
                qps.setdefault(server.label, []).append(res.qps)
                cost.setdefault(server.label, []).append(
                    (server.cpu_seconds() - cpu0) * 1e6 / max(res.sent, 1)
                )
            log(
                f"ceiling-miss round {round_no + 1}: "
                + ", ".join(f"{k} {v[-1]:.1f} us" for k, v in cost.items())
            )
    finally:
        for server in servers:
            server.stop()
        nsd.stop()
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(qps["dnsmasq"])
    base_cost = statistics.median(cost["dnsmasq"])
    lines = [
        "# The ceiling of a Python cache-miss path on this machine",
        "",
        f"`python -m bench.ceiling_miss --rounds {args.rounds} --names {args.names}`: each "
        f"server answers {args.rounds} runs of {args.names:,} fresh names, each asked once "
        "(dnsperf -c 10 -q 100, NSD's wildcard answers upstream), servers pinned to CPU 1, "
        f"dnsperf and NSD to CPU 0. Machine busy before the run: {busy:.0%} (shared with other "
        "engineers' tests: CPU per miss is the measure, QPS is secondary). "
        "See bench/ceiling_miss.py for the toy forwarders.",
        "",
        "| server | median us of CPU per miss | / dnsmasq | median QPS | / dnsmasq | "
        "us per miss, runs | QPS, runs |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for label in qps:
        med, c = statistics.median(qps[label]), statistics.median(cost[label])
        lines.append(
            f"| {label} | {c:.1f} | {c / base_cost:.2f} | {med:,.0f} | {med / base:.2f} | "
            + ", ".join(f"{v:.1f}" for v in cost[label])
            + " | "
            + ", ".join(f"{v / 1000:.1f}k" for v in qps[label])
            + " |"
        )
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
