"""Health- and latency-aware answers for a discovery zone, end to end.

The sidecar runs in front of a real NSD serving `local.`, whose `resource-server.local` A records
are the addresses of real backends (tests/fakes/backends.py) on distinct loopback addresses:
A is dead (connections refused), B answers its health check 80 ms late, C and D answer at once.
The sidecar probes them itself; the tests look at what clients are handed:

- who comes first over hundreds of queries (A never, B rarely, C and D about equally);
- how soon an endpoint that dies stops coming first (default interval and fall: within 4 s),
  and that answers still come back, with every address, when all are dead (fail open);
- `--max-answers local=1`: one address per answer, with the same shares;
- the TTL cap of shaped answers, while other names keep the upstream's TTL;
- a glibc client (getaddrinfo, which re-sorts same-subnet IPv4 answers by common prefix) inside
  network namespaces this test creates: never handed the dead endpoint first, while without
  health checks it gets the dead one first every time.

Traffic stays on loopback, or inside the network namespaces the glibc test creates.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from sidecar.core.fast_path import SHAPED_RECHECK
from tests.fakes.backends import Backend, BackendPool
from tests.fakes.nsd import NSD_BINARY, NsdServer, free_port, loopback_host, running_nsd
from tests.integration.conftest import REPO_ROOT, Sidecar, StartSidecar, clean_env
from tests.processes import end

pytestmark = pytest.mark.integration

NAME = "resource-server.local."
OTHER_NAME = "www.example.test."
UPSTREAM_TTL = 60  # of resource-server.local in NSD
OTHER_TTL = 300  # of www.example.test in NSD
QUERIES = 400
SLOW_DELAY = 0.08  # B's added delay


def local_zone(addresses: list[str]) -> str:
    return "\n".join(
        [
            "$ORIGIN local.",
            f"$TTL {UPSTREAM_TTL}",
            "@ 30 IN SOA ns.local. hostmaster.local. 1 3600 600 86400 30",
            "@ 30 IN NS ns.local.",
            "ns 60 IN A 127.0.0.1",
            *(f"resource-server {UPSTREAM_TTL} IN A {address}" for address in addresses),
            "",
        ]
    )


OTHER_ZONE = "\n".join(
    [
        "$ORIGIN example.test.",
        f"$TTL {OTHER_TTL}",
        "@ 300 IN SOA ns.example.test. hostmaster.example.test. 1 3600 600 86400 30",
        "@ 300 IN NS ns.example.test.",
        "ns 300 IN A 127.0.0.1",
        f"www {OTHER_TTL} IN A 192.0.2.10",
        "",
    ]
)


# --- the fleet: four backends and NSD naming them ---------------------------------------------


@dataclass
class Fleet:
    backends: dict[str, Backend]  # "A".."D"
    port: int
    nsd: NsdServer
    letters: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.letters = {b.host: letter for letter, b in self.backends.items()}

    def addr(self, letter: str) -> str:
        return self.backends[letter].host

    def name(self, address: str) -> str:
        return self.letters.get(address, address)


def _start_backends(pool: BackendPool) -> tuple[dict[str, Backend], int]:
    """A (dead: nothing listens), B (+80 ms), C and D on four loopback addresses, one port."""
    hosts = [loopback_host(5) for _ in range(4)]
    for _ in range(20):
        port = free_port(hosts[0])
        started: list[Backend] = []
        try:
            for host, delay in zip(hosts[1:], (SLOW_DELAY, 0.0, 0.0), strict=True):
                started.append(pool.start(host, port, delay=delay))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            for backend in started:
                backend.die()
            continue
        dead = pool.start(hosts[0], port, alive=False)
        return dict(zip("ABCD", [dead, *started], strict=True)), port
    raise RuntimeError("no port free on all four backend addresses")


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with BackendPool() as pool:
        backends, port = _start_backends(pool)
        zones = {
            "local.": local_zone([b.host for b in backends.values()]),
            "example.test.": OTHER_ZONE,
        }
        with running_nsd(zones, tmp_path / "nsd") as nsd:
            yield Fleet(backends, port, nsd)


# --- helpers ----------------------------------------------------------------------------------


@dataclass
class Discovery:
    sc: Sidecar
    metrics: tuple[str, int]


def start_discovery(
    sidecar: StartSidecar, fleet: Fleet, *extra: str, check: str = "http"
) -> Discovery:
    """A sidecar forwarding everything to the fleet's NSD, with `local` a discovery zone."""
    mhost = loopback_host(6)
    mport = free_port(mhost)
    spec = f"http:{fleet.port}/health" if check == "http" else f"tcp:{fleet.port}"
    sc = sidecar(
        "--upstream",
        fleet.nsd.address,
        "--zone",
        f"local={fleet.nsd.address}",
        "--health-check",
        f"local={spec}",
        "--metrics-listen",
        f"{mhost}:{mport}",
        *extra,
    )
    return Discovery(sc, (mhost, mport))


def ask(sc: Sidecar, name: str = NAME, rtype: str = "A") -> dns.message.Message:
    """One UDP query with a fresh random ID (dnspython checks ID and question of the reply)."""
    query = dns.message.make_query(name, dns.rdatatype.from_text(rtype))
    return dns.query.udp(query, sc.addr, port=sc.port, timeout=2.0)


def addresses(reply: dns.message.Message) -> list[str]:
    """The A records of the answer, in the order they came."""
    return [rd.address for rrset in reply.answer if rrset.rdtype == dns.rdatatype.A for rd in rrset]


def answer_ttls(reply: dns.message.Message) -> set[int]:
    return {rrset.ttl for rrset in reply.answer}


def debug_endpoints(metrics: tuple[str, int]) -> dict[str, Any]:
    """GET /debug/endpoints (http.client: no proxy settings can send this elsewhere)."""
    conn = http.client.HTTPConnection(metrics[0], metrics[1], timeout=2.0)
    try:
        conn.request("GET", "/debug/endpoints")
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, f"/debug/endpoints answered {response.status}: {body!r}"
        table: dict[str, Any] = json.loads(body)
        return table
    finally:
        conn.close()


def endpoint_rows(table: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["address"]: row for row in table["endpoints"] if row["zone"] == "local"}


def wait_endpoints(
    d: Discovery,
    predicate: Callable[[dict[str, dict[str, Any]]], bool],
    what: str,
    timeout: float = 10.0,
) -> dict[str, dict[str, Any]]:
    """Poll /debug/endpoints until `predicate(rows by address)` holds; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    rows: dict[str, dict[str, Any]] = {}
    while True:
        rows = endpoint_rows(debug_endpoints(d.metrics))
        if predicate(rows):
            return rows
        if time.monotonic() > deadline:
            pytest.fail(
                f"/debug/endpoints: not {what} after {timeout}s: {json.dumps(rows, indent=1)}\n"
                + d.sc.stderr_text()
            )
        time.sleep(0.05)


def warm_up(d: Discovery, fleet: Fleet) -> dict[str, dict[str, Any]]:
    """One query makes the four addresses endpoints; wait until each has been probed, and
    check that the probes saw what the backends are (A dead, B slow, C and D fast)."""
    reply = ask(d.sc)
    assert reply.rcode() == dns.rcode.NOERROR, reply
    every = [fleet.addr(letter) for letter in "ABCD"]
    rows = wait_endpoints(
        d,
        lambda rows: all(
            a in rows and rows[a]["last_probe_ago_s"] is not None and rows[a]["health"] != "unknown"
            for a in every
        ),
        "all four probed",
    )
    health = {fleet.name(a): rows[a]["health"] for a in every}
    assert health == {"A": "unhealthy", "B": "healthy", "C": "healthy", "D": "healthy"}, rows
    slow = rows[fleet.addr("B")]["latency_ms"]
    assert slow is not None and slow >= SLOW_DELAY * 1000, rows
    return rows


def latency_note(
    before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]], fleet: Fleet
) -> str:
    """Smoothed probe latencies (ms) of B, C, D before and after the queries."""
    return "latency ms before -> after: " + ", ".join(
        f"{letter}={before[a]['latency_ms']}->{after[a]['latency_ms']}"
        for letter in "BCD"
        for a in [fleet.addr(letter)]
    )


def first_shares(d: Discovery, fleet: Fleet, expect_len: int) -> Counter[str]:
    """QUERIES queries; checks every answer (NOERROR, A left out, `expect_len` addresses of
    B, C, D, no repeats) and counts who came first."""
    firsts: Counter[str] = Counter()
    bad: list[str] = []
    live = {fleet.addr(letter) for letter in "BCD"}
    for _ in range(QUERIES):
        reply = ask(d.sc)
        got = addresses(reply)
        if (
            reply.rcode() != dns.rcode.NOERROR
            or len(got) != expect_len
            or len(set(got)) != len(got)
            or not set(got) <= live
        ):
            bad.append(f"{dns.rcode.to_text(reply.rcode())} {[fleet.name(a) for a in got]}")
        if got:
            firsts[fleet.name(got[0])] += 1
    assert not bad, f"{len(bad)} of {QUERIES} answers wrong, e.g. {bad[:5]}"
    return firsts


def assert_shares(firsts: Counter[str], note: str) -> None:
    shares = {letter: firsts[letter] / QUERIES for letter in "ABCD"}
    note = f"first-place shares over {QUERIES} queries: {shares}; {note}"
    assert firsts["A"] == 0, note
    assert shares["B"] <= 0.10, note
    assert shares["C"] >= 0.25, note
    assert shares["D"] >= 0.25, note


# --- 1. shares of first place -----------------------------------------------------------------


def test_dead_never_first_slow_rarely_fast_ones_share(sidecar: StartSidecar, fleet: Fleet) -> None:
    d = start_discovery(sidecar, fleet, "--endpoint-probe-interval", "0.5")
    rows = warm_up(d, fleet)
    # full answers: A left out, B, C and D each present once
    firsts = first_shares(d, fleet, expect_len=3)
    note = latency_note(rows, endpoint_rows(debug_endpoints(d.metrics)), fleet)
    print(f"\n[shares, all answers] {dict(firsts)} of {QUERIES}; {note}")
    assert_shares(firsts, note)


# --- 2. a death is followed within 4 s; all dead fails open -----------------------------------


def test_endpoint_that_dies_is_not_first_after_4s_and_all_dead_fails_open(
    sidecar: StartSidecar, fleet: Fleet
) -> None:
    d = start_discovery(sidecar, fleet)  # default interval 1 s, fall 2
    warm_up(d, fleet)
    c = fleet.addr("C")
    before = [addresses(ask(d.sc))[0] for _ in range(50)]
    assert c in before, f"C never first before its death: {Counter(map(fleet.name, before))}"

    died = time.monotonic()
    fleet.backends["C"].die()
    samples: list[tuple[float, str, list[str]]] = []  # (sent after death, rcode, addresses)
    tick = died
    while (now := time.monotonic()) < died + 5.5:
        reply = ask(d.sc)
        samples.append((now - died, dns.rcode.to_text(reply.rcode()), addresses(reply)))
        tick += 0.02
        time.sleep(max(0.0, tick - time.monotonic()))

    c_first = [t for t, _rc, got in samples if got and got[0] == c]
    c_present = [t for t, _rc, got in samples if c in got]
    late = [(round(t, 3), [fleet.name(a) for a in got]) for t, _rc, got in samples if t > 4.0]
    late_c_first = [s for s in late if s[1] and s[1][0] == "C"]
    late_c_present = [s for s in late if "C" in s[1]]
    print(
        f"\n[death of C] {len(samples)} queries over 5.5 s; C last first at "
        f"{max(c_first, default=None)} s, last present at {max(c_present, default=None)} s "
        "after its death"
    )
    failed = [s for s in samples if s[1] != "NOERROR"]
    assert not failed, failed[:5]
    assert len(late) >= 20, f"too few queries after 4 s to judge: {len(late)}"
    assert not late_c_first, f"C first {len(late_c_first)} times after 4 s: {late_c_first[:5]}"
    assert not late_c_present, f"C still in answers after 4 s: {late_c_present[:5]}"

    # every endpoint dead: fail open, every address comes back
    fleet.backends["B"].die()
    fleet.backends["D"].die()
    everyone = sorted(fleet.addr(letter) for letter in "ABCD")
    wait_endpoints(
        d,
        lambda rows: all(rows.get(a, {}).get("health") == "unhealthy" for a in everyone),
        "all four unhealthy",
    )
    # A fast-path row of a shaped answer looks at endpoint health every SHAPED_RECHECK seconds
    # (core/fast_path.py): an answer drawn before the last demotion may be served that long.
    time.sleep(SHAPED_RECHECK)
    for _ in range(20):
        reply = ask(d.sc)
        assert reply.rcode() == dns.rcode.NOERROR, reply
        assert sorted(addresses(reply)) == everyone, [fleet.name(a) for a in addresses(reply)]


def test_an_endpoint_answering_503_leaves_the_answers_within_one_probe_interval(
    sidecar: StartSidecar, fleet: Fleet
) -> None:
    """Draining: a definite "no" from the health check (an HTTP 503, a refused connection)
    demotes at once, not after `fall` (2) failures in a row as a timeout does."""
    d = start_discovery(sidecar, fleet)  # default interval 1 s (+-20%), fall 2
    warm_up(d, fleet)
    c = fleet.addr("C")
    assert any(c in addresses(ask(d.sc)) for _ in range(20))
    drained = time.monotonic()
    fleet.backends["C"].status = 503
    last_seen = 0.0
    while (now := time.monotonic()) < drained + 3.0:
        if c in addresses(ask(d.sc)):
            last_seen = now - drained
        time.sleep(0.02)
    print(f"\n[503 from C] last in an answer {last_seen:.2f} s after it began to answer 503")
    assert last_seen <= 1.2 + 0.5  # one jittered interval, a probe and the redraw


# --- 3. one answer per response -----------------------------------------------------------------


def test_max_answers_one_gives_one_address_with_the_same_shares(
    sidecar: StartSidecar, fleet: Fleet
) -> None:
    d = start_discovery(
        sidecar, fleet, "--max-answers", "local=1", "--endpoint-probe-interval", "0.5"
    )
    rows = warm_up(d, fleet)
    firsts = first_shares(d, fleet, expect_len=1)
    note = latency_note(rows, endpoint_rows(debug_endpoints(d.metrics)), fleet)
    print(f"\n[shares, max-answers 1] {dict(firsts)} of {QUERIES}; {note}")
    assert_shares(firsts, note)


# --- 4. TTLs ----------------------------------------------------------------------------------


def test_shaped_answers_ttl_capped_other_names_keep_upstream_ttl(
    sidecar: StartSidecar, fleet: Fleet
) -> None:
    direct = dns.query.udp(
        dns.message.make_query(NAME, dns.rdatatype.A), fleet.nsd.host, port=fleet.nsd.port
    )
    assert answer_ttls(direct) == {UPSTREAM_TTL}, direct  # the cap has something to cap

    # a TCP connect check this time (A refuses connections: it must be left out too)
    d = start_discovery(sidecar, fleet, "--endpoint-probe-interval", "0.5", check="tcp")
    first = ask(d.sc)  # the miss, before any probe
    assert addresses(first), first
    assert max(answer_ttls(first)) <= 5, first
    wait_endpoints(
        d,
        lambda rows: rows.get(fleet.addr("A"), {}).get("health") == "unhealthy",
        "A unhealthy",
    )
    seen_ttls: set[int] = set()
    for _ in range(20):
        reply = ask(d.sc)
        assert reply.rcode() == dns.rcode.NOERROR, reply
        assert fleet.addr("A") not in addresses(reply), reply
        seen_ttls |= answer_ttls(reply)
    assert seen_ttls and max(seen_ttls) <= 5 and min(seen_ttls) >= 1, seen_ttls

    other = [ask(d.sc, OTHER_NAME) for _ in range(3)]
    other_ttls = set().union(*(answer_ttls(r) for r in other))
    print(f"\n[ttl] shaped {sorted(seen_ttls)}, other name {sorted(other_ttls)}")
    assert all(addresses(r) == ["192.0.2.10"] for r in other), other
    assert other_ttls and min(other_ttls) >= OTHER_TTL - 5 and max(other_ttls) <= OTHER_TTL, (
        other_ttls
    )


# --- 5. a glibc client in network namespaces --------------------------------------------------

CLIENT_ADDR = "10.77.0.10"  # the client's namespace, 10.77.0.10/24
DEAD_ADDR = "10.77.0.11"  # glibc's rule 9 puts the longest common prefix first: this one
LIVE_ADDRS = ["10.77.0.130", "10.77.0.131", "10.77.0.20"]
NS_ORDER = ["10.77.0.130", "10.77.0.131", "10.77.0.20", DEAD_ADDR]  # the dead one last in DNS
BACKEND_PORT = 8080
NSD_PORT = 5300
METRICS = "127.0.0.1:9153"


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def _check(*argv: str) -> None:
    proc = _run(*argv)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")


def _netns_env() -> dict[str, str]:
    """clean_env(), and the repository on the path (the sidecar runs in another namespace)."""
    return {**clean_env(), "PYTHONPATH": str(REPO_ROOT)}


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    end(proc, sig)
    if proc.stdout is not None:
        proc.stdout.close()


class GlibcLab:
    """Two network namespaces joined by a veth pair (nothing else is reachable from them):

    - `client` (10.77.0.10/24 on its veth, lo up): NSD on 127.0.0.1:5300 serving `local.`,
      the sidecar on 127.0.0.1:53 (resolv.conf of the namespace points there), and the
      getaddrinfo client;
    - `backends` (10.77.0.11, .20, .130, .131 /24 on its veth): backends on .20, .130 and .131
      port 8080; nothing listens on .11, so connecting there is refused.

    So for the client the backends are in its own /24, where glibc re-sorts IPv4 answers by
    longest common prefix (10.77.0.11 first), and the sidecar probes them over the veth.
    """

    def __init__(self, workdir: Path, zone: str | None = None) -> None:
        self.zone = zone if zone is not None else local_zone(NS_ORDER)
        tag = f"{os.getpid() % 100000}"
        self.ns_client = f"dsc-gai-c{tag}"
        self.ns_backends = f"dsc-gai-b{tag}"
        self.workdir = workdir
        self.netns_dir = Path("/etc/netns")
        self.netns_dir_created = False
        self.resolv_dir = self.netns_dir / self.ns_client
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def exec_argv(self, ns: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def popen(self, ns: str, name: str, *argv: str, stdout: int | None = None) -> Any:
        log = (self.workdir / f"{name}.log").open("wb")
        with log:
            proc = subprocess.Popen(
                self.exec_argv(ns, *argv),
                stdin=subprocess.DEVNULL,
                stdout=stdout if stdout is not None else log,
                stderr=log,
                cwd=REPO_ROOT,
                env=_netns_env(),
            )
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # --- set up and tear down ------------------------------------------------------------------

    def __enter__(self) -> GlibcLab:
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def _setup(self) -> None:
        c, b = self.ns_client, self.ns_backends
        for ns in (c, b):
            _check("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            _check("ip", "-n", ns, "link", "set", "lo", "up")
        _check("ip", "-n", c, "link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns", b)
        _check("ip", "-n", c, "addr", "add", f"{CLIENT_ADDR}/24", "dev", "v0")
        for address in [DEAD_ADDR, *LIVE_ADDRS]:
            _check("ip", "-n", b, "addr", "add", f"{address}/24", "dev", "v1")
        _check("ip", "-n", c, "link", "set", "v0", "up")
        _check("ip", "-n", b, "link", "set", "v1", "up")

        if not self.netns_dir.exists():
            self.netns_dir.mkdir()
            self.netns_dir_created = True
        self.resolv_dir.mkdir(exist_ok=True)
        (self.resolv_dir / "resolv.conf").write_text(
            "nameserver 127.0.0.1\noptions timeout:1 attempts:2\n"
        )

        backends = self.popen(
            b,
            "backends",
            sys.executable,
            "-m",
            "tests.fakes.backends",
            "--port",
            str(BACKEND_PORT),
            *LIVE_ADDRS,
            stdout=subprocess.PIPE,
        )
        assert backends.stdout is not None
        line = backends.stdout.readline()  # "ready", or EOF if it failed
        if line.strip() != b"ready":
            raise RuntimeError(f"backends did not start: {line!r} {self.log('backends')}")

        nsd_dir = self.workdir / "nsd"
        nsd_dir.mkdir()
        conf = _nsd_config(nsd_dir, {"local.": self.zone})
        self.popen(c, "nsd", NSD_BINARY, "-d", "-c", str(conf))
        deadline = time.monotonic() + 10
        while True:
            dig = _run(
                *self.exec_argv(c, "dig", "@127.0.0.1", "-p", str(NSD_PORT), "local.", "SOA"),
                "+tries=1",
                "+time=1",
            )
            if "status: NOERROR" in dig.stdout:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"nsd in {c} did not answer: {dig.stdout} {self.log('nsd')}")
            time.sleep(0.05)

    def close(self) -> None:
        for proc in reversed(self.procs):
            _stop(proc)
        self.procs.clear()
        for ns in self.namespaces:
            _run("ip", "netns", "del", ns)
        self.namespaces.clear()
        with contextlib.suppress(FileNotFoundError):
            (self.resolv_dir / "resolv.conf").unlink()
        with contextlib.suppress(FileNotFoundError, OSError):
            self.resolv_dir.rmdir()
        if self.netns_dir_created:
            with contextlib.suppress(OSError):
                self.netns_dir.rmdir()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- one round: a sidecar and 100 getaddrinfo calls ----------------------------------------

    def round(
        self, name: str, *sidecar_args: str, probed: bool, count: int = 100
    ) -> list[list[str]]:
        """Start a sidecar in the client namespace with `sidecar_args`, run the glibc client
        there (waiting for the probes when `probed`), stop the sidecar; the address lists
        getaddrinfo returned, one per call. Each call must have reached the sidecar."""
        sc = self.popen(
            self.ns_client,
            name,
            sys.executable,
            "-m",
            "sidecar",
            "--listen",
            "127.0.0.1:53",
            "--upstream",
            f"127.0.0.1:{NSD_PORT}",
            "--zone",
            f"local=127.0.0.1:{NSD_PORT}",
            "--metrics-listen",
            METRICS,
            "--log-format",
            "text",
            "--drain-seconds",
            "0",
            *sidecar_args,
        )
        try:
            argv = [
                sys.executable,
                "-m",
                "tests.fakes.gai_client",
                "--dns",
                "127.0.0.1:53",
                "--name",
                NAME.rstrip("."),
                "--count",
                str(count),
                "--metrics",
                METRICS,
            ]
            if probed:
                argv += [f"--expect={a}" for a in NS_ORDER]
            client = subprocess.run(
                self.exec_argv(self.ns_client, *argv),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                cwd=REPO_ROOT,
                env=_netns_env(),
            )
            if client.returncode != 0 or sc.poll() is not None:
                pytest.fail(
                    f"glibc client failed ({client.returncode}): {client.stderr}\n"
                    f"sidecar ({sc.poll()}): {self.log(name)}"
                )
            result = json.loads(client.stdout)
            if probed:
                health = {e["address"]: e["health"] for e in result["endpoints"]["endpoints"]}
                assert health == {DEAD_ADDR: "unhealthy"} | dict.fromkeys(LIVE_ADDRS, "healthy"), (
                    result["endpoints"]
                )
            # glibc keeps no cache: every call was a query of its own to the sidecar
            assert result["queries"] >= count, result["queries"]
            orders: list[list[str]] = result["orders"]
            return orders
        finally:
            _stop(sc)
            self.procs.remove(sc)


def _nsd_config(workdir: Path, zones: dict[str, str]) -> Path:
    """A foreground NSD on 127.0.0.1:NSD_PORT of the namespace it runs in."""
    lines = [
        "server:",
        f'  ip-address: "127.0.0.1@{NSD_PORT}"',
        f"  port: {NSD_PORT}",
        "  do-ip6: no",
        '  username: ""',
        '  chroot: ""',
        '  database: ""',
        f'  zonesdir: "{workdir}"',
        f'  pidfile: "{workdir / "nsd.pid"}"',
        f'  xfrdfile: "{workdir / "xfrd.state"}"',
        f'  xfrdir: "{workdir}"',
        f'  zonelistfile: "{workdir / "zone.list"}"',
        f'  logfile: "{workdir / "nsd.log"}"',
        "  verbosity: 0",
        "  server-count: 1",
        "  rrl-ratelimit: 0",
        "remote-control:",
        "  control-enable: no",
    ]
    for i, (origin, text) in enumerate(zones.items()):
        (workdir / f"zone{i}.zone").write_text(text)
        lines += ["zone:", f'  name: "{origin}"', f'  zonefile: "zone{i}.zone"']
    conf = workdir / "nsd.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def srv_only_zone(addresses: list[str], port: int) -> str:
    """`resource-server.local` as ECS registers a host-mode service: SRV records only, each
    target with an A record of its own."""
    lines = ["$ORIGIN local.", f"$TTL {UPSTREAM_TTL}"]
    lines += ["@ 30 IN SOA ns.local. hostmaster.local. 1 3600 600 86400 30"]
    lines += ["@ 30 IN NS ns.local.", "ns 60 IN A 127.0.0.1"]
    for i, address in enumerate(addresses):
        lines += [f"resource-server IN SRV 1 1 {port} task{i}.resource-server.local."]
        lines += [f"task{i}.resource-server IN A {address}"]
    return "\n".join(lines) + "\n"


def test_synthesize_a_gives_glibc_only_the_live_srv_targets(tmp_path: Path) -> None:
    why = _netns_usable()
    if why is not None:
        pytest.skip(why)
    with GlibcLab(tmp_path, srv_only_zone(NS_ORDER, BACKEND_PORT)) as lab:
        synthesized = lab.round(
            "sidecar-synthesize",
            "--health-check",
            f"local=http:{BACKEND_PORT}/health",
            "--synthesize-a",
            "local=true",
            "--endpoint-probe-interval",
            "0.5",
            probed=True,
        )
    print(f"\n[synthesize_a] glibc firsts {dict(Counter(o[0] for o in synthesized if o))}")
    assert len(synthesized) == 100
    assert all(sorted(o) == sorted(LIVE_ADDRS) for o in synthesized), synthesized[:3]


def _netns_usable() -> str | None:
    """None when network namespaces can be used here, else why not."""
    if os.geteuid() != 0:
        return "needs root (ip netns, /etc/netns)"
    if platform.libc_ver()[0] != "glibc":
        return "needs a glibc Python (the point is glibc's getaddrinfo)"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    name = f"dsc-try{os.getpid() % 100000}"
    added = _run("ip", "netns", "add", name)
    if added.returncode != 0:
        return f"`ip netns add` does not work here: {added.stderr.strip()}"
    try:
        veth = _run("ip", "-n", name, "link", "add", "t0", "type", "veth", "peer", "name", "t1")
        if veth.returncode != 0:
            return f"veth pairs cannot be created here: {veth.stderr.strip()}"
    finally:
        _run("ip", "netns", "del", name)
    return None


def test_glibc_client_is_never_handed_the_dead_endpoint_first(tmp_path: Path) -> None:
    why = _netns_usable()
    if why is not None:
        pytest.skip(why)
    with GlibcLab(tmp_path) as lab:
        # control: no health checks; the sidecar passes NSD's order (dead one last) through
        # and glibc's rule 9 puts the dead one first anyway
        control = lab.round("sidecar-plain", probed=False)
        checked = lab.round(
            "sidecar-checked",
            "--health-check",
            f"local=http:{BACKEND_PORT}/health",
            "--endpoint-probe-interval",
            "0.5",
            probed=True,
        )
        single = lab.round(
            "sidecar-single",
            "--health-check",
            f"local=http:{BACKEND_PORT}/health",
            "--max-answers",
            "local=1",
            "--endpoint-probe-interval",
            "0.5",
            probed=True,
        )
    print(
        f"\n[glibc] control firsts {dict(Counter(o[0] for o in control))}; "
        f"health-checked firsts {dict(Counter(o[0] for o in checked))}; "
        f"max-answers 1 firsts {dict(Counter(o[0] for o in single))}"
    )
    assert len(control) == len(checked) == len(single) == 100
    # the control proves the test can fail: glibc re-sorts the dead one to the front
    assert all(sorted(o) == sorted(NS_ORDER) for o in control), control[:3]
    assert all(o[0] == DEAD_ADDR for o in control), Counter(o[0] for o in control)
    # with health checks the dead one is left out, so glibc cannot put it first
    assert all(o and o[0] != DEAD_ADDR for o in checked), Counter(o[0] for o in checked)
    assert all(sorted(o) == sorted(LIVE_ADDRS) for o in checked), checked[:3]
    # one address per answer: nothing left to re-sort, so first place is spread again
    assert all(len(o) == 1 and o[0] in LIVE_ADDRS for o in single), single[:3]
    assert len({o[0] for o in single}) >= 2, Counter(o[0] for o in single)
