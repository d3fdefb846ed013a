"""Fixtures of the integration tests: real NSD upstreams, the scripted upstream, the sidecar
as a subprocess, and dig as a real client. Every address is on loopback."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dns.message
import dns.rdataclass
import dns.rdatatype
import pytest

from tests.fakes.nsd import NsdServer, free_port, loopback_host, running_nsd
from tests.fakes.scripted_upstream import Answer, ScriptedUpstream
from tests.processes import end, end_all

REPO_ROOT = Path(__file__).resolve().parents[2]

# The sidecar fixture asks `id.server. CH TXT` to learn that the sidecar is serving: the sidecar
# answers CHAOS questions itself, so the readiness check leaves the upstreams' query logs alone.
# Should one reach the scripted upstream anyway, it is answered at once whatever the default.
READY_NAME = "id.server."

BIG_COUNT = 40

LOCAL_ZONE = "\n".join(
    [
        "$ORIGIN local.",
        "$TTL 60",
        "@ 30 IN SOA ns.local. hostmaster.local. 1 3600 600 86400 30",
        "@ 30 IN NS ns.local.",
        "ns 60 IN A 127.0.0.1",
        "resource-server 60 IN A 10.0.0.1",
        "resource-server 60 IN A 10.0.0.2",
        "resource-server 60 IN A 10.0.0.3",
        "resource-server 60 IN AAAA 2001:db8::1",
        'resource-server 60 IN TXT "resource server of the local zone"',
        "short 5 IN A 10.0.0.5",
        *(f"big 60 IN A 10.0.1.{i}" for i in range(1, BIG_COUNT + 1)),
        "",
    ]
)

DEFAULT_ZONE = "\n".join(
    [
        "$ORIGIN example.test.",
        "$TTL 300",
        "@ 300 IN SOA ns.example.test. hostmaster.example.test. 1 3600 600 86400 30",
        "@ 300 IN NS ns.example.test.",
        "ns 300 IN A 127.0.0.1",
        "www 300 IN A 192.0.2.10",
        "www 300 IN AAAA 2001:db8::10",
        'www 300 IN TXT "default upstream"',
        "",
    ]
)


# --- upstreams --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def nsd_local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NsdServer]:
    """NSD serving `local.` (see LOCAL_ZONE): SOA TTL and minimum 30, a 40-A-record `big.`"""
    with running_nsd({"local.": LOCAL_ZONE}, tmp_path_factory.mktemp("nsd-local")) as server:
        yield server


@pytest.fixture(scope="session")
def nsd_default(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NsdServer]:
    """NSD serving `example.test.` (see DEFAULT_ZONE): the sidecar's default upstream."""
    with running_nsd({"example.test.": DEFAULT_ZONE}, tmp_path_factory.mktemp("nsd-default")) as s:
        yield s


@pytest.fixture
def scripted_upstream() -> Iterator[ScriptedUpstream]:
    """A ScriptedUpstream on its own loopback address; answers `Answer()` by default."""
    with ScriptedUpstream(host=loopback_host(3)) as upstream:
        upstream.set(READY_NAME, Answer(("TXT ready",), ttl=0))
        yield upstream


# --- the sidecar ------------------------------------------------------------------------------


@dataclass
class Sidecar:
    """A sidecar process started by the `sidecar` fixture."""

    addr: str
    port: int
    proc: subprocess.Popen[bytes]
    stderr_path: Path
    args: list[str] = field(default_factory=list)

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send `sig` and wait for the exit; returns the exit code (fails if it hangs)."""
        if not end(self.proc, sig, timeout):
            pytest.fail(
                f"sidecar did not exit within {timeout}s of signal {sig}:\n" + self.stderr_text()
            )
        return self.proc.returncode


def clean_env() -> dict[str, str]:
    """The environment without anything that could point the sidecar elsewhere."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("DNS_SIDECAR_") and k != "ECS_CONTAINER_METADATA_URI_V4"
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(IMAGE_PYTHON_ENV)
    return env


# The sidecar runs here as the image runs it: with the Dockerfile's PYTHONOPTIMIZE (no
# docstrings, no asserts), so that nothing it serves with depends on either.
IMAGE_PYTHON_ENV = dict(
    re.findall(r"\b(PYTHONOPTIMIZE)=(\S+)", (REPO_ROOT / "Dockerfile").read_text())
)


def _probe(sc: Sidecar, query: bytes) -> bool:
    """True when the sidecar's UDP port sends back a reply to `query`.

    A connected socket learns at once (ICMP port unreachable) that nothing listens yet.
    """
    family = socket.AF_INET6 if ":" in sc.addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        try:
            sock.connect((sc.addr, sc.port))
            sock.send(query)
            reply = sock.recv(65535)
        except OSError:  # refused (not bound yet) or timed out
            return False
    return reply[:2] == query[:2]


def _wait_ready(sc: Sidecar, timeout: float) -> None:
    query = dns.message.make_query(READY_NAME, dns.rdatatype.TXT, dns.rdataclass.CH).to_wire()
    deadline = time.monotonic() + timeout
    while True:
        if sc.proc.poll() is not None:
            pytest.fail(
                f"sidecar {' '.join(sc.args)} exited with {sc.proc.returncode} before serving:\n"
                + sc.stderr_text()
            )
        if _probe(sc, query):
            return  # any reply at all: the listener is up
        if time.monotonic() > deadline:
            sc.stop(signal.SIGKILL)
            pytest.fail(f"sidecar did not answer on {sc.addr}:{sc.port}:\n" + sc.stderr_text())
        time.sleep(0.02)


StartSidecar = Callable[..., Sidecar]


class SidecarFactory:
    """Starts sidecars (see the `sidecar` fixture) and stops them all in close()."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[Sidecar] = []

    def __call__(self, *args: str, host: str | None = None, ready_timeout: float = 15.0) -> Sidecar:
        if "--upstream" not in args:
            raise ValueError("give --upstream: the sidecar must not use the machine's resolver")
        host = host or loopback_host(1)
        port = free_port(host)
        bracketed = f"[{host}]" if ":" in host else host
        # No drain window at SIGTERM unless the test asks for one: a stop at teardown has
        # nothing in flight, and the default window (2 s) would only be waited out.
        defaults: list[str] = [] if "--drain-seconds" in args else ["--drain-seconds", "0"]
        if "--metrics-listen" not in args:
            metrics_port = free_port(host)
            while metrics_port == port:
                metrics_port = free_port(host)
            defaults += ["--metrics-listen", f"{bracketed}:{metrics_port}"]
        argv = [
            sys.executable,
            "-m",
            "sidecar",
            "--listen",
            f"{bracketed}:{port}",
            "--log-format",
            "text",
            *defaults,
            *args,
        ]
        stderr_path = self.workdir / f"sidecar-{len(self.started)}.stderr"
        with stderr_path.open("wb") as err:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                cwd=REPO_ROOT,
                env=clean_env(),
            )
        sc = Sidecar(host, port, proc, stderr_path, argv)
        self.started.append(sc)
        _wait_ready(sc, ready_timeout)
        return sc

    def close(self) -> None:
        """SIGTERM to every sidecar still running; fails if one does not exit."""
        killed = end_all([sc.proc for sc in self.started], signal.SIGTERM)
        hung = [sc for sc in self.started if sc.proc in killed]
        assert not hung, "sidecar did not exit on SIGTERM:\n" + "\n".join(
            sc.stderr_text() for sc in hung
        )


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[StartSidecar]:
    """A factory: sidecar("--upstream", up.address, ...) starts `python -m sidecar` on a fresh
    loopback address (or `host`, e.g. "::1") and port, waits until it answers, and stops it
    (SIGTERM) at teardown, failing if it does not exit.

    `--upstream` must be given: without it the sidecar would read /etc/resolv.conf, and the
    tests never talk to anything off loopback. Unless given, `--metrics-listen` on a free port
    of the same host is added, so that sidecars can run side by side, and `--drain-seconds 0`
    (pass `--drain-seconds` to test the drain window).
    """
    factory = SidecarFactory(tmp_path)
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def module_sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartSidecar]:
    """The `sidecar` factory for sidecars shared by the tests of one module (state and cache
    carry over from test to test: use it only where that cannot matter)."""
    factory = SidecarFactory(tmp_path_factory.mktemp("sidecars"))
    yield factory
    factory.close()


# --- dig --------------------------------------------------------------------------------------


@dataclass
class DigRecord:
    name: str
    ttl: int
    rclass: str
    rtype: str
    rdata: str


@dataclass
class DigResult:
    """What dig printed, parsed: status, header flags, question name, sections, EDNS size."""

    returncode: int
    output: str
    status: str | None = None
    id: int | None = None
    flags: set[str] = field(default_factory=set)
    question: str | None = None
    answer: list[DigRecord] = field(default_factory=list)
    authority: list[DigRecord] = field(default_factory=list)
    edns_udp: int | None = None

    def rdatas(self, rtype: str | None = None) -> list[str]:
        return [r.rdata for r in self.answer if rtype is None or r.rtype == rtype]


_HEADER = re.compile(r"->>HEADER<<- opcode: (\w+), status: (\w+), id: (\d+)")
_FLAGS = re.compile(r";; flags:([^;]*);")
_EDNS = re.compile(r"; EDNS: version: \d+, flags:[^;]*; udp: (\d+)")


def _parse_dig(returncode: int, output: str) -> DigResult:
    result = DigResult(returncode, output)
    section: str | None = None
    for line in output.splitlines():
        if m := _HEADER.search(line):
            result.status, result.id = m.group(2), int(m.group(3))
        elif m := _FLAGS.match(line):
            result.flags = set(m.group(1).split())
        elif m := _EDNS.match(line):
            result.edns_udp = int(m.group(1))
        elif line.startswith(";; ") and line.endswith(" SECTION:"):
            section = line[3 : -len(" SECTION:")].lower()
        elif not line.strip():
            section = None
        elif section == "question" and line.startswith(";"):
            result.question = line[1:].split()[0]
        elif section in ("answer", "authority") and not line.startswith(";"):
            name, ttl, rclass, rtype, *rdata = line.split(None, 4)
            record = DigRecord(name, int(ttl), rclass, rtype, rdata[0] if rdata else "")
            (result.answer if section == "answer" else result.authority).append(record)
    return result


Dig = Callable[..., DigResult]


def run_dig(addr: str, port: int, name: str, rtype: str = "A", *options: str) -> DigResult:
    """dig @addr -p port name rtype +tries=1 +time=2 *options, parsed."""
    argv = ["dig", f"@{addr}", "-p", str(port), name, rtype, "+tries=1", "+time=2", *options]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    return _parse_dig(proc.returncode, proc.stdout + proc.stderr)


@pytest.fixture
def dig() -> Dig:
    """dig(addr, port, name, rtype="A", *options) -> DigResult (a real client, as a process)."""
    return run_dig
