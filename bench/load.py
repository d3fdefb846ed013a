"""Load generators: dnsperf runs (and parsing their output), a one-in-flight latency client and
a burst of identical queries. Every loop here is bounded by a count and a deadline.

The benchmark process pins itself (and so dnsperf, which it starts) to the load core; the
servers under test are pinned to the other core (bench/run.py).
"""

from __future__ import annotations

import math
import re
import selectors
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.servers import build_query, reply_rcode

DNSPERF = "dnsperf"

_FIELDS = {
    "sent": re.compile(r"Queries sent:\s+(\d+)"),
    "completed": re.compile(r"Queries completed:\s+(\d+)"),
    "lost": re.compile(r"Queries lost:\s+(\d+)"),
    "qps": re.compile(r"Queries per second:\s+([\d.]+)"),
    "avg_latency": re.compile(r"Average Latency \(s\):\s+([\d.]+)"),
    "runtime": re.compile(r"Run time \(s\):\s+([\d.]+)"),
}
_NOERROR = re.compile(r"NOERROR (\d+)")


@dataclass
class DnsperfResult:
    qps: float
    sent: int
    completed: int
    lost: int
    noerror: int
    avg_latency: float
    runtime: float
    latencies: list[float] = field(default_factory=list)  # seconds, only with verbose=True

    @property
    def ok_share(self) -> float:
        return self.noerror / self.sent if self.sent else 0.0


def parse_dnsperf(text: str, verbose: bool = False) -> DnsperfResult:
    values: dict[str, float] = {}
    for key, pattern in _FIELDS.items():
        m = pattern.search(text)
        values[key] = float(m.group(1)) if m else 0.0
    noerror = _NOERROR.search(text)
    latencies: list[float] = []
    if verbose:
        for line in text.splitlines():
            # "> NOERROR h000001.bench.example A 0.000042"
            if line.startswith("> "):
                try:
                    latencies.append(float(line.rsplit(" ", 1)[1]))
                except ValueError:
                    continue
    return DnsperfResult(
        qps=values["qps"],
        sent=int(values["sent"]),
        completed=int(values["completed"]),
        lost=int(values["lost"]),
        noerror=int(noerror.group(1)) if noerror else 0,
        avg_latency=values["avg_latency"],
        runtime=values["runtime"],
        latencies=latencies,
    )


def dnsperf(
    address: str,
    datafile: Path,
    *,
    seconds: float,
    clients: int = 10,
    outstanding: int = 100,
    rate: float | None = None,
    once: bool = False,
    verbose: bool = False,
    timeout: float = 1.0,
    output: Path | None = None,
) -> DnsperfResult:
    """One dnsperf run against `address` (HOST:PORT): at most `seconds`, then it stops."""
    host, port = address.rsplit(":", 1)
    cmd = [
        DNSPERF,
        "-s",
        host,
        "-p",
        port,
        "-d",
        str(datafile),
        "-l",
        f"{seconds:g}",
        "-c",
        str(clients),
        "-q",
        str(outstanding),
        "-t",
        f"{timeout:g}",
        "-T",
        "1",
    ]
    if rate is not None:
        cmd += ["-Q", str(max(1, int(rate)))]
    if once:
        cmd += ["-n", "1"]
    if verbose:
        cmd.append("-v")
    # dnsperf stops after `seconds` plus the timeout for the last queries; a margin on top.
    limit = seconds + timeout + 30
    if output is not None:
        with output.open("w") as out:
            subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=limit, check=True)
        text = output.read_text(errors="replace")
    else:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=limit, check=True, errors="replace"
        )
        text = done.stdout + done.stderr
    return parse_dnsperf(text, verbose=verbose)


def one_in_flight(
    address: str, names: Sequence[str], *, count: int, seconds: float, timeout: float = 1.0
) -> tuple[list[float], int]:
    """Latencies (seconds) of up to `count` queries sent one at a time (each waits for its
    answer), for at most `seconds`; and the number of queries that got no answer in time.

    Measured in this process around send and receive on a connected UDP socket, so each sample
    includes a few microseconds of Python on the client side, the same for every server."""
    host, port = address.rsplit(":", 1)
    queries = [build_query(name, qid=i % 65536) for i, name in enumerate(names)]
    latencies: list[float] = []
    lost = 0
    clock = time.perf_counter_ns
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, int(port)))
        s.settimeout(timeout)
        deadline = time.monotonic() + seconds
        for i in range(count):
            if i % 256 == 0 and time.monotonic() > deadline:
                break
            query = queries[i % len(queries)]
            t0 = clock()
            s.send(query)
            try:
                while True:
                    data = s.recv(4096)
                    if data[:2] == query[:2]:
                        break
            except TimeoutError:
                lost += 1
                continue
            latencies.append((clock() - t0) / 1e9)
    return latencies, lost


def burst(
    address: str, name: str, *, queries: int, sockets: int, timeout: float = 3.0
) -> tuple[int, float]:
    """Send `queries` identical questions for `name` at once, spread over `sockets` client
    sockets with distinct IDs; return (NOERROR answers received, seconds until the last one)."""
    host, port = address.rsplit(":", 1)
    target = (host, int(port))
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(sockets)]
    sel = selectors.DefaultSelector()
    answered = 0
    last = 0.0
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        start = time.perf_counter()
        for i in range(queries):
            socks[i % sockets].sendto(build_query(name, qid=i), target)
        deadline = start + timeout
        while answered < queries:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            for key, _ in sel.select(remaining):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                while True:
                    try:
                        data = sock.recv(4096)
                    except BlockingIOError:
                        break
                    try:
                        _qid, rcode, an = reply_rcode(data)
                    except ValueError:
                        continue
                    if rcode == 0 and an > 0:
                        answered += 1
                        last = time.perf_counter() - start
    finally:
        sel.close()
        for s in socks:
            s.close()
    return answered, last


def percentiles(values: Sequence[float], ps: Sequence[float]) -> list[float]:
    """The `ps` percentiles (0..100) of `values`, nearest rank; NaN when there are none."""
    if not values:
        return [math.nan for _ in ps]
    ordered = sorted(values)
    n = len(ordered)
    return [ordered[min(max(1, math.ceil(p / 100 * n)), n) - 1] for p in ps]
