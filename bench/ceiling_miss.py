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

- `flat`: `callback`'s sockets with the sidecar's own work per miss written as two plain
  functions (no object per question): its query parser and cache (`TtlCache.get`, the
  stale and failure checks, `store` with its lifetime and bailiwick checks, the entry
  untracked), coalescing by cache key, a random ID per query from a pool, the query packet
  with our EDNS, a deadline FIFO, the reply matched (`reply_matches`) and parsed
  (`parse_reply`), the upstream's smoothed RTT, the counters and both histograms the
  sidecar keeps, each waiting client answered with `render_with_ttl`, queries and replies
  sent once per turn of the loop. No retries, timers, routing or rows: what the work of a
  miss costs when nothing stands between its steps.
- `flat-inline`: the ceiling of the "QPS with 5% misses" row (`python -m bench.mixed --toy
  flat-inline`): one thread and no event loop, so no hand-over, no wake-up and no GIL to pass.
  It reads client datagrams in batches and answers stored names through the sidecar's batch
  closure (`batch`'s rows), does `flat`'s work for each miss in the same thread, and after
  every batch sends the batch's upstream queries and reads every upstream reply waiting
  (`flat`'s reply work, the answer stored as a row); with nothing to read it polls both
  sockets. The least a Python process can do for that mix with the sidecar's work per query.

Each is measured with dnsmasq and the sidecar on the all-miss workload (a fresh set of names
per run, each asked once, answered by NSD's wildcard; the dnsperf settings of the all-miss row),
CPU seconds per miss from /proc (user + system) and QPS; servers pinned to CPU 1.

`python -m bench.ceiling_miss serve --mode MODE --listen HOST:PORT --upstream HOST:PORT` runs one.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import math
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import load, zones
from bench.image import image_python, interpreter_line
from bench.run import ROOT, cpu_busy_share, log, steal_mark, stolen_since
from bench.servers import Dnsmasq, Nsd, Server, Sidecar

MODES = ("callback", "batch", "flat", "flat-inline")
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


class FlatForwarder:
    """The `flat` mode: the sidecar's per-miss work in two functions (see the docstring)."""

    def __init__(
        self,
        client: socket.socket,
        upstream: socket.socket,
        later: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        """`later`: how a flush is asked for when the first query or answer of a turn is
        staged (the loop's call_soon; `flat-inline` flushes after each batch itself)."""
        from sidecar.collector import untrack
        from sidecar.core.cache import CacheSettings, TtlCache
        from sidecar.core.counters import Counters, Histogram

        self.client, self.upstream = client, upstream
        self.later = later if later is not None else asyncio.get_running_loop().call_soon
        self.stored: dict[bytes, StoredReply] | None = None  # `flat-inline`: answers as rows
        self.cache = TtlCache(CacheSettings(max_entries=10**6, prefetch_percent=0))
        self.counters = Counters()
        self.untrack = untrack
        self.rtt = Histogram()
        self.durations = Histogram()
        self.srtt = 0.0
        self.inflight: dict[bytes, list[tuple[bytes, object, int, Address, float]]] = {}
        self.pending: dict[bytes, tuple[bytes, bytes, bool, float]] = {}
        self.deadlines: collections.deque[tuple[float, bytes]] = collections.deque()
        self.ids = b""
        self.at = 0
        self.queries: list[bytes] = []
        self.answers: list[tuple[bytes, Address]] = []

    def query(self, data: bytes, addr: Address) -> None:
        from sidecar.core import wire

        now = time.monotonic()
        try:
            q = wire.parse_query(data)
        except wire.ClientError:
            return
        counters = self.counters
        counters.requests["udp"][q.qtype] += 1
        limit = q.edns_size or wire.PLAIN_UDP_LIMIT
        key = q.key
        cache = self.cache
        entry = cache.get(key, now)
        if entry is not None:
            self._answer(
                entry.render_with_ttl(data, q, math.ceil(entry.expires - now), limit), addr
            )
            return
        counters.cache_misses += 1
        if cache.get_stale(key, now) is not None or cache.failed_recently(key, now):
            return  # not in this workload
        waiters = self.inflight.get(key)
        if waiters is not None:
            waiters.append((data, q, limit, addr, now))
            return
        self.inflight[key] = [(data, q, limit, addr, now)]
        at = self.at
        if at >= len(self.ids):
            self.ids, at = os.urandom(512), 0
        self.at = at + 2
        qid = self.ids[at : at + 2]
        question = key[:-1]
        self.pending[qid] = (key, question, q.do, now)
        self.deadlines.append((now + 1.0, qid))
        counters.upstream_packets["upstream"] += 1
        if not self.queries:
            self.later(self.flush)
        self.queries.append(wire.query_packet(qid, question, q.cd, q.do))

    def upstream_readable(self) -> None:
        from sidecar.core import wire
        from sidecar.errors import FormError

        recv, pending, counters, cache = self.upstream.recv, self.pending, self.counters, self.cache
        while True:
            try:
                msg = recv(4096)
            except BlockingIOError:
                break
            now = time.monotonic()
            qid = msg[:2]
            asked = pending.get(qid)
            if asked is None or not wire.reply_matches(msg, qid, asked[1]):
                continue
            del pending[qid]
            key, question, do, sent = asked
            try:
                reply = wire.parse_reply(msg, wire.HEADER_SIZE + len(question))
            except FormError:
                continue
            rtt = now - sent
            self.rtt.observe(rtt)
            self.srtt += 0.125 * (rtt - self.srtt)
            entry = cache.store(key, msg, reply, now, do)
            if entry.ttl > 0:
                self.untrack(entry)
            ttl = math.ceil(entry.expires - now)
            stored = self.stored
            for data, q, limit, addr, start in self.inflight.pop(key, ()):
                answer = entry.render_with_ttl(data, q, ttl, limit)  # type: ignore[arg-type]
                self._answer(answer, addr)
                if stored is not None:
                    stored[data[2:]] = StoredReply(answer[2:])
                counters.responses["upstream"][answer[3] & 0x0F] += 1
                self.durations.observe(time.monotonic() - start)
        deadlines = self.deadlines
        while deadlines and deadlines[0][1] not in pending:
            deadlines.popleft()

    def _answer(self, reply: bytes, addr: Address) -> None:
        if not self.answers:
            self.later(self.flush)
        self.answers.append((reply, addr))

    def flush(self) -> None:
        queries, self.queries = self.queries, []
        answers, self.answers = self.answers, []
        for packet in queries:
            with contextlib.suppress(BlockingIOError):
                self.upstream.send(packet)
        for reply, addr in answers:
            with contextlib.suppress(BlockingIOError):
                self.client.sendto(reply, addr)


def _sockets(host: str, port: int, upstream: Address) -> tuple[socket.socket, socket.socket]:
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind((host, port))
    up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    up.connect(upstream)
    up.setblocking(False)
    return client, up


def _client_reader(forwarder: Forwarder | FlatForwarder) -> Callable[[], None]:
    recvfrom = forwarder.client.recvfrom
    forward = forwarder.forward if isinstance(forwarder, Forwarder) else forwarder.query

    def readable() -> None:
        for _ in range(64):
            try:
                data, addr = recvfrom(512)
            except BlockingIOError:
                return
            forward(data, addr)

    return readable


def _batch_thread(forwarder: Forwarder, loop: asyncio.AbstractEventLoop) -> None:
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


def _serve_inline(host: str, port: int, upstream: Address) -> None:
    """`flat-inline` (see the module's docstring): one thread, no event loop."""
    import select

    from sidecar.server.datagram_batch import DatagramBatch

    client, up = _sockets(host, port, upstream)
    flat = FlatForwarder(client, up, later=lambda _flush: None)
    rows: dict[bytes, StoredReply] = {}
    flat.stored = rows
    query = flat.query

    def lend(rest: list[tuple[bytes, tuple[str | int, ...]]]) -> None:
        for data, addr in rest:
            query(data, addr)  # type: ignore[arg-type]

    batch = DatagramBatch(client)
    serve = batch.server(rows.get, None, lambda _served: None, lend, time.monotonic)
    poll = select.poll()
    poll.register(client.fileno(), select.POLLIN)
    poll.register(up.fileno(), select.POLLIN)
    while True:
        count = batch.receive(wait=False)
        if count:
            serve(count)
        flat.flush()  # the batch's queries upstream
        flat.upstream_readable()
        flat.flush()  # the answers to the replies read
        if not count:
            poll.poll(1000)


async def _serve(mode: str, host: str, port: int, upstream: Address) -> None:
    loop = asyncio.get_running_loop()
    client, up = _sockets(host, port, upstream)
    if mode == "flat":
        flat = FlatForwarder(client, up)
        loop.add_reader(up.fileno(), flat.upstream_readable)
        client.setblocking(False)
        loop.add_reader(client.fileno(), _client_reader(flat))
        await asyncio.Event().wait()  # until SIGTERM
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
    if args.mode == "flat-inline":
        _serve_inline(host, int(port), (up_host, int(up_port)))
        return 0
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
        exe = str(image_python())  # the sidecar's interpreter (bench/image.py)
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
    mark = steal_mark()
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
    stolen = stolen_since(mark)
    base = statistics.median(qps["dnsmasq"])
    base_cost = statistics.median(cost["dnsmasq"])
    lines = [
        "# The ceiling of a Python cache-miss path on this machine",
        "",
        f"`python -m bench.ceiling_miss --rounds {args.rounds} --names {args.names}`: each "
        f"server answers {args.rounds} runs of {args.names:,} fresh names, each asked once "
        "(dnsperf -c 10 -q 100, NSD's wildcard answers upstream), servers pinned to CPU 1, "
        f"dnsperf and NSD to CPU 0. Machine busy before the run: {busy:.0%}; CPU taken by the "
        f"hypervisor during it: {stolen:.0%} (shared with other "
        "engineers' tests: CPU per miss is the measure, QPS is secondary). "
        "See bench/ceiling_miss.py for the toy forwarders. "
        f"The sidecar and the toys run on {interpreter_line()}.",
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
