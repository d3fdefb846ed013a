"""Bridge mode on one machine: one daemon sidecar for every container of an instance, and the
upstream packet budget that keeps the instance under the VPC resolver's packet limit.

Namespaces, all made here:
- `host` plays the EC2 instance: a Linux bridge `br0` with 172.17.0.1/16 (docker0's address),
  the sidecar listening there and on 127.0.0.1 (the daemon's two listen addresses, `allow`
  172.17.0.0/16), and a scripted upstream on 169.254.169.253 (an address of that namespace's
  bridge) that drops every packet above 1024 in any one second, as the VPC resolver does
  per network interface;
- `c0`..`c3` play bridge-mode containers: a veth pair each, one end on the bridge, the other
  172.17.0.1x/16 in the container, which resolves through 172.17.0.1 (`dnsServers`).

The cold burst: 500 distinct names, asked by the containers between them within 0.1 s.
Measured numbers are printed (pytest -s).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from sidecar.core.packet_budget import BURST_SECONDS
from tests.fakes.scripted_upstream import Answer, QueryRecord, ScriptedUpstream
from tests.integration.conftest import REPO_ROOT
from tests.integration.test_discovery import _check, _netns_env, _netns_usable, _run, _stop

pytestmark = pytest.mark.integration

BRIDGE = "172.17.0.1"
VPC_RESOLVER = "169.254.169.253"  # inside the test's own namespace only
CONTAINERS = 4
NAMES = 500  # the cold burst, shared by the containers
VPC_LIMIT = 1024  # packets per second per network interface
BUDGET = 900  # upstream.max_packets_per_second's default
QUERY_TIMEOUT = 4.0
# The burst is sent over 0.1 s, not in one instant: the daemon's listening socket has the
# kernel's default receive buffer (net.core.rmem_default, 208 KiB here), which holds about 200
# queries; a truly simultaneous 500 would be dropped by the kernel, budget or not.
SPREAD = 0.1
CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """This thread in network namespace `name`: sockets made meanwhile (and threads started)
    live there."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
        try:
            yield
        finally:
            if libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(target)
        os.close(home)


class BridgeLab:
    def __init__(self, workdir: Path) -> None:
        tag = os.getpid() % 100000
        self.workdir = workdir
        self.host = f"dsc-br-h{tag}"
        self.containers = [f"dsc-br-c{i}-{tag}" for i in range(CONTAINERS)]
        self.upstream = ScriptedUpstream(VPC_RESOLVER)
        self.sidecar: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> BridgeLab:
        try:
            self.setup()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.stop_sidecar()
        self.upstream.stop()
        for ns in (*self.containers, self.host):
            _run("ip", "netns", "del", ns)

    def setup(self) -> None:
        host = self.host
        for ns in (host, *self.containers):
            _run("ip", "netns", "del", ns)
            _check("ip", "netns", "add", ns)
            _check("ip", "-n", ns, "link", "set", "lo", "up")
        _check("ip", "-n", host, "link", "add", "br0", "type", "bridge")
        _check("ip", "-n", host, "addr", "add", f"{BRIDGE}/16", "dev", "br0")
        _check("ip", "-n", host, "link", "set", "br0", "up")
        for number, ns in enumerate(self.containers):
            veth = f"veth{number}"
            _check(
                "ip", "-n", ns, "link", "add", "eth0", "type", "veth",
                "peer", "name", veth, "netns", host,
            )  # fmt: skip
            _check("ip", "-n", ns, "addr", "add", f"172.17.0.{10 + number}/16", "dev", "eth0")
            _check("ip", "-n", ns, "link", "set", "eth0", "up")
            _check("ip", "-n", host, "link", "set", veth, "master", "br0", "up")
        # The VPC resolver's address, on the instance's bridge here (only in this namespace):
        # the budget covers upstreams off loopback.
        _check("ip", "-n", host, "addr", "add", f"{VPC_RESOLVER}/32", "dev", "br0")
        with in_netns(host):
            self.upstream.start()
        self.upstream.default = Answer(("A 192.0.2.1",), ttl=300)
        self.upstream.max_packets_per_second = VPC_LIMIT

    def start_sidecar(self, budget: int) -> None:
        log = self.workdir / f"sidecar-{budget}.log"
        with log.open("wb") as output:
            self.sidecar = self._popen_sidecar(budget, output)
        deadline = time.monotonic() + 20
        while not self.answers_from(self.containers[0]):
            if self.sidecar.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sidecar not serving: {log.read_text()}")
            time.sleep(0.1)

    def _popen_sidecar(self, budget: int, output: IO[bytes]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                "ip", "netns", "exec", self.host, sys.executable, "-m", "sidecar",
                "--listen", f"{BRIDGE}:53", "--listen", "127.0.0.1:53",
                "--allow", "172.17.0.0/16", "--allow", "127.0.0.0/8",
                "--upstream", self.upstream.address,
                "--max-packets-per-second", str(budget),
                "--query-timeout", str(QUERY_TIMEOUT),
                "--metrics-listen", "127.0.0.1:9153", "--log-format", "text",
                "--drain-seconds", "0",
            ],
            stdout=output, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=_netns_env(),
        )  # fmt: skip

    def stop_sidecar(self) -> None:
        if self.sidecar is not None:
            _stop(self.sidecar)
            self.sidecar = None

    def answers_from(self, ns: str) -> bool:
        """The daemon answers a container over the bridge (a CHAOS question: no upstream)."""
        dig = self.in_ns(ns, "dig", f"@{BRIDGE}", "id.server", "CH", "TXT", "+tries=1", "+time=1")
        return "status: NOERROR" in dig.stdout

    def in_ns(self, ns: str, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", ns, *argv],
            capture_output=True, text=True, timeout=30, check=False, env=_netns_env(),
        )  # fmt: skip

    def metrics(self) -> str:
        url = "http://127.0.0.1:9153/metrics"
        with in_netns(self.host), urllib.request.urlopen(url, timeout=5) as page:
            return str(page.read().decode())

    def burst(self) -> list[list[object]]:
        """The containers ask NAMES names between them (their own share each) at the same
        moment; every result."""
        self.upstream.log.clear()  # the loop check and the readiness digs
        start = time.monotonic() + 2.0  # after every client has started
        share, wait = str(NAMES // CONTAINERS), str(QUERY_TIMEOUT + 1.0)
        client = [sys.executable, "-m", "tests.integration.bridge_client", BRIDGE]
        timing = [share, wait, repr(start), str(SPREAD)]
        clients = [
            subprocess.Popen(
                ["ip", "netns", "exec", ns, *client, f"c{number}", *timing],
                stdout=subprocess.PIPE,
                cwd=REPO_ROOT,
                env=_netns_env(),
            )
            for number, ns in enumerate(self.containers)
        ]
        results: list[list[object]] = []
        for client in clients:
            out, _ = client.communicate(timeout=60)
            assert client.returncode == 0
            results += json.loads(out)
        return results


def busiest_second(records: list[QueryRecord], window: float = 1.0) -> int:
    """The most packets that arrived in any `window` seconds."""
    times = sorted(r.at for r in records)
    most, first = 0, 0
    for last, at in enumerate(times):
        while times[first] <= at - window:
            first += 1
        most = max(most, last - first + 1)
    return most


def metric(page: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in page.splitlines() if line.startswith(name))


def kernel_drops(page: str) -> int:
    """Queries the kernel dropped at the sidecar's listeners, their receive buffers full: on a
    loaded machine the sidecar can read a 5,000-a-second burst more slowly than it comes (a
    loaded CI run saw 363 of the 500 names upstream), and a client never hears of those."""
    return int(metric(page, 'dns_sidecar_dropped_total{reason="kernel"}'))


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[BridgeLab]:
    why = _netns_usable()
    if why is not None:
        pytest.skip(why)
    with BridgeLab(tmp_path) as built:
        yield built


def test_bridge_containers_resolve_through_the_daemon_and_a_cold_burst_stays_in_budget(
    lab: BridgeLab,
) -> None:
    lab.start_sidecar(BUDGET)
    for ns in lab.containers:
        dig = lab.in_ns(ns, "dig", f"@{BRIDGE}", f"{ns}.example", "A", "+tries=1", "+time=2")
        assert "status: NOERROR" in dig.stdout and "192.0.2.1" in dig.stdout, dig.stdout
    time.sleep(0.5)  # the bucket full again
    results = lab.burst()
    page = lab.metrics()
    seen = lab.upstream.queries()
    rcodes = Counter(str(rcode) for *_, rcode in results)
    first_sent = min(float(str(sent)) for _, sent, _, _ in results)
    latest = max(float(str(answered)) - first_sent for _, _, answered, _ in results if answered)
    busiest = busiest_second(seen)
    denied = metric(page, 'dns_sidecar_upstream_budget_denials_total{work="client"}')
    print(
        f"\nbudget {BUDGET}/s, {len(results)} queries from {CONTAINERS} containers: upstream saw "
        f"{len(seen)} packets, at most {busiest} in one second, dropped "
        f"{sum(r.dropped for r in seen)}; answers by rcode {dict(rcodes)}; latest answer "
        f"{latest:.3f} s after the first query; client denials {denied:.0f}"
    )
    assert not any(r.dropped for r in seen)  # nothing over the VPC resolver's limit
    assert busiest <= BUDGET * (1 + BURST_SECONDS)
    assert set(rcodes) <= {"NOERROR", "SERVFAIL", "None"}
    assert rcodes["None"] == kernel_drops(page)  # none lost but by a full receive buffer
    assert rcodes["NOERROR"] == len(seen)  # each name sent was answered, the rest denied
    assert rcodes["SERVFAIL"] == denied > 0
    assert latest < QUERY_TIMEOUT


def test_without_the_budget_the_whole_burst_goes_upstream_at_once(lab: BridgeLab) -> None:
    """The control: the burst the budget held back above came faster than the limit's
    pace, and without the budget every query of it goes upstream. How fast the upstream sees
    them is the sidecar's reading speed, printed, not asserted: its busiest quarter second held
    252-392 packets here and 216 on a slower CI machine (the bound it was held to, 1024 / 4,
    failed there)."""
    lab.start_sidecar(0)
    results = lab.burst()
    seen = lab.upstream.queries()
    lost = kernel_drops(lab.metrics())
    rcodes = Counter(str(rcode) for *_, rcode in results)
    sent = [float(str(at)) for _, at, _, _ in results]
    pace = len(sent) / max(max(sent) - min(sent), 1e-3)
    print(
        f"\nno budget: clients sent {len(sent)} queries at {pace:,.0f}/s; upstream saw "
        f"{len(seen)} packets, at most {busiest_second(seen)} in one second, "
        f"{busiest_second(seen, 0.25)} in a quarter second; answers by rcode {dict(rcodes)};"
        f" dropped by the listener's full receive buffer {lost:.0f}"
    )
    assert pace > VPC_LIMIT
    assert lost < NAMES / 2, "the sidecar read too little of the burst to show anything"
    assert len(seen) == rcodes["NOERROR"] == NAMES - lost
    assert rcodes["None"] == lost
