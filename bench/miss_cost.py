"""The cost of a cache miss: NSD on loopback as the upstream, one sidecar, dnsperf asking N
names that no cache holds (a wildcard answers them), each once. Prints misses per second and
the sidecar's CPU time (user + system, from /proc) per miss; best and median of `--runs`.

    .venv/bin/python -m bench.miss_cost [--names 9000] [--runs 3] [--cpus 1]

Short (a few seconds per run) and loopback only: NSD, the sidecar and dnsperf run here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench import load, zones
from bench.run import sidecar_metric
from bench.servers import Nsd, Sidecar


def user_system(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of one process (the sidecar runs as one)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def main() -> None:
    parser = argparse.ArgumentParser(description="The CPU cost of a cache miss.")
    parser.add_argument("--names", type=int, default=9000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--outstanding", type=int, default=100)
    parser.add_argument("--cpus", default=None, help="taskset CPU list for the sidecar")
    parser.add_argument("--load-cpus", default=None, help="CPUs for NSD and dnsperf (this process)")
    parser.add_argument("--host", default="127.0.0.77")
    parser.add_argument(
        "--sidecar-args",
        default="",
        help="more dns-sidecar flags (e.g. '--udp-reader-thread false')",
    )
    args = parser.parse_args()
    if args.load_cpus is not None:
        os.sched_setaffinity(0, {int(c) for c in args.load_cpus.split(",")})
    work = Path(tempfile.mkdtemp(prefix="miss-cost-"))
    nsd = Nsd(args.host, work / "nsd", None, {zones.BENCH_ZONE: zones.bench_zone(1)})
    nsd.start()
    rates: list[float] = []
    costs: list[float] = []
    sidecar: Sidecar | None = None
    try:
        for run in range(args.runs):
            # A fresh sidecar each run: every run fills an empty cache, the same work.
            sidecar = Sidecar(
                "sidecar",
                args.host,
                work / f"sidecar{run}",
                args.cpus,
                nsd.address,
                {},
                10**6,
                args.sidecar_args.split(),
            )
            sidecar.start()
            time.sleep(0.5)
            names = [f"r{run}n{i}.{zones.MISS_ZONE}" for i in range(args.names)]
            datafile = zones.write_query_file(work / f"run{run}.txt", names)
            misses0 = sidecar_metric(sidecar, "dns_sidecar_cache_misses_total")
            user0, sys0 = user_system(sidecar.pid)
            started = time.perf_counter()
            res = load.dnsperf(
                sidecar.address,
                datafile,
                seconds=60,
                clients=args.clients,
                outstanding=args.outstanding,
                once=True,
                timeout=2,
            )
            took = time.perf_counter() - started
            user1, sys1 = user_system(sidecar.pid)
            user, system = user1 - user0, sys1 - sys0
            cpu = user + system
            misses = sidecar_metric(sidecar, "dns_sidecar_cache_misses_total") - misses0
            rates.append(res.qps)
            costs.append(cpu / max(misses, 1) * 1e6)
            print(
                f"run {run}: {res.sent} sent, {res.noerror} NOERROR, {res.lost} lost, "
                f"{misses:.0f} misses, {res.qps:,.0f} q/s (wall {took:.1f}s), "
                f"CPU {cpu:.2f}s = {costs[-1]:.0f} us/miss "
                f"(user {user / max(misses, 1) * 1e6:.0f}, "
                f"system {system / max(misses, 1) * 1e6:.0f})",
                flush=True,
            )
            sidecar.stop()
    finally:
        if sidecar is not None:
            sidecar.stop()
        nsd.stop()
    print(
        f"misses/s best {max(rates):,.0f} median {statistics.median(rates):,.0f}; "
        f"CPU us/miss best {min(costs):.0f} median {statistics.median(costs):.0f}"
    )


if __name__ == "__main__":
    main()
