"""QPS with a share of misses, the sidecar beside dnsmasq: `python -m bench.mixed`.

The "QPS with 5% misses" row of `make bench`, alone and quicker: NSD on loopback as the
upstream, 1,000 names cached (one A each) in every server, then dnsperf at full speed on a
workload where every `--miss-every`-th query is a name nobody has asked (NSD's wildcard
answers it) and the rest cycle through the cached names. Servers pinned as in bench/run.py
(server on CPU 1, NSD, dnsperf and this process on CPU 0); each run starts the servers afresh,
in rotated order; prints each run's QPS, the server's CPU per query, and the median ratio.

    .venv/bin/python -m bench.mixed [--runs 3] [--seconds 2.5] [--miss-every 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench import load, zones
from bench.ceiling_miss import MissResponder
from bench.miss_cost import user_system
from bench.run import steal_mark, stolen_since
from bench.servers import Dnsmasq, Nsd, Server, Sidecar

HIT_NAMES = 1000
HOSTS = {"sidecar": "127.0.0.81", "dnsmasq": "127.0.0.82", "toy": "127.0.0.83"}


def switches(pid: int) -> int:
    """Context switches of every thread of `pid` so far (voluntary and not)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.endswith("ctxt_switches:") or "ctxt_switches" in line:
                total += int(line.split()[-1])
    return total


def make(
    label: str, work: Path, upstream: str, sidecar_args: list[str], toy: str = "batch"
) -> Server:
    if label == "sidecar":
        return Sidecar(label, HOSTS[label], work / label, "1", upstream, {}, 10**6, sidecar_args)
    if label == "toy":  # a toy of bench/ceiling_miss.py: what Python can do here
        return MissResponder(toy, HOSTS[label], work / label, "1", upstream)
    return Dnsmasq(label, HOSTS[label], work / label, "1", upstream, {}, 10**6)


def main() -> None:
    parser = argparse.ArgumentParser(description="QPS with a share of misses, beside dnsmasq.")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.5)
    parser.add_argument("--miss-every", type=int, default=20)
    parser.add_argument("--only", choices=tuple(HOSTS), default=None)
    parser.add_argument(
        "--toy",
        nargs="?",
        const="batch",
        default=None,
        choices=("batch", "flat-inline"),
        help="also a ceiling, one of bench/ceiling_miss.py's toys: `batch` (stored replies "
        "answered in its reader thread, misses forwarded, no TTL, checks or counters), or "
        "`flat-inline` (the same hits, the sidecar's work per miss, one thread)",
    )
    parser.add_argument("--sidecar-args", default="", help="more dns-sidecar flags")
    args = parser.parse_args()
    os.sched_setaffinity(0, {0})
    work = Path(tempfile.mkdtemp(prefix="mixed-"))
    nsd = Nsd("127.0.0.80", work / "nsd", None, {zones.BENCH_ZONE: zones.bench_zone(HIT_NAMES)})
    nsd.start()
    labels = [args.only] if args.only else [h for h in HOSTS if h != "toy" or args.toy]
    os.environ["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)  # the toy imports bench
    warm = zones.write_query_file(work / "warm.txt", zones.hit_names(HIT_NAMES))
    qps: dict[str, list[float]] = {label: [] for label in labels}
    try:
        for run in range(args.runs):
            order = labels[run % len(labels) :] + labels[: run % len(labels)]
            for label in order:
                server = make(
                    label, work / f"run{run}", nsd.address, args.sidecar_args.split(), args.toy
                )
                server.start()
                try:
                    load.dnsperf(server.address, warm, seconds=60, clients=4, once=True)
                    lines = int(args.seconds * 150_000)
                    names = zones.mixed_names(HIT_NAMES, lines, args.miss_every, f"r{run}{label}")
                    mixed = zones.write_query_file(work / f"mixed-{run}-{label}.txt", names)
                    user0, sys0 = user_system(server.pid)
                    switched0 = switches(server.pid)
                    mark = steal_mark()
                    res = load.dnsperf(server.address, mixed, seconds=args.seconds)
                    stolen = stolen_since(mark)
                    user1, sys1 = user_system(server.pid)
                    switched = switches(server.pid) - switched0
                    cpu = (user1 - user0) + (sys1 - sys0)
                    qps[label].append(res.qps)
                    answered = max(res.noerror, 1)
                    print(
                        f"run {run} {label}: {res.qps:,.0f} q/s, {res.lost} lost, "
                        f"CPU {cpu / answered * 1e6:.1f} us/query "
                        f"(user {(user1 - user0) / answered * 1e6:.1f}), "
                        f"{switched / answered * args.miss_every:.1f} context switches per miss, "
                        f"{stolen:.0%} of the CPUs taken by the hypervisor",
                        flush=True,
                    )
                finally:
                    server.stop()
                time.sleep(0.2)
    finally:
        nsd.stop()
        shutil.rmtree(work, ignore_errors=True)
    for label in labels:
        print(f"{label}: median {statistics.median(qps[label]):,.0f} q/s")
    if "dnsmasq" in qps:
        for label in labels:
            if label != "dnsmasq":
                ratios = [s / d for s, d in zip(qps[label], qps["dnsmasq"], strict=True)]
                shown = ", ".join(f"{r:.2f}" for r in ratios)
                print(f"{label} / dnsmasq: median {statistics.median(ratios):.2f} ({shown})")


if __name__ == "__main__":
    main()
