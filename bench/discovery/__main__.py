"""python -m bench.discovery [--setups ...] [--time-scale F] [--sequential] ...

Runs the discovery timeline against the setups (by default sidecar, direct and dnsmasq side by
side, each in network namespaces of its own), then writes bench/results/discovery.md and
bench/results/discovery.png.
Needs root, glibc, iproute2, nsd and (for the dnsmasq setup) dnsmasq.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from bench.discovery import report
from bench.discovery.lab import REPO_ROOT, netns_problem
from bench.discovery.run import Options, RunData, SetupData, run_setups
from bench.discovery.scenario import DEFAULT_SETUPS, SETUPS, Timeline


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.discovery", description=__doc__)
    p.add_argument(
        "--setups",
        default=",".join(DEFAULT_SETUPS),
        help=f"comma-separated, of {', '.join(SETUPS)}, or all "
        f"(default: {','.join(DEFAULT_SETUPS)})",
    )
    p.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="multiply every time of the timeline and the TTL (default 1: t=10, 20, "
        "40, 60, end 75 s, TTL 60 s)",
    )
    p.add_argument(
        "--deregister-after",
        type=float,
        default=30.0,
        help="seconds from the death to the deregistration upstream (default 30)",
    )
    p.add_argument("--clients", type=int, default=8, help="application processes per setup")
    p.add_argument("--rate", type=float, default=240.0, help="requests/s per setup, in all")
    p.add_argument(
        "--sequential",
        action="store_true",
        help="run the setups one after another instead of side by side",
    )
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    p.add_argument("--workdir", type=Path, help="logs and raw data (default: a temporary dir)")
    p.add_argument("--keep", action="store_true", help="keep the workdir")
    p.add_argument("--from-raw", type=Path, help="only redraw the report from a raw.json")
    return p.parse_args(argv)


def revision() -> str:
    """The commit of the sidecar code measured, and whether sidecar/ had local changes."""
    head = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "sidecar"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if not head:
        return "unknown"
    return head + (" with uncommitted changes in sidecar/" if dirty else "")


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that clean up


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    command = "python -m bench.discovery" + "".join(
        f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:])
    )
    if args.from_raw is not None:
        run = RunData.load(args.from_raw)
        md, figs = report.write(run, args.out_dir)
        print(report.summary(figs))
        print(f"wrote {md}")
        return 0
    keys = [k.strip() for k in args.setups.split(",") if k.strip()]
    if keys == ["all"]:
        keys = list(SETUPS)
    unknown = [k for k in keys if k not in SETUPS]
    if unknown or not keys:
        print(f"unknown setups {unknown}; choose from {', '.join(SETUPS)}", file=sys.stderr)
        return 2
    problem = netns_problem()
    if problem is None:
        needed = ["nsd", "nsd-control"] + (["dnsmasq"] if "dnsmasq" in keys else [])
        missing = [
            b for b in needed if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()
        ]
        problem = f"missing {', '.join(missing)}" if missing else None
    if problem is not None:
        print(f"bench.discovery: {problem}", file=sys.stderr)
        return 2
    timeline = Timeline(deregister_after=args.deregister_after).scaled(args.time_scale)
    options = Options(clients=args.clients, rate=args.rate)
    signal.signal(signal.SIGTERM, _terminate)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-discovery-"))
    tag = str(os.getpid() % 10000)
    started_at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_before = os.getloadavg()[0]
    if load_before > 1.0:
        print(
            f"note: load average {load_before:.1f} before the run; other work on the host "
            "shows up as timeouts in every setup (the report flags them)",
            file=sys.stderr,
        )
    began = time.monotonic()
    ok = False
    try:
        setups = [SETUPS[k] for k in keys]
        results: list[SetupData] = []
        if args.sequential:
            for setup in setups:
                print(f"running {setup.key} ...", flush=True)
                results += run_setups([setup], timeline, options, workdir / setup.key, tag)
        else:
            print(f"running {', '.join(keys)} side by side ...", flush=True)
            results = run_setups(setups, timeline, options, workdir, tag)
        run = RunData(
            timeline,
            options,
            results,
            started_at,
            time.monotonic() - began,
            not args.sequential,
            command,
            load_before,
            revision(),
        )
        run.save(workdir / "raw.json")
        md, figs = report.write(run, args.out_dir)
        print(report.summary(figs))
        print(f"wrote {md} and {args.out_dir / 'discovery.png'} (raw data: {workdir / 'raw.json'})")
        ok = True
    finally:
        if ok and not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not ok:
            print(f"logs kept in {workdir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
