"""The miss path in one process, without sockets: `python -m bench.miss_path [--names N]`.

Each round parses N new queries (64 at a time, as the loop reads them), runs them through
`Resolver.answer`/`Resolver.miss`, the forwarder and a transport that only records each
attempt, then tells every attempt its reply (one A record) as the socket would: stored,
rendered, delivered. Prints the microseconds per miss of each round. What it leaves out: the
listener, the sockets and the event loop (bench.miss_cost measures those too, with their
noise of +-5% between runs); what it keeps is steady to about 1%, so a change to the
pipeline, the forwarder or the core shows here first. A profile of the same loop:
`--profile` (cProfile: its counts are exact, its times inflated). `--callgrind`, run under
valgrind's callgrind: the instructions per miss of the last round alone (its counters zeroed
before and dumped after with `callgrind_control`), a count that does not move with the host.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import pstats
import subprocess
import time
from collections.abc import Sequence

from dnslib import QTYPE, RR, A, DNSRecord

from sidecar.addresses import HostPort
from sidecar.core import wire
from sidecar.core.cache import CacheSettings, TtlCache
from sidecar.core.counters import Counters
from sidecar.core.forwarding import Attempt
from sidecar.core.routing import ZoneRouter
from sidecar.core.upstream_health import UpstreamSet
from sidecar.forwarder import Asker, Forwarder
from sidecar.pipeline import Resolver

READ_EVERY = 64  # queries started before their replies come, as the loop reads a lent socket


class _Handle:
    def cancel(self) -> None:
        pass


class RecordingExchanges:
    """A transport that sends nothing: it records each attempt and whom to tell."""

    def __init__(self) -> None:
        self.started: list[tuple[Attempt, Asker]] = []
        self.handle = _Handle()

    def start(self, attempt: Attempt, question: bytes, cd: bool, do: bool, asker: Asker) -> _Handle:
        self.started.append((attempt, asker))
        return self.handle

    def close(self, *, now: bool = False) -> None:
        pass


def callgrind(action: str, pid: int | None = None) -> None:
    """`callgrind_control -z` (zero) or `-d` (dump) for process `pid` (by default this one),
    run under callgrind."""
    subprocess.run(
        ["callgrind_control", action, str(os.getpid() if pid is None else pid)],
        check=True,
        capture_output=True,
    )


def workload(names: int, round_no: int) -> list[tuple[bytes, bytes]]:
    """(query, reply) for `names` new names; each reply's ID is left to the transport."""
    pairs = []
    for i in range(names):
        name = f"n{i}.r{round_no}.example."
        query = DNSRecord.question(name)
        query.header.id = i & 0xFFFF
        reply = query.reply()
        reply.add_answer(RR(name, QTYPE.A, rdata=A("192.0.2.1"), ttl=60))
        pairs.append((bytes(query.pack()), bytes(reply.pack())))
    return pairs


def one_round(
    resolver: Resolver,
    transport: RecordingExchanges,
    pairs: list[tuple[bytes, bytes]],
    count: bool = False,
) -> float:
    """Microseconds per miss over `pairs`; `count`: under callgrind, only this counted."""
    answered: list[bytes] = []

    def deliver(reply: bytes, _source: str) -> None:
        answered.append(reply)

    gc.collect()
    if count:
        callgrind("-z")
    started = time.perf_counter()
    for at in range(0, len(pairs), READ_EVERY):
        transport.started.clear()
        batch = pairs[at : at + READ_EVERY]
        for query, _reply in batch:
            q = wire.parse_query(query)
            if resolver.answer(query, q, wire.PLAIN_UDP_LIMIT) is None:
                resolver.miss(query, q, wire.PLAIN_UDP_LIMIT, deliver)
        for (_query, reply), (attempt, asker) in zip(batch, transport.started, strict=True):
            asker.exchanged(attempt, reply, None)
    elapsed = time.perf_counter() - started
    if count:
        callgrind("-d")
    if len(answered) != len(pairs):
        raise SystemExit(f"{len(answered)} of {len(pairs)} misses answered")
    return elapsed / len(pairs) * 1e6


def resolver_on(transport: RecordingExchanges) -> Resolver:
    """A resolver with one upstream, no prefetch and room for every name, over `transport`."""
    metrics = Counters()
    return Resolver(
        TtlCache(CacheSettings(prefetch_percent=0, max_entries=10**6)),
        ZoneRouter(UpstreamSet([HostPort("127.0.0.1", 53)]), {}),
        Forwarder(transport, metrics, attempt_timeout=1.0, clock=time.monotonic),
        metrics,
        query_timeout=4.0,
    )


async def measure(names: int, rounds: int, profile: bool, count: bool = False) -> list[float]:
    transport = RecordingExchanges()
    resolver = resolver_on(transport)
    per_miss = []
    for round_no in range(rounds):
        pairs = workload(names, round_no)
        if profile and round_no == rounds - 1:
            profiler = cProfile.Profile()
            profiler.enable()
            one_round(resolver, transport, pairs)
            profiler.disable()
            stats = pstats.Stats(profiler)
            stats.sort_stats("tottime").print_stats(40)
        else:
            last = round_no == rounds - 1
            per_miss.append(one_round(resolver, transport, pairs, count and last))
    return per_miss


def rounds_parser(prog: str, names_help: str) -> argparse.ArgumentParser:
    """The options of a one-process harness: --names, --rounds, --callgrind."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--names", type=int, default=20000, help=names_help)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--callgrind", action="store_true", help="under callgrind: dump the last round's count"
    )
    return parser


def print_rounds(unit: str, per_round: list[float]) -> None:
    rounds = " ".join(f"{us:.2f}" for us in per_round)
    print(f"us per {unit}, by round: {rounds}; best {min(per_round):.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = rounds_parser("python -m bench.miss_path", "new names per round")
    parser.add_argument("--profile", action="store_true", help="cProfile one more round")
    args = parser.parse_args(argv)
    per_miss = asyncio.run(
        measure(args.names, args.rounds + args.profile, args.profile, args.callgrind)
    )
    print_rounds("miss", per_miss)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
