"""Hits without a row in one process, no sockets: `python -m bench.cold_path [--names N]`.

Each round stores N names in a cache (one A record each), then asks each once through
`FastPath.answer_cold` (a reader thread's work for a name with no row), hands the hits off 32
at a time and drains them every DRAIN_COLD_AT batches (the loop's work: counts, LRU,
admission), as the 100,000-name row of `make bench` does. Prints the microseconds per hit of
each round; `--bare` does only a bare responder's parse, look-up and render instead
(bench.ceiling's `batch-cold`). `--callgrind`, run under valgrind's callgrind: the
instructions per hit of the measured part alone (its counters zeroed before and dumped after
with `callgrind_control`), a count that does not move with the host's speed
(bench/README.md).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence

from bench.miss_path import (
    RecordingExchanges,
    callgrind,
    print_rounds,
    resolver_on,
    rounds_parser,
    workload,
)
from sidecar.core import wire
from sidecar.core.fast_path import DRAIN_COLD_AT, ColdHit

BATCH = 32  # hits per reader-thread batch (server/datagram_batch.py's SIZE)


async def one_round(names: int, round_no: int, bare: bool, count: bool = False) -> float:
    """Microseconds per hit over `names` names, each asked once; `count`: under callgrind,
    only this part counted (see the module's docstring)."""
    resolver = resolver_on(RecordingExchanges())
    cache = resolver.cache
    now = time.monotonic()
    queries = []
    for query, reply in workload(names, round_no):
        q = wire.parse_query(query)
        cache.store(q.key, reply, wire.parse_reply(reply), now, q.do)
        queries.append(query)
    fast, peek, parse = resolver.fast, cache.peek, wire.parse_query
    cold: list[ColdHit] = []
    answered = 0
    if count:
        callgrind("-z")
    started = time.perf_counter()
    for query in queries:
        if bare:
            q = parse(query)
            entry = peek(q.key)
            reply = None
            if entry is not None and entry.expires > now:
                ttl = math.ceil(entry.expires - now)
                reply = entry.render_with_ttl(query, q, ttl, wire.udp_limit(q.edns_size))
        else:
            reply = fast.answer_cold(query, now, cold)
            if len(cold) == BATCH:
                fast.hand_off_cold((cold, now, 1e-4))
                cold = []
                if len(fast._handed_cold) >= DRAIN_COLD_AT:
                    fast.drain()
        answered += reply is not None
    if cold:
        fast.hand_off_cold((cold, now, 1e-4))
    fast.drain()
    elapsed = time.perf_counter() - started
    if count:
        callgrind("-d")
    if answered != names:
        raise SystemExit(f"{answered} of {names} hits answered")
    return elapsed / names * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = rounds_parser("python -m bench.cold_path", "names stored and asked once")
    parser.add_argument("--bare", action="store_true", help="a bare responder's work only")
    args = parser.parse_args(argv)
    per_hit = [
        asyncio.run(one_round(args.names, r, args.bare, args.callgrind and r == args.rounds - 1))
        for r in range(args.rounds)
    ]
    print_rounds("hit", per_hit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
