"""Profile the sidecar under load: `python -m bench.profile [--mode plain|shaped|miss]`.

Starts NSD and one sidecar on loopback (pinned as in bench/run.py), warms its cache, then runs
dnsperf at full speed while `py-spy record` samples the sidecar. Writes the collapsed stacks
(`profile-<mode>.txt`, for any flame graph tool) and a summary (`profile-<mode>.md`): the share
of samples per function (inclusive and self) and per line, converted to microseconds per query
with the QPS measured during the profile (the sidecar is CPU-bound at full load, so one query
costs 1/QPS seconds of its core).

py-spy runs with --nonblocking (the sidecar is never paused), so Python frames only: time in
uvloop's C code (socket calls, the loop itself) shows as the frame that called into it, and
the loop's own work as `Runner.run`/`run` at the top of the stack.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench import load, zones
from bench.fixtures import LoopThread, TcpBackends
from bench.servers import Nsd, Sidecar, free_port

ROOT = Path(__file__).resolve().parent.parent
POOL = [f"127.0.22.{i}" for i in range(2, 10)]
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def parse_collapsed(text: str) -> list[tuple[list[str], int]]:
    stacks = []
    for line in text.splitlines():
        frames, _, count = line.rpartition(" ")
        if frames and count.isdigit():
            stacks.append((frames.split(";"), int(count)))
    return stacks


def _func(frame: str) -> str:
    m = _FRAME.match(frame)
    return f"{m['func']} ({m['file']})" if m else frame


def summarize(
    stacks: Sequence[tuple[list[str], int]], qps: float, busy: float, top: int = 25
) -> list[str]:
    """Tables of the top frames; `busy` is the share of the load's wall time the sidecar was
    on CPU (non-idle samples / samples possible), so a share of samples is a share of busy
    time and share * busy / QPS is the time per query."""
    total = sum(c for _, c in stacks)
    if not total:
        return ["no samples"]
    inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    lines: Counter[str] = Counter()
    for frames, count in stacks:
        for func in {_func(f) for f in frames}:
            inclusive[func] += count
        self_time[_func(frames[-1])] += count
        lines[frames[-1]] += count
    per_query_us = busy * 1e6 / qps if qps else float("nan")

    def table(title: str, counts: Counter[str]) -> list[str]:
        out = [f"### {title}", "", "| share | us/query | frame |", "|---:|---:|---|"]
        for name, count in counts.most_common(top):
            share = count / total
            out.append(f"| {share:.1%} | {share * per_query_us:.2f} | `{name}` |")
        return [*out, ""]

    return [
        f"{total} samples, the sidecar on CPU {busy:.0%} of the time; {qps:,.0f} queries/s "
        f"during the profile = {per_query_us:.1f} us of CPU per query.",
        "",
        *table("Inclusive, by function", inclusive),
        *table("Self, by function", self_time),
        *table("Self, by line", lines),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument(
        "--mode",
        choices=("plain", "shaped", "miss"),
        default="plain",
        help="plain: cache hits on --names names; shaped: hits on 100 discovery names with "
        "health checks on; miss: every query a new name (the miss path)",
    )
    parser.add_argument("--names", type=int, default=1000, help="cached names (plain), shuffled")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "profile")
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        sys.exit("bench.profile: py-spy missing (pip install -e '.[bench]')")
    os.sched_setaffinity(0, {0})
    mode = args.mode
    if mode == "plain" and args.names != 1000:
        mode = f"plain-{args.names}"
    work = Path(tempfile.mkdtemp(prefix="dns-bench-profile-"))
    helpers = LoopThread()
    backends = TcpBackends(POOL, free_port(POOL[0]))
    helpers.run(backends.start())
    nsd = Nsd(
        "127.0.21.1",
        work / "nsd",
        None,
        {
            zones.BENCH_ZONE: zones.bench_zone(max(1000, args.names)),
            zones.DISCOVERY_ZONE: zones.discovery_zone(100, POOL),
        },
    )
    shaped = args.mode == "shaped"
    extra = ["--health-check", f"{zones.DISCOVERY_ZONE}=tcp:{backends.port}"] if shaped else []
    sidecar = Sidecar(mode, "127.0.20.1", work / "sidecar", "1", "", {}, 200000, extra)
    try:
        nsd.start()
        sidecar.upstream = nsd.address
        sidecar.start()
        if args.mode == "miss":
            # New names only, different ones for the run without and with the profiler.
            lines = int(20000 * args.seconds)
            before_file = zones.write_query_file(
                work / "before.txt", zones.mixed_names(1, lines, 1, "before")
            )
            data = zones.write_query_file(
                work / "during.txt", zones.mixed_names(1, lines, 1, "during")
            )
            what = "new names (every query a miss, answered by NSD)"
        else:
            names = (
                [zones.service_name(i) for i in range(100)]
                if shaped
                else zones.hit_names(args.names)
            )
            random.Random(7).shuffle(names)
            data = before_file = zones.write_query_file(work / "names.txt", names)
            for _ in range(2):
                load.dnsperf(
                    sidecar.address, data, seconds=300, once=True, clients=4, outstanding=200
                )
            what = (
                "100 discovery names (4 A each), shaped"
                if shaped
                else f"{args.names:,} cached names (1 A each)"
            )
        time.sleep(2)  # the first health probes
        once = args.mode == "miss"
        before = load.dnsperf(sidecar.address, before_file, seconds=args.seconds / 2, once=once)
        args.out.mkdir(parents=True, exist_ok=True)
        raw = args.out / f"profile-{mode}.txt"
        spy_cmd = [spy, "record", "--pid", str(sidecar.pid), "--rate", str(args.rate)]
        spy_cmd += ["--nonblocking", "--format", "raw", "--output", str(raw)]
        spy_cmd += ["--duration", str(int(args.seconds) + 1)]
        recorder = subprocess.Popen(spy_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)
        during = load.dnsperf(sidecar.address, data, seconds=args.seconds, once=once)
        _, err = recorder.communicate(timeout=args.seconds + 30)
        if recorder.returncode != 0:
            sys.exit(f"py-spy failed: {err.decode(errors='replace')}")
        stacks = parse_collapsed(raw.read_text())
        samples = sum(c for _, c in stacks)
        command = " ".join(sys.argv[1:] if argv is None else argv)
        summary = [
            f"# Profile of the sidecar: {mode}",
            "",
            f"`python -m bench.profile {command}`: dnsperf -c 10 -q 100 on {what}, py-spy "
            f"{args.rate} Hz (--nonblocking). QPS without the profiler {before.qps:,.0f}, with "
            f"it {during.qps:,.0f} (py-spy shares the load core with dnsperf).",
            "",
            *summarize(stacks, during.qps, min(1.0, samples / (args.rate * during.runtime))),
        ]
        (args.out / f"profile-{mode}.md").write_text("\n".join(summary))
        print("\n".join(summary))
    finally:
        sidecar.stop()
        nsd.stop()
        helpers.call(backends.close)
        helpers.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
