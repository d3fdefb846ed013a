"""Drive the timeline against every setup at once and collect what happened.

Theory of operation
- One `Lab` holds every namespace and process of the run. Setups start side by side: NSD and
  the backends in each service namespace, then the DNS server under test in each task namespace,
  then a readiness check per setup (`tests.fakes.gai_client`: the name answers, and for a
  sidecar every backend has been probed), then the application processes, which wait for one
  "go" line carrying the start times.
- The same events hit every setup at the same moment (one clock: CLOCK_MONOTONIC is shared by
  all namespaces): the backends program and NSD's control socket are driven from here, and the
  time each change took effect is recorded.
- Every second NSD's query counter of each setup is read, for the upstream query rate.
- Afterwards the application logs, NSD's counters and the sidecar's health transitions (its
  JSON log) become a `RunData`, saved as JSON so the report can be redrawn without a rerun.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO

from bench.discovery.lab import Lab, Pair, stop
from bench.discovery.scenario import (
    BACKEND_ADDRS,
    BACKEND_PORT,
    DEAD,
    SERVICE,
    SLOW,
    UPSTREAM_ADDR,
    ZONE,
    Setup,
    Timeline,
)
from bench.discovery.upstream import NamespacedNsd, start_nsd

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
SIDECAR_METRICS = "127.0.0.1:9153"


@dataclass
class Options:
    clients: int = 8  # application processes per setup
    rate: float = 240.0  # requests per second per setup, all processes together
    cache_seconds: float = 5.0
    request_timeout: float = 2.0


@dataclass
class SetupData:
    """What one setup produced; times in seconds relative to t = 0."""

    key: str
    title: str
    server: str
    server_args: list[str]
    # (t, address or "-", ok, latency seconds, error or "-")
    requests: list[tuple[float, str, bool, float, str]] = field(default_factory=list)
    # (t, duration, first address or "-", address count, error or "-")
    lookups: list[tuple[float, float, str, int, str]] = field(default_factory=list)
    # (t, queries the upstream received so far, of them NOERROR answers to A questions)
    upstream: list[tuple[float, int, int]] = field(default_factory=list)
    # (t, address, health) from the sidecar's log
    health: list[tuple[float, str, str]] = field(default_factory=list)
    events: dict[str, float] = field(default_factory=dict)  # what -> t it took effect
    # the sidecar's own counters at the end (dns_sidecar_* samples, labels folded in the name)
    metrics: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # role -> CPU seconds over the run
    # (t, address, health, latency ms or None) from the sidecar's endpoint table, every second
    endpoints: list[tuple[float, str, str, float | None]] = field(default_factory=list)
    # (t, first address) of answers the sidecar gave the watcher's own queries, every second
    answers: list[tuple[float, str]] = field(default_factory=list)
    server_started: float = 0.0  # t of the server's start (its first upstream queries)


@dataclass
class RunData:
    timeline: Timeline
    options: Options
    setups: list[SetupData]
    started_at: str  # wall clock, UTC
    seconds: float  # how long the whole run took
    concurrent: bool
    command: str = ""
    load_before: float = 0.0  # 1-minute load average of the machine before the run
    revision: str = ""  # the sidecar code measured (git)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @staticmethod
    def load(path: Path) -> RunData:
        raw = json.loads(path.read_text())
        setups = [
            SetupData(
                **{
                    **s,
                    "requests": [tuple(r) for r in s["requests"]],
                    "lookups": [tuple(r) for r in s["lookups"]],
                    "upstream": [tuple(r) for r in s["upstream"]],
                    "health": [tuple(r) for r in s["health"]],
                    "endpoints": [tuple(r) for r in s.get("endpoints", [])],
                    "answers": [tuple(r) for r in s.get("answers", [])],
                }
            )
            for s in raw["setups"]
        ]
        return RunData(
            Timeline(**raw["timeline"]),
            Options(**raw["options"]),
            setups,
            raw["started_at"],
            raw["seconds"],
            raw["concurrent"],
            raw.get("command", ""),
            raw.get("load_before", 0.0),
            raw.get("revision", ""),
        )


# --- one setup's processes --------------------------------------------------------------------


def readline(proc: subprocess.Popen[bytes], what: str, timeout: float = 30.0) -> str:
    """The next stdout line of `proc`, waiting at most `timeout` seconds (its pipes are
    unbuffered, see Lab.python, so select() sees every byte not read yet)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, remaining))
        if not ready:
            raise RuntimeError(f"{what}: no answer within {timeout} s (exit {proc.poll()})")
        byte = proc.stdout.read(1)
        if not byte:
            raise RuntimeError(f"{what} ended (exit {proc.wait()}) after {line!r}")
        line += byte
    return line.decode().strip()


def send(proc: subprocess.Popen[bytes], line: str) -> None:
    stdin: IO[bytes] | None = proc.stdin
    assert stdin is not None
    stdin.write(line.encode() + b"\n")
    stdin.flush()


@dataclass
class Rig:
    """One setup at run time: its namespaces, NSD, backends, server and clients."""

    setup: Setup
    data: SetupData
    pair: Pair
    nsd: NamespacedNsd | None = None
    backends: subprocess.Popen[bytes] | None = None
    server: subprocess.Popen[bytes] | None = None
    clients: list[subprocess.Popen[bytes]] = field(default_factory=list)
    watch: subprocess.Popen[bytes] | None = None  # samples a sidecar's endpoint table

    @property
    def nameserver(self) -> str:
        return "127.0.0.1" if self.setup.server != "none" else UPSTREAM_ADDR

    @property
    def followers(self) -> list[subprocess.Popen[bytes]]:
        """The processes that wait for the "go" line: the clients, and the watcher if any."""
        return [*self.clients, *([self.watch] if self.watch is not None else [])]

    def backend_command(self, line: str) -> None:
        assert self.backends is not None
        send(self.backends, line)
        answer = readline(self.backends, f"{self.setup.key} backends")
        if answer != f"ok {line}":
            raise RuntimeError(f"{self.setup.key} backends answered {answer!r} to {line!r}")


def server_argv(setup: Setup) -> list[str]:
    if setup.server == "sidecar":
        return [
            sys.executable,
            "-m",
            "sidecar",
            "--listen",
            "127.0.0.1:53",
            "--upstream",
            f"{UPSTREAM_ADDR}:53",
            "--zone",
            f"{ZONE}={UPSTREAM_ADDR}:53",
            "--metrics-listen",
            SIDECAR_METRICS,
            "--drain-seconds",
            "0",
            *setup.sidecar_args,
        ]
    if setup.server == "dnsmasq":
        return [
            DNSMASQ,
            "--keep-in-foreground",
            "--conf-file=/dev/null",  # no /etc/dnsmasq.conf, no /etc/dnsmasq.d
            "--no-resolv",  # never the machine's resolver
            "--no-hosts",
            f"--server={UPSTREAM_ADDR}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--port=53",
            "--cache-size=1000",
            "--pid-file=",
            "--user=root",
            "--log-facility=-",
        ]
    return []


def readiness_argv(rig: Rig) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "tests.fakes.gai_client",
        "--dns",
        f"{rig.nameserver}:53",
        "--name",
        SERVICE,
        "--count",
        "0",
        "--timeout",
        "20",
    ]
    if rig.setup.server == "sidecar":
        argv += ["--metrics", SIDECAR_METRICS, *(f"--expect={a}" for a in BACKEND_ADDRS)]
    return argv


def health_log(text: str, wall0: float) -> list[tuple[float, str, str]]:
    """The sidecar's "endpoint health changed" lines as (t, address, health)."""
    out = []
    for line in text.splitlines():
        if '"endpoint health changed"' not in line:
            continue
        try:
            entry = json.loads(line)
            when = datetime.fromisoformat(entry["ts"].replace("Z", "+00:00")).timestamp()
        except (ValueError, KeyError):
            continue
        out.append((round(when - wall0, 3), str(entry["address"]), str(entry["health"])))
    return out


SCRAPE = (
    "import http.client, sys\n"
    "c = http.client.HTTPConnection(*sys.argv[1].rsplit(':', 1), timeout=5)\n"
    "c.request('GET', '/metrics')\n"
    "sys.stdout.write(c.getresponse().read().decode())\n"
)
WANTED = (
    "dns_sidecar_cache_hits_total",
    "dns_sidecar_cache_misses_total",
    "dns_sidecar_cache_prefetch_total",
    "dns_sidecar_coalesced_total",
    "dns_sidecar_responses_total",
    "dns_sidecar_upstream_request_duration_seconds_count",
    "dns_sidecar_upstream_errors_total",
    "dns_sidecar_answers_shaped_total",
    "dns_sidecar_endpoint_probes_total",
)


def scrape(rig: Rig) -> dict[str, float]:
    """The sidecar's counters of interest, read from /metrics inside its namespace."""
    proc = subprocess.run(
        ["ip", "netns", "exec", rig.pair.task, sys.executable, "-c", SCRAPE, SIDECAR_METRICS],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    out: dict[str, float] = {}
    for line in proc.stdout.splitlines():
        if line.startswith(WANTED):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a running process (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(rig: Rig) -> dict[str, float]:
    """CPU time the server, the backends and the clients used (read before they are reaped)."""
    parts: dict[str, float] = {}
    if rig.server is not None:
        parts[rig.setup.server] = process_cpu(rig.server.pid)
    if rig.backends is not None:
        parts["backends"] = process_cpu(rig.backends.pid)
    parts["clients"] = sum(process_cpu(c.pid) for c in rig.clients)
    return {k: round(v, 2) for k, v in parts.items()}


def parse_watch(
    text: str,
) -> tuple[list[tuple[float, str, str, float | None]], list[tuple[float, str]]]:
    """The watcher's samples: endpoint rows, and the first addresses of its answers."""
    rows: list[tuple[float, str, str, float | None]] = []
    answers: list[tuple[float, str]] = []
    for line in text.splitlines():
        t, body, picked = [*line.split("\t"), "", ""][:3]
        table = json.loads(body) if body else None
        for row in (table or {}).get("endpoints", []):
            rows.append((float(t), str(row["address"]), str(row["health"]), row["latency_ms"]))
        answers += [(float(t), a) for a in picked.split(",") if a]
    return rows, answers


def parse_client_log(text: str, data: SetupData) -> None:
    for line in text.splitlines():
        parts = line.split("\t")
        if parts[0] == "Q" and len(parts) == 6:
            data.requests.append(
                (float(parts[1]), parts[2], parts[3] == "1", float(parts[4]), parts[5])
            )
        elif parts[0] == "R" and len(parts) == 6:
            data.lookups.append(
                (float(parts[1]), float(parts[2]), parts[3], int(parts[4]), parts[5])
            )


# --- the run ----------------------------------------------------------------------------------


def run_setups(
    setups: list[Setup], timeline: Timeline, options: Options, workdir: Path, tag: str
) -> list[SetupData]:
    """Run `timeline` against `setups` side by side; everything is torn down on return."""
    workdir.mkdir(parents=True, exist_ok=True)
    with Lab(workdir, tag) as lab:
        rigs: list[Rig] = []
        for setup in setups:
            data = SetupData(setup.key, setup.title, setup.server, list(setup.sidecar_args))
            nameserver = "127.0.0.1" if setup.server != "none" else UPSTREAM_ADDR
            rigs.append(Rig(setup, data, lab.pair(setup.key, nameserver)))
        started_mono: dict[str, float] = {}
        for rig in rigs:
            rig.nsd = start_nsd(
                rig.pair.service,
                workdir / f"{rig.setup.key}-nsd",
                UPSTREAM_ADDR,
                SERVICE.split(".")[0],
                list(BACKEND_ADDRS),
                timeline.ttl,
            )
            assert rig.nsd.proc is not None
            lab.procs.append(rig.nsd.proc)
            rig.backends = lab.python(
                rig.pair.service,
                f"{rig.setup.key}-backends",
                "bench.discovery.backends",
                "--port",
                str(BACKEND_PORT),
                *BACKEND_ADDRS,
            )
        for rig in rigs:
            assert rig.backends is not None
            if (line := readline(rig.backends, f"{rig.setup.key} backends")) != "ready":
                raise RuntimeError(f"backends: {line!r} {lab.log(rig.setup.key + '-backends')}")
            started_mono[rig.setup.key] = time.monotonic()
            if argv := server_argv(rig.setup):
                rig.server = lab.spawn(rig.pair.task, f"{rig.setup.key}-{rig.setup.server}", *argv)
        waits = [
            (rig, lab.spawn(rig.pair.task, f"{rig.setup.key}-ready", *readiness_argv(rig)))
            for rig in rigs
        ]
        for rig, proc in waits:
            if proc.wait(timeout=60) != 0:
                server_log = lab.log(f"{rig.setup.key}-{rig.setup.server}")
                raise RuntimeError(
                    f"{rig.setup.key}: not ready: {lab.log(rig.setup.key + '-ready')}\n{server_log}"
                )
        rate = options.rate / options.clients
        for rig in rigs:
            for i in range(options.clients):
                rig.clients.append(
                    lab.python(
                        rig.pair.task,
                        f"{rig.setup.key}-client{i}",
                        "bench.discovery.clients",
                        "--name",
                        SERVICE,
                        "--port",
                        str(BACKEND_PORT),
                        "--rate",
                        f"{rate:.3f}",
                        "--cache-seconds",
                        str(options.cache_seconds),
                        "--timeout",
                        str(options.request_timeout),
                        "--out",
                        str(workdir / f"{rig.setup.key}-client{i}.tsv"),
                    )
                )
            if rig.setup.server == "sidecar":
                rig.watch = lab.python(
                    rig.pair.task,
                    f"{rig.setup.key}-watch",
                    "bench.discovery.watch",
                    "--metrics",
                    SIDECAR_METRICS,
                    "--dns",
                    "127.0.0.1:53",
                    "--name",
                    SERVICE,
                    "--out",
                    str(workdir / f"{rig.setup.key}-endpoints.tsv"),
                )
        for rig in rigs:
            for i, client in enumerate(rig.followers):
                if (line := readline(client, f"{rig.setup.key} client {i}")) != "ready":
                    raise RuntimeError(f"client: {line!r} {lab.log(f'{rig.setup.key}-client{i}')}")

        t0 = time.monotonic() + timeline.warmup + 0.5
        wall0 = time.time() + (t0 - time.monotonic())
        for rig in rigs:
            rig.data.server_started = round(started_mono[rig.setup.key] - t0, 3)
            for client in rig.followers:
                send(client, f"go {t0 - timeline.warmup:.6f} {t0:.6f} {t0 + timeline.duration:.6f}")
        drive(rigs, timeline, t0)
        for rig in rigs:
            for i, client in enumerate(rig.clients):
                if (line := readline(client, f"{rig.setup.key} client {i}", 60)) != "done":
                    raise RuntimeError(f"client: {line!r} {lab.log(f'{rig.setup.key}-client{i}')}")
                parse_client_log((workdir / f"{rig.setup.key}-client{i}.tsv").read_text(), rig.data)
            if rig.watch is not None:
                if (line := readline(rig.watch, f"{rig.setup.key} watch", 60)) != "done":
                    raise RuntimeError(f"watch: {line!r} {lab.log(f'{rig.setup.key}-watch')}")
                rig.data.endpoints, rig.data.answers = parse_watch(
                    (workdir / f"{rig.setup.key}-endpoints.tsv").read_text()
                )
        for rig in rigs:
            rig.data.cpu = cpu_seconds(rig)
            if rig.setup.server == "sidecar":
                rig.data.metrics = scrape(rig)
            if rig.server is not None:
                stop(rig.server)
                if rig.setup.server == "sidecar":
                    text = lab.log(f"{rig.setup.key}-sidecar")
                    rig.data.health = health_log(text, wall0)
            if rig.backends is not None:
                send(rig.backends, "quit")
        return [rig.data for rig in rigs]


def drive(rigs: list[Rig], timeline: Timeline, t0: float) -> None:
    """Sleep through the timeline, doing each event to every setup and reading NSD's counters
    every second, until the measured window ends."""

    def die(rig: Rig) -> None:
        rig.backend_command(f"die {DEAD}")

    def slow(rig: Rig) -> None:
        rig.backend_command(f"delay {SLOW} {timeline.slow_delay}")

    def deregister(rig: Rig) -> None:
        assert rig.nsd is not None
        rig.nsd.set_addresses([a for a in BACKEND_ADDRS if a != DEAD])

    def back(rig: Rig) -> None:
        rig.backend_command(f"revive {DEAD}")
        assert rig.nsd is not None
        rig.nsd.set_addresses(list(BACKEND_ADDRS))

    actions: list[tuple[float, str, Callable[[Rig], None] | None]] = [
        (timeline.death, "death", die),
        (timeline.slow, "slow", slow),
        (timeline.deregister, "deregister", deregister),
        (timeline.back, "back", back),
    ]
    start = -timeline.warmup
    ticks = [start + i for i in range(int(timeline.duration - start) + 2)]
    todo = sorted(
        [*actions, *((t, "tick", None) for t in ticks)], key=lambda a: (a[0], a[1] == "tick")
    )
    for at, what, action in todo:
        delay = t0 + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        for rig in rigs:
            if action is not None:
                action(rig)
                rig.data.events[what] = round(time.monotonic() - t0, 3)
                continue
            assert rig.nsd is not None
            stats = rig.nsd.stats()
            rig.data.upstream.append(
                (
                    round(time.monotonic() - t0, 3),
                    stats.get("num.queries", 0),
                    stats.get("num.rcode.NOERROR", 0),
                )
            )
