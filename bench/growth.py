"""Hits over many names, quickly: `python -m bench.growth [--names 100000] [--runs 2]`.

Starts NSD with `names` names and one sidecar (pinned as in bench/run.py), fills the cache
with every name once (the all-miss rate and CPU per 1,000 misses are printed), then runs
dnsperf over the names shuffled for 2.5 s `runs` times, printing QPS and the sidecar's RSS.
The sidecar alone, no dnsmasq or Unbound: the A/B tool for the 100,000-name rows of
`make bench`, a minute instead of ten.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from bench import load, zones
from bench.servers import Nsd, Sidecar


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--names", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    n = args.names
    os.sched_setaffinity(0, {0})
    work = Path(tempfile.mkdtemp(prefix="bench-growth-"))
    nsd = Nsd("127.0.21.1", work / "nsd", None, {zones.BENCH_ZONE: zones.bench_zone(n)})
    sidecar = Sidecar("sidecar", "127.0.20.1", work / "sidecar", "1", "", {}, 2 * n + 10000)
    try:
        nsd.start()
        sidecar.upstream = nsd.address
        sidecar.start()
        time.sleep(1)
        idle = sidecar.rss_kib() / 1024
        names = zones.hit_names(n)
        fill = zones.write_query_file(work / "fill.txt", names)
        cpu0 = sidecar.cpu_seconds()
        res = load.dnsperf(
            sidecar.address, fill, seconds=300, once=True, clients=4, outstanding=200
        )
        per_1000 = (sidecar.cpu_seconds() - cpu0) / max(res.sent, 1) * 1000
        print(
            f"fill {n:,}: {res.qps:,.0f} QPS, {per_1000:.3f} CPU s per 1,000 misses, "
            f"RSS {sidecar.rss_kib() / 1024:.1f} MiB (idle {idle:.1f})"
        )
        random.Random(7).shuffle(names)
        shuffled = zones.write_query_file(work / "hits.txt", names)
        for _ in range(args.runs):
            res = load.dnsperf(sidecar.address, shuffled, seconds=2.5)
            print(
                f"hits over {n:,} names: {res.qps:,.0f} QPS, RSS {sidecar.rss_kib() / 1024:.1f} MiB"
            )
    finally:
        sidecar.stop()
        nsd.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
