"""The benchmark: `python -m bench.run [--quick] [--rounds N] [--out DIR]`.

One run measures every server side by side, in rounds; each round starts every server afresh
and goes through the measures with the servers in a rotated order, so that drift of the machine
(another process, thermal, caches) is spread over all of them. Reported values are the median
of the rounds. See bench/README.md for what each number means.

Each round has two server lifetimes:
  A. start (start-up time to first answer, idle RSS) -> warm the hit and discovery names ->
     cache-hit QPS -> discovery-name QPS (plain and shaped sidecar) -> latency with one query in
     flight -> latency at 50% of the server's cache-hit QPS -> burst of identical misses
     (upstream queries per client query) -> QPS with 5% misses -> stop;
  B. start -> fill 1k names, QPS and RSS -> fill to 10k, QPS and RSS -> fill to 100k, QPS and
     RSS -> stop (cost growth; the fill rate is the all-miss throughput).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime as dt
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import load, report, zones
from bench.fixtures import CountingProxy, LoopThread, TcpBackends
from bench.image import image_bin, interpreter_line
from bench.servers import (
    Dnsmasq,
    Nsd,
    Server,
    Sidecar,
    Unbound,
    cpu_seconds,
    free_port,
    sidecar_flags,
)

ROOT = Path(__file__).resolve().parent.parent
PERCENTILES = (50.0, 90.0, 99.0, 99.9)

SIDECAR = "sidecar"
SHAPED = "sidecar-shaped"
DNSMASQ = "dnsmasq"
UNBOUND = "unbound"
BASELINE = DNSMASQ

HOSTS = {SIDECAR: "127.0.20.1", SHAPED: "127.0.20.2", DNSMASQ: "127.0.20.3", UNBOUND: "127.0.20.4"}
WORKERS_HOST = "127.0.20.5"
NSD_HOST = "127.0.21.1"
PROXY_HOST = "127.0.21.2"
PARALLEL_FILL = 20000  # growth steps adding more names than this fill all servers at once
MIN_FILL_MEASURE = 5000  # sequential fills at least this big give the all-miss QPS
MISS_LATENCY_NAMES = 2000  # new names asked one at a time, per server and round
BACKEND_POOL = [f"127.0.22.{i}" for i in range(2, 10)]


@dataclass
class Settings:
    rounds: int = 5  # the per-round hit ratio moves by +-15% on this VM: 5 for a steadier median
    hit_seconds: float = 2.5  # each cache-hit / discovery / miss-mix dnsperf run
    latency_seconds: float = 1.5  # each latency run (both kinds)
    latency_count: int = 20000  # at most this many queries one at a time
    clients: int = 10  # dnsperf -c: client sockets
    outstanding: int = 100  # dnsperf -q: queries in flight
    hit_names: int = 1000
    services: int = 100  # discovery names, 4 A records each
    growth: tuple[int, ...] = (1000, 10000, 100000)
    burst_queries: int = 100  # identical misses per burst
    burst_sockets: int = 20
    bursts: int = 5  # bursts (distinct names) per server per round
    proxy_delay: float = 0.05  # seconds the counting proxy holds each upstream reply
    miss_every: int = 20  # 1 in 20 = 5% misses
    settle: float = 1.0  # seconds after start before idle RSS is read
    server_cpu: int = 1
    load_cpu: int = 0
    workers: int = 0  # > 0: also measure `dns-sidecar --workers N` on both cores
    quick: bool = False


def quick_settings() -> Settings:
    return Settings(
        rounds=1,
        hit_seconds=1.5,
        latency_seconds=1.0,
        latency_count=5000,
        growth=(1000, 10000),
        bursts=2,
        settle=0.5,
        quick=True,
    )


@dataclass
class Results:
    """Every measure, per server, one value per round (medians are taken in report.py)."""

    hits_qps: dict[str, list[float]] = field(default_factory=dict)
    discovery_qps: dict[str, list[float]] = field(default_factory=dict)
    miss_qps: dict[str, list[float]] = field(default_factory=dict)
    latency_1: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # p -> rounds
    latency_half: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    half_rate: dict[str, list[float]] = field(default_factory=dict)
    burst_ratio: dict[str, list[float]] = field(default_factory=dict)
    burst_answered: dict[str, list[float]] = field(default_factory=dict)
    # The same ratio from the sidecar's own upstream counter, to check the relay's count.
    burst_sidecar_own: dict[str, list[float]] = field(default_factory=dict)
    startup_s: dict[str, list[float]] = field(default_factory=dict)
    idle_rss_kib: dict[str, list[float]] = field(default_factory=dict)
    growth_qps: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # names -> rounds
    growth_rss_kib: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    fill_qps: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # new names
    # CPU seconds per 1,000 misses in those fills (the server's own CPU, its children's too)
    fill_cpu: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # New names asked one at a time (each a miss): p -> rounds, per server, and the upstream
    # (NSD) asked the same names directly under "upstream"
    miss_latency_1: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    shaped_answers: list[float] = field(default_factory=list)
    other_cpu_share: list[float] = field(default_factory=list)  # per round, of all CPUs
    stolen_cpu_share: list[float] = field(default_factory=list)  # per round: steal time
    # The server's CPU time / run time during the QPS runs ("hits", "discovery"): below 1.0
    # the server waited for queries, so dnsperf, not the server, set the pace.
    server_cpu: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: {"hits": {}, "discovery": {}}
    )
    warnings: list[str] = field(default_factory=list)

    def add(self, table: dict[str, list[float]], server: str, value: float) -> None:
        table.setdefault(server, []).append(value)

    def add_nested(
        self, table: dict[str, dict[str, list[float]]], server: str, key: str, value: float
    ) -> None:
        table.setdefault(server, {}).setdefault(key, []).append(value)

    def add_percentiles(
        self, table: dict[str, dict[str, list[float]]], server: str, latencies: list[float]
    ) -> None:
        """The PERCENTILES of one round's `latencies`, each under its "pNN" key."""
        for p, v in zip(PERCENTILES, load.percentiles(latencies, PERCENTILES), strict=True):
            self.add_nested(table, server, f"p{p:g}", v)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def in_and_back(labels: Sequence[str]) -> list[tuple[str, bool]]:
    """The order of a measure's runs within a round: each server once in order, then once in
    reverse order (A B C C B A), so that a drift of the machine during the round weighs on all
    alike; with whether it is the second run. Every row of a round is measured so."""
    return [(label, False) for label in labels] + [(label, True) for label in reversed(labels)]


def rotated(items: Sequence[str], by: int) -> list[str]:
    k = by % len(items) if items else 0
    return [*items[k:], *items[:k]]


def cpu_busy_share(seconds: float = 1.0) -> float:
    """The share of all CPUs busy over `seconds` (from /proc/stat), before we load anything."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    total = total1 - total0
    return 1 - (idle1 - idle0) / total if total else 0.0


WAITED = [0.0]  # seconds spent waiting for a quiet machine


def wait_quiet(deadline: float, threshold: float = 0.10) -> float:
    """Wait until the machine is under `threshold` busy or `deadline` (monotonic) has passed;
    return the last busy share measured."""
    t0 = time.monotonic()
    busy = cpu_busy_share()
    while busy > threshold and time.monotonic() < deadline:
        log(f"machine {busy:.0%} busy; waiting for it to be quiet")
        time.sleep(8)
        busy = cpu_busy_share(2.0)
    WAITED[0] += time.monotonic() - t0
    return busy


def cpu_snapshot(live_pids: Sequence[int] = ()) -> tuple[float, float, float]:
    """(CPU-seconds the whole machine has been busy, CPU-seconds used by this process, its
    reaped children and the still-running processes `live_pids`, CPU-seconds stolen).
    Stolen: time a virtual CPU wanted to run and the hypervisor ran something else (the
    steal field of /proc/stat); on a shared host it comes and goes, and a round with much of
    it measures the host as much as the servers. It is not counted as busy."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    stolen = fields[7] if len(fields) > 7 else 0
    busy = (sum(fields) - fields[3] - fields[4] - stolen) / tick
    t = os.times()
    ours = t.user + t.system + t.children_user + t.children_system
    ours += sum(cpu_seconds(pid) for pid in live_pids)
    return busy, ours, stolen / tick


def steal_mark() -> tuple[float, float]:
    """(now, CPU-seconds stolen by the hypervisor so far): for `stolen_since`."""
    return time.monotonic(), cpu_snapshot()[2]


def stolen_since(mark: tuple[float, float]) -> float:
    """The share of all CPUs the hypervisor took since `mark` (cpu_snapshot's notes)."""
    (t0, stolen0), (t1, stolen1) = mark, steal_mark()
    return (stolen1 - stolen0) / max((t1 - t0) * (os.cpu_count() or 1), 1e-9)


def sidecar_metric(server: Sidecar, name: str) -> float:
    """Sum of a sidecar metric over all its label sets (0 if absent)."""
    with urllib.request.urlopen(server.metrics_url, timeout=5) as reply:
        text = reply.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def sidecar_has_flag(flag: str) -> bool:
    return flag in sidecar_flags()


class Bench:
    def __init__(self, settings: Settings, workdir: Path) -> None:
        self.s = settings
        self.work = workdir
        self.results = Results()
        self.helpers = LoopThread()
        self.nsd: Nsd | None = None
        self.proxy: CountingProxy | None = None
        self.backends: TcpBackends | None = None
        self.running: list[Server] = []
        self.files: dict[str, Path] = {}
        self.rng = random.Random(7)
        self.quiet_deadline = 0.0  # before each round, wait for a quiet machine until then

    # ---- set-up -------------------------------------------------------------------------

    def labels(self) -> list[str]:
        out = [SIDECAR, SHAPED, DNSMASQ, UNBOUND]
        if self.s.workers:
            out.append(self.workers_label)
        return out

    @property
    def workers_label(self) -> str:
        return f"sidecar-w{self.s.workers}"

    def write_files(self) -> None:
        s = self.s
        qdir = self.work / "queries"

        def shuffled(names: list[str]) -> list[str]:
            self.rng.shuffle(names)
            return names

        self.files["hits"] = zones.write_query_file(
            qdir / "hits.txt", shuffled(zones.hit_names(s.hit_names))
        )
        self.files["discovery"] = zones.write_query_file(
            qdir / "discovery.txt", shuffled([zones.service_name(i) for i in range(s.services)])
        )
        previous = 0
        for n in s.growth:
            self.files[f"fill{n}"] = zones.write_query_file(
                qdir / f"fill{n}.txt", shuffled(zones.hit_names(n - previous, previous))
            )
            self.files[f"grow{n}"] = zones.write_query_file(
                qdir / f"grow{n}.txt", shuffled(zones.hit_names(n))
            )
            previous = n

    def mixed_file(self, tag: str) -> Path:
        """The 5%-miss workload, its misses named with `tag` (new in each file): enough lines
        that no run gets through it (no repeats)."""
        lines = int(self.s.hit_seconds * 120_000)
        names = zones.mixed_names(self.s.hit_names, lines, self.s.miss_every, tag)
        return zones.write_query_file(self.work / "queries" / f"mixed-{tag}.txt", names)

    def start_upstreams(self) -> None:
        biggest = max(self.s.growth)
        zone_texts = {
            zones.BENCH_ZONE: zones.bench_zone(max(biggest, self.s.hit_names)),
            zones.BURST_ZONE: zones.burst_zone(),
            zones.DISCOVERY_ZONE: zones.discovery_zone(self.s.services, BACKEND_POOL),
        }
        # NSD shares the load core: it only works on the miss paths.
        self.nsd = Nsd(NSD_HOST, self.work / "nsd", None, zone_texts)
        self.nsd.start()
        nsd_host, nsd_port = self.nsd.address.rsplit(":", 1)
        self.proxy = CountingProxy(
            PROXY_HOST, free_port(PROXY_HOST), (nsd_host, int(nsd_port)), self.s.proxy_delay
        )
        self.helpers.run(self.proxy.start())
        self.backends = TcpBackends(BACKEND_POOL, free_port(BACKEND_POOL[0]))
        self.helpers.run(self.backends.start())

    def make_server(self, label: str, life: str) -> Server:
        assert self.nsd is not None and self.proxy is not None and self.backends is not None
        workdir = self.work / life / label
        cpus = str(self.s.server_cpu)
        upstream = self.nsd.address
        zone_ups = {zones.BURST_ZONE: self.proxy.address}
        cache = 2 * max(self.s.growth) + 10000
        if label == SIDECAR:
            return Sidecar(label, HOSTS[label], workdir, cpus, upstream, zone_ups, cache)
        if label == SHAPED:
            check = ["--health-check", f"{zones.DISCOVERY_ZONE}=tcp:{self.backends.port}"]
            return Sidecar(label, HOSTS[label], workdir, cpus, upstream, zone_ups, cache, check)
        if label == self.workers_label:
            # Both cores: the point is to see what a second process buys when the load
            # generator shares the machine.
            workers = ["--workers", str(self.s.workers)]
            every_cpu = ",".join(str(c) for c in range(os.cpu_count() or 1))
            return Sidecar(
                label, WORKERS_HOST, workdir, every_cpu, upstream, zone_ups, cache, workers
            )
        if label == DNSMASQ:
            return Dnsmasq(label, HOSTS[label], workdir, cpus, upstream, zone_ups, cache)
        if label == UNBOUND:
            return Unbound(
                label, HOSTS[label], workdir, cpus, upstream, zone_ups, [zones.DISCOVERY_ZONE]
            )
        raise ValueError(label)

    @contextlib.contextmanager
    def servers(self, labels: Sequence[str], life: str) -> Iterator[dict[str, Server]]:
        started: dict[str, Server] = {}
        try:
            for label in labels:
                server = self.make_server(label, life)
                self.running.append(server)
                startup = server.start()
                started[label] = server
                if life.startswith("a"):
                    self.results.add(self.results.startup_s, label, startup)
            yield started
        finally:
            for server in started.values():
                server.stop()
                with contextlib.suppress(ValueError):
                    self.running.remove(server)

    def stop_all(self) -> None:
        for server in self.running:
            server.stop()
        self.running.clear()
        if self.proxy is not None:
            self.helpers.call(self.proxy.close)
        if self.backends is not None:
            self.helpers.call(self.backends.close)
        self.helpers.stop()
        if self.nsd is not None:
            self.nsd.stop()

    # ---- measures -----------------------------------------------------------------------

    def run_dnsperf(
        self, what: str, server: Server, datafile: Path, **kw: Any
    ) -> load.DnsperfResult:
        result = load.dnsperf(server.address, datafile, **kw)
        if result.sent == 0 or result.ok_share < 0.99:
            self.results.warnings.append(
                f"{what} {server.label}: {result.noerror} NOERROR of {result.sent} sent, "
                f"{result.lost} lost"
            )
        return result

    def warm(self, server: Server, datafile: Path, passes: int = 1) -> load.DnsperfResult:
        """Ask every name in `datafile` once (misses: they go upstream); then again, `passes`
        times in all, or once more anyway if some queries got no answer. Returns the first."""
        clients = 4
        if server.label == self.workers_label:
            # SO_REUSEPORT hashes each client socket to one worker: many sockets, several
            # passes, so that every worker's cache gets (nearly) every name.
            clients, passes = 32, max(passes, 4)
        runs: list[load.DnsperfResult] = []
        while len(runs) < passes or (len(runs) == passes and runs[0].noerror < runs[0].sent):
            runs.append(
                load.dnsperf(
                    server.address,
                    datafile,
                    seconds=120,
                    clients=clients,
                    outstanding=200,
                    once=True,
                    timeout=2,
                )
            )
        return runs[0]

    def life_a(self, round_no: int) -> None:
        s, r = self.s, self.results
        labels = rotated(self.labels(), round_no)
        # The three single-process servers are measured everywhere; the shaped sidecar where
        # it differs (discovery names); the multi-process sidecar, if any, on throughput and
        # coalescing (each worker has a cache of its own).
        core = [x for x in labels if x in (SIDECAR, DNSMASQ, UNBOUND)]
        cmp_labels = [x for x in labels if x != SHAPED]
        discovery_labels = [x for x in labels if x != self.workers_label]
        log(f"round {round_no + 1}/{s.rounds}: start {', '.join(labels)}")
        with self.servers(labels, f"a{round_no}") as live:
            time.sleep(s.settle)
            for label in labels:
                r.add(r.idle_rss_kib, label, live[label].rss_kib())
            for label in cmp_labels:
                self.warm(live[label], self.files["hits"])
            for label in discovery_labels:
                self.warm(live[label], self.files["discovery"])

            log("cache-hit QPS")
            hit_qps = self.measure_qps("hits", live, cmp_labels, self.files["hits"])
            for label, qps in hit_qps.items():
                r.add(r.hits_qps, label, qps)
            log("  " + ", ".join(f"{k} {v:,.0f}" for k, v in hit_qps.items()))

            log("discovery-name QPS")
            shaped_before = sidecar_metric(
                self.sidecar(live, SHAPED), "dns_sidecar_answers_shaped_total"
            )
            disc_qps = self.measure_qps(
                "discovery", live, discovery_labels, self.files["discovery"]
            )
            for label, qps in disc_qps.items():
                r.add(r.discovery_qps, label, qps)
            shaped = sidecar_metric(self.sidecar(live, SHAPED), "dns_sidecar_answers_shaped_total")
            r.shaped_answers.append(shaped - shaped_before)
            log("  " + ", ".join(f"{k} {v:,.0f}" for k, v in disc_qps.items()))

            log("latency, one query in flight")
            names = zones.hit_names(s.hit_names)
            pooled: dict[str, list[float]] = {label: [] for label in core}
            for label, _ in in_and_back(core):  # each half of the run in turn
                lat, lost = load.one_in_flight(
                    live[label].address,
                    names,
                    count=s.latency_count // 2,
                    seconds=s.latency_seconds / 2,
                )
                if lost:
                    r.warnings.append(f"latency-1 {label}: {lost} queries unanswered")
                pooled[label] += lat
            for label, lat in pooled.items():
                r.add_percentiles(r.latency_1, label, lat)

            log("miss latency, one query in flight (new names; and NSD asked directly)")
            fresh = zones.hit_names(MISS_LATENCY_NAMES, max(s.growth) - MISS_LATENCY_NAMES)
            assert self.nsd is not None
            targets = {label: live[label].address for label in core}
            for label, address in [*targets.items(), ("upstream", self.nsd.address)]:
                lat, lost = load.one_in_flight(
                    address, fresh, count=len(fresh), seconds=s.latency_seconds * 4
                )
                if lost:
                    r.warnings.append(f"miss-latency-1 {label}: {lost} queries unanswered")
                r.add_percentiles(r.miss_latency_1, label, lat)

            log("latency at 50% of each server's cache-hit QPS")
            pooled = {label: [] for label in core}
            rates: dict[str, list[float]] = {label: [] for label in core}
            for label, _ in in_and_back(core):  # each half of the run in turn
                out = self.work / f"a{round_no}" / label / "dnsperf-half.txt"
                res = self.run_dnsperf(
                    "latency-half",
                    live[label],
                    self.files["hits"],
                    seconds=s.latency_seconds / 2,
                    clients=s.clients,
                    outstanding=s.outstanding,
                    rate=hit_qps[label] / 2,
                    verbose=True,
                    output=out,
                )
                out.unlink()
                rates[label].append(res.qps)
                pooled[label] += res.latencies
            for label, lat in pooled.items():
                r.add(r.half_rate, label, statistics.fmean(rates[label]))
                r.add_percentiles(r.latency_half, label, lat)

            log("burst of identical misses")
            assert self.proxy is not None
            upstream_metric = "dns_sidecar_upstream_request_duration_seconds_count"
            for label in cmp_labels:
                upstream = answered = 0
                server = live[label]
                own_before = (
                    sidecar_metric(server, upstream_metric)
                    if isinstance(server, Sidecar) and label == SIDECAR
                    else 0
                )
                for k in range(s.bursts):
                    name = f"b{round_no}-{k}-{label}.{zones.BURST_ZONE}"
                    got, _ = load.burst(
                        live[label].address,
                        name,
                        queries=s.burst_queries,
                        sockets=s.burst_sockets,
                    )
                    answered += got
                    time.sleep(0.1)  # late upstream retries, if any, are counted too
                    upstream += self.proxy.counts[name]
                asked = s.burst_queries * s.bursts
                r.add(r.burst_ratio, label, upstream / asked)
                r.add(r.burst_answered, label, answered / asked)
                if isinstance(server, Sidecar) and label == SIDECAR:
                    own = sidecar_metric(server, upstream_metric) - own_before
                    r.add(r.burst_sidecar_own, label, own / asked)

            log("QPS with 5% misses")
            mixed, mixed_again = self.mixed_file(f"r{round_no}"), self.mixed_file(f"s{round_no}")
            miss_qps = self.measure_qps("5%-miss", live, cmp_labels, mixed, mixed_again)
            for label, qps in miss_qps.items():
                r.add(r.miss_qps, label, qps)
            mixed.unlink()
            mixed_again.unlink()

    def measure_qps(
        self,
        what: str,
        live: dict[str, Server],
        labels: Sequence[str],
        datafile: Path,
        second_file: Path | None = None,
    ) -> dict[str, float]:
        """QPS of each server: one run each in order, then one each in reverse order
        (`in_and_back`), the mean of the two; the second runs read `second_file` if given
        (new misses for a workload with misses). The servers' CPU share is kept for the
        rows that have one (`server_cpu`)."""
        s = self.s
        runs: dict[str, list[float]] = {label: [] for label in labels}
        cpu: dict[str, list[float]] = {label: [] for label in labels}
        for label, second in in_and_back(labels):
            cpu0 = live[label].cpu_seconds()
            res = self.run_dnsperf(
                what,
                live[label],
                second_file if second and second_file is not None else datafile,
                seconds=s.hit_seconds,
                clients=s.clients,
                outstanding=s.outstanding,
            )
            runs[label].append(res.qps)
            cpu[label].append((live[label].cpu_seconds() - cpu0) / max(res.runtime, 0.001))
        if what in self.results.server_cpu:
            for label, shares in cpu.items():
                self.results.add(self.results.server_cpu[what], label, statistics.fmean(shares))
        return {label: statistics.fmean(v) for label, v in runs.items()}

    @staticmethod
    def sidecar(live: dict[str, Server], label: str) -> Sidecar:
        server = live[label]
        assert isinstance(server, Sidecar)
        return server

    def life_b(self, round_no: int) -> None:
        s, r = self.s, self.results
        labels = rotated([SIDECAR, DNSMASQ, UNBOUND], round_no)
        log(f"round {round_no + 1}/{s.rounds}: cost growth ({', '.join(labels)})")
        with self.servers(labels, f"b{round_no}") as live:
            previous = 0
            for n in s.growth:
                if n - previous > PARALLEL_FILL:
                    # A big step is filled in all servers at once (they share their core; the
                    # all-miss rate is taken from the smaller steps, filled one at a time).
                    with concurrent.futures.ThreadPoolExecutor(len(labels)) as pool:
                        fills = [
                            pool.submit(self.warm, live[label], self.files[f"fill{n}"])
                            for label in labels
                        ]
                        for fill in fills:
                            fill.result()
                else:
                    for label in labels:
                        cpu0 = live[label].cpu_seconds()
                        res = self.warm(live[label], self.files[f"fill{n}"])
                        if n - previous >= MIN_FILL_MEASURE:
                            r.add_nested(r.fill_qps, label, str(n - previous), res.qps)
                            per_1000 = (live[label].cpu_seconds() - cpu0) / res.sent * 1000
                            r.add_nested(r.fill_cpu, label, str(n - previous), per_1000)
                previous = n
                sidecars = {x: y for x, y in live.items() if isinstance(y, Sidecar)}
                misses0 = {
                    x: sidecar_metric(y, "dns_sidecar_cache_misses_total")
                    for x, y in sidecars.items()
                }
                qps = self.measure_qps(f"growth-{n}", live, labels, self.files[f"grow{n}"])
                for label, server in sidecars.items():
                    misses = sidecar_metric(server, "dns_sidecar_cache_misses_total")
                    if misses - misses0[label] > 0.01 * qps[label] * 2 * s.hit_seconds:
                        r.warnings.append(
                            f"growth-{n} {label}: {misses - misses0[label]:.0f} queries were"
                            " cache misses in its two runs (the cache did not hold every name)"
                        )
                for label in labels:
                    r.add_nested(r.growth_qps, label, str(n), qps[label])
                    r.add_nested(r.growth_rss_kib, label, str(n), live[label].rss_kib())
                log(
                    f"  {n} names: "
                    + ", ".join(f"{x} {r.growth_qps[x][str(n)][-1]:,.0f} qps" for x in labels)
                )

    def run(self) -> Results:
        self.write_files()
        self.start_upstreams()
        assert self.nsd is not None
        for round_no in range(self.s.rounds):
            if round_no:
                wait_quiet(self.quiet_deadline)
            mark = steal_mark()
            t0, (busy0, ours0, _) = time.monotonic(), cpu_snapshot([self.nsd.pid])
            self.life_a(round_no)
            self.life_b(round_no)
            t1, (busy1, ours1, _) = time.monotonic(), cpu_snapshot([self.nsd.pid])
            # CPU time of processes that are not part of the benchmark (other work on the
            # machine), and CPU time the hypervisor took, as shares of both CPUs: what
            # disturbed this round.
            other = max(0.0, (busy1 - busy0) - (ours1 - ours0))
            self.results.other_cpu_share.append(other / ((t1 - t0) * (os.cpu_count() or 1)))
            self.results.stolen_cpu_share.append(stolen_since(mark))
            log(
                f"round {round_no + 1}: other processes used "
                f"{self.results.other_cpu_share[-1]:.0%} of the CPUs, the hypervisor took "
                f"{self.results.stolen_cpu_share[-1]:.0%}"
            )
        return self.results


def machine_info() -> dict[str, str]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import uvloop

    def first_line(cmd: list[str]) -> str:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return "?"
        lines = (done.stdout + done.stderr).strip().splitlines()
        return lines[0] if lines else "?"

    dnsperf_version = "?"
    with contextlib.suppress(OSError):
        out = subprocess.run(["dnsperf", "-h"], capture_output=True, text=True, check=False)
        for line in (out.stdout + out.stderr).splitlines():
            if line.startswith("Version"):
                dnsperf_version = line.split()[-1]
    sidecar_exe = str(image_bin() / "dns-sidecar")
    commit = first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "sidecar"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": interpreter_line(),  # the sidecar's, not this process's
        "uvloop": str(getattr(uvloop, "__version__", "?")),
        "sidecar": first_line([sidecar_exe, "--version"])
        + f" (commit {commit}"
        + (", sidecar/ modified)" if dirty else ")")
        + ", installed as the image installs it (bench/image.py)",
        "dnsmasq": first_line(["dnsmasq", "--version"]).split("  ")[0],
        "unbound": first_line(["unbound", "-V"]),
        "nsd": first_line(["nsd", "-v"]),
        "dnsperf": dnsperf_version,
    }


def check_tools() -> None:
    missing = [t for t in ("dnsperf", "nsd", "dnsmasq", "unbound", "taskset") if not _which(t)]
    if missing:
        sys.exit(f"bench: missing {', '.join(missing)}: run .ci/install-deps.sh (make bench)")


def _which(tool: str) -> bool:
    return shutil.which(tool) is not None or Path("/usr/sbin", tool).exists()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round (a smoke run)")
    parser.add_argument("--rounds", type=int, help="rounds (default 5; --quick 1)")
    parser.add_argument("--seconds", type=float, help="seconds per throughput run")
    parser.add_argument(
        "--workers",
        type=int,
        help="also measure dns-sidecar --workers N on both cores (default: 2 when the sidecar "
        "has --workers; 0: not at all)",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results", help="where latest.md goes"
    )
    parser.add_argument("--keep-workdir", action="store_true", help="keep logs and configs")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait for the machine to be quiet (under 10%% busy) before the run and each "
        "round, in all up to this long",
    )
    args = parser.parse_args(argv)
    check_tools()
    settings = quick_settings() if args.quick else Settings()
    if args.rounds:
        settings.rounds = args.rounds
    if args.seconds:
        settings.hit_seconds = args.seconds
    has_workers = sidecar_has_flag("--workers")
    if args.workers is None:
        settings.workers = 2 if has_workers else 0
    elif args.workers > 0:
        if not has_workers:
            sys.exit("bench: this dns-sidecar has no --workers flag")
        settings.workers = args.workers
    if (os.cpu_count() or 1) < 2:
        sys.exit("bench: needs two CPUs (one for the servers, one for dnsperf)")

    # SIGTERM ends the run like Ctrl-C: the servers are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))
    # This process, dnsperf and NSD run on the load core; servers are pinned to the other.
    os.sched_setaffinity(0, {settings.load_cpu})
    started = time.monotonic()
    quiet_deadline = started + args.wait_quiet
    busy = wait_quiet(quiet_deadline)
    load_avg = Path("/proc/loadavg").read_text().split()[:3]
    log(f"machine busy before the run: {busy:.0%} of all CPUs (load {' '.join(load_avg)})")

    workdir = Path(tempfile.mkdtemp(prefix="dns-bench-"))
    bench = Bench(settings, workdir)
    bench.quiet_deadline = quiet_deadline
    try:
        results = bench.run()
    finally:
        bench.stop_all()
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"work directory kept: {workdir}")
    elapsed = time.monotonic() - started
    busy_after = cpu_busy_share()
    meta: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "settings": asdict(settings),
        "busy_before": busy,
        "busy_after": busy_after,
        "loadavg_before": " ".join(load_avg),
        "elapsed_s": elapsed,
        "waited_s": WAITED[0],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(
        json.dumps({"meta": meta, "results": asdict(results)}, indent=1) + "\n"
    )
    report.write(results, meta, args.out)
    log(f"done in {elapsed:.0f} s: {args.out / 'latest.md'}")
    summary = report.headline(results)
    for line in summary:
        log(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
