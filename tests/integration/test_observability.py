"""Observability of a running sidecar: /metrics scraped over HTTP after real traffic (values move
as they should), the exposition linted by `promtool check metrics`, /health and /ready (including
the drain after SIGTERM), and the files users build on the metrics: the alert rules
(`promtool check rules`, `promtool test rules`) and the Grafana dashboard, whose metric names
must all exist in a real scrape.

Every address is on loopback: the sidecar, its upstreams (NSD, the scripted upstream) and its
metrics listener.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from sidecar import __version__
from tests.fakes.nsd import NsdServer
from tests.fakes.scripted_upstream import Answer, ScriptedUpstream, Silent
from tests.integration.conftest import REPO_ROOT, Sidecar, StartSidecar

pytestmark = pytest.mark.integration

RULES = REPO_ROOT / "config" / "prometheus-rules.yml"
DASHBOARD = REPO_ROOT / "config" / "grafana-dashboard.json"

# The families the issue fixes, as the Prometheus text format names them on their `# TYPE`
# line (counters with `_total`), with their type and label names.
FAMILIES: dict[str, tuple[str, frozenset[str]]] = {
    "dns_sidecar_requests_total": ("counter", frozenset({"proto", "type"})),
    "dns_sidecar_responses_total": ("counter", frozenset({"rcode", "source"})),
    "dns_sidecar_request_duration_seconds": ("histogram", frozenset({"source"})),
    "dns_sidecar_cache_hits_total": ("counter", frozenset({"type"})),
    "dns_sidecar_cache_misses_total": ("counter", frozenset()),
    "dns_sidecar_cache_entries": ("gauge", frozenset({"type"})),
    "dns_sidecar_cache_evictions_total": ("counter", frozenset()),
    "dns_sidecar_cache_prefetch_total": ("counter", frozenset()),
    "dns_sidecar_cache_served_stale_total": ("counter", frozenset()),
    "dns_sidecar_coalesced_total": ("counter", frozenset()),
    "dns_sidecar_upstream_request_duration_seconds": (
        "histogram",
        frozenset({"upstream", "rcode"}),
    ),
    "dns_sidecar_upstream_errors_total": ("counter", frozenset({"upstream", "reason"})),
    "dns_sidecar_upstream_healthy": ("gauge", frozenset({"upstream"})),
    "dns_sidecar_endpoint_healthy": ("gauge", frozenset({"zone", "address"})),
    "dns_sidecar_endpoint_latency_seconds": ("gauge", frozenset({"zone", "address"})),
    "dns_sidecar_endpoint_probes_total": ("counter", frozenset({"zone", "result"})),
    "dns_sidecar_answers_shaped_total": ("counter", frozenset({"zone", "action"})),
    "dns_sidecar_dropped_total": ("counter", frozenset({"reason"})),
    "dns_sidecar_build_info": ("gauge", frozenset({"version", "python"})),
}
# What prometheus-client's process collector exports on Linux.
PROCESS_FAMILIES: dict[str, str] = {
    "process_cpu_seconds_total": "counter",
    "process_resident_memory_bytes": "gauge",
    "process_virtual_memory_bytes": "gauge",
    "process_start_time_seconds": "gauge",
    "process_open_fds": "gauge",
    "process_max_fds": "gauge",
}
SOURCES = {"cache", "upstream", "stale", "local"}
UPSTREAM_ERROR_REASONS = {"timeout", "refused", "mismatch", "truncated", "network"}
DROP_REASONS = {"malformed", "refused", "overload", "reset", "kernel"}

# A metric name as the rules and the dashboard's queries spell it.
METRIC_NAME = re.compile(r"(?<![A-Za-z0-9_:$])((?:dns_sidecar|process)_[A-Za-z0-9_]+)")
TYPE_LINE = re.compile(r"^# TYPE (\S+) (\S+)\s*$", re.MULTILINE)

T = TypeVar("T")


# --- helpers: time, HTTP, DNS -----------------------------------------------------------------


def poll(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """Call `check` until it returns something other than None/False; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# No proxy, ever: the request goes straight to the loopback address it names.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class HttpReply:
    status: int
    body: str
    content_type: str


def http_get(url: str, timeout: float = 3.0) -> HttpReply:
    assert re.match(r"^http://127\.\d+\.\d+\.\d+:\d+/", url), f"not a loopback URL: {url}"
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return HttpReply(
                resp.status, resp.read().decode(errors="replace"), resp.headers["Content-Type"]
            )
    except urllib.error.HTTPError as exc:
        try:
            return HttpReply(
                exc.code, exc.read().decode(errors="replace"), exc.headers["Content-Type"] or ""
            )
        finally:
            exc.close()


def ask(sc: Sidecar, name: str, rtype: str = "A", timeout: float = 3.0) -> dns.message.Message:
    query = dns.message.make_query(name, dns.rdatatype.from_text(rtype))
    return dns.query.udp(query, sc.addr, port=sc.port, timeout=timeout)


def a_records(reply: dns.message.Message) -> list[tuple[str, int]]:
    """(address, ttl) of every A record in the answer section."""
    return [
        (rdata.to_text(), rrset.ttl)
        for rrset in reply.answer
        if rrset.rdtype == dns.rdatatype.A
        for rdata in rrset
    ]


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install the Debian package `prometheus`")
    return path


def run_promtool(*args: str, stdin: str | None = None, cwd: Path | None = None) -> str:
    """Run promtool; return stdout+stderr (the caller checks the exit code through it)."""
    proc = subprocess.run(
        [promtool(), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
    )
    return f"exit {proc.returncode}\n{proc.stdout}{proc.stderr}"


# --- a scrape ---------------------------------------------------------------------------------


@dataclass
class Scrape:
    """One /metrics body, parsed by prometheus-client's parser."""

    text: str

    def __post_init__(self) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(self.text)}
        self.samples: list[Sample] = [s for f in self.families.values() for s in f.samples]

    def types(self) -> dict[str, str]:
        """Family name -> type, from the `# TYPE` lines of the raw text (empty families too)."""
        return {name: kind for name, kind in TYPE_LINE.findall(self.text)}

    def matching(self, sample_name: str, **labels: str) -> list[Sample]:
        return [
            s
            for s in self.samples
            if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, sample_name: str, **labels: str) -> float:
        """The sum of the samples called `sample_name` whose labels include `labels`."""
        return sum(s.value for s in self.matching(sample_name, **labels))

    def has(self, metric_name: str) -> bool:
        """Is `metric_name`, as a query would use it, exposed (possibly with no samples yet)?"""
        types = self.types()
        if metric_name in types:
            return True
        for suffix, kinds in (
            ("_bucket", {"histogram"}),
            ("_sum", {"histogram", "summary"}),
            ("_count", {"histogram", "summary"}),
        ):
            base = metric_name.removesuffix(suffix)
            if base != metric_name and types.get(base) in kinds:
                return True
        return False


@dataclass
class Observed:
    """A sidecar started with --metrics-listen, and its HTTP endpoints."""

    sc: Sidecar
    base: str

    def get(self, path: str) -> HttpReply:
        return http_get(self.base + path)

    def scrape(self) -> Scrape:
        reply = self.get("/metrics")
        assert reply.status == 200, f"/metrics answered {reply.status}: {reply.body[:500]}"
        return Scrape(reply.body)

    def wait_ready(self, timeout: float = 10.0) -> None:
        def ready() -> bool:
            try:
                return self.get("/ready").status == 200
            except OSError:
                return False

        deadline = time.monotonic() + timeout
        while not ready():
            if self.sc.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"{self.base}/ready did not answer 200 within {timeout}s:\n"
                    + self.sc.stderr_text()
                )
            time.sleep(0.05)


StartObserved = Callable[..., Observed]


@pytest.fixture
def observed(
    sidecar: StartSidecar, loopback: Callable[[], str], free_port: Callable[..., int]
) -> StartObserved:
    """observed(*sidecar_args) -> an Observed sidecar whose /ready already answers 200."""

    def start(*args: str) -> Observed:
        host = loopback()
        port = free_port(host)
        sc = sidecar(*args, "--metrics-listen", f"{host}:{port}")
        obs = Observed(sc, f"http://{host}:{port}")
        obs.wait_ready()
        return obs

    return start


@pytest.fixture
def local_sidecar(
    observed: StartObserved, nsd_local: NsdServer, scripted_upstream: ScriptedUpstream
) -> Observed:
    """A sidecar with the real NSD for `local.` and the scripted upstream for everything else."""
    return observed("--upstream", scripted_upstream.address, "--zone", f"local={nsd_local.address}")


def traffic(obs: Observed) -> None:
    """A little of everything that needs no fault: misses, hits, NXDOMAIN, a malformed datagram."""
    for name, rtype in [
        ("resource-server.local.", "A"),
        ("resource-server.local.", "A"),
        ("resource-server.local.", "AAAA"),
        ("missing.local.", "A"),
        ("missing.local.", "A"),
        ("www.other.test.", "A"),
    ]:
        ask(obs.sc, name, rtype)
    dns.query.tcp(
        dns.message.make_query("resource-server.local.", "TXT"),
        obs.sc.addr,
        port=obs.sc.port,
        timeout=3,
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"\x00\x01\x02", (obs.sc.addr, obs.sc.port))


# --- the acceptance scenario ------------------------------------------------------------------


def test_five_identical_queries_one_miss_four_hits(
    local_sidecar: Observed, nsd_local: NsdServer
) -> None:
    before = local_sidecar.scrape()
    for _ in range(5):
        reply = ask(local_sidecar.sc, "resource-server.local.")
        assert reply.rcode() == dns.rcode.NOERROR
        assert sorted(a for a, _ttl in a_records(reply)) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    after = local_sidecar.scrape()

    def delta(sample: str, **labels: str) -> float:
        return after.value(sample, **labels) - before.value(sample, **labels)

    # The acceptance criteria, on absolute values.
    assert after.value("dns_sidecar_requests_total") >= 5
    assert after.value("dns_sidecar_cache_hits_total") >= 4
    # And exactly what these five queries did.
    assert delta("dns_sidecar_requests_total", proto="udp", type="A") == 5
    assert delta("dns_sidecar_requests_total", proto="tcp") == 0
    assert delta("dns_sidecar_cache_misses_total") == 1
    assert delta("dns_sidecar_cache_hits_total", type="success") == 4
    assert delta("dns_sidecar_cache_hits_total", type="denial") == 0
    assert delta("dns_sidecar_responses_total", source="upstream", rcode="NOERROR") == 1
    assert delta("dns_sidecar_responses_total", source="cache", rcode="NOERROR") == 4
    assert delta("dns_sidecar_responses_total") == 5
    assert delta("dns_sidecar_request_duration_seconds_count", source="cache") == 4
    assert delta("dns_sidecar_request_duration_seconds_count", source="upstream") == 1
    assert delta("dns_sidecar_request_duration_seconds_count") == 5
    assert delta("dns_sidecar_request_duration_seconds_sum", source="cache") > 0
    assert (
        delta(
            "dns_sidecar_upstream_request_duration_seconds_count",
            upstream=nsd_local.address,
            rcode="NOERROR",
        )
        == 1
    )
    assert after.value("dns_sidecar_cache_entries", type="success") >= 1
    assert delta("dns_sidecar_cache_served_stale_total") == 0
    assert delta("dns_sidecar_upstream_errors_total") == 0


def test_negative_answers_count_as_denial_hits(local_sidecar: Observed) -> None:
    before = local_sidecar.scrape()
    for _ in range(3):
        assert ask(local_sidecar.sc, "missing.local.").rcode() == dns.rcode.NXDOMAIN
    after = local_sidecar.scrape()
    assert (
        after.value("dns_sidecar_cache_misses_total")
        - before.value("dns_sidecar_cache_misses_total")
        == 1
    )
    assert (
        after.value("dns_sidecar_cache_hits_total", type="denial")
        - before.value("dns_sidecar_cache_hits_total", type="denial")
        == 2
    )
    assert (
        after.value("dns_sidecar_responses_total", rcode="NXDOMAIN")
        - before.value("dns_sidecar_responses_total", rcode="NXDOMAIN")
        == 3
    )
    assert after.value("dns_sidecar_cache_entries", type="denial") >= 1


def test_every_family_is_present_with_its_type_and_labels(local_sidecar: Observed) -> None:
    traffic(local_sidecar)
    scrape = local_sidecar.scrape()
    types = scrape.types()

    missing = sorted(set(FAMILIES) - set(types))
    assert not missing, f"families missing from the scrape: {missing}"
    wrong = {name: types[name] for name, (kind, _) in FAMILIES.items() if types[name] != kind}
    assert not wrong, f"families of the wrong type: {wrong}"
    for name, kind in PROCESS_FAMILIES.items():
        assert types.get(name) == kind, f"{name}: {types.get(name)} (process collector)"

    # The parser agrees (it names counter families without `_total`), and every sample carries
    # exactly the labels the issue fixes.
    for name, (kind, labels) in FAMILIES.items():
        family_name = name.removesuffix("_total") if kind == "counter" else name
        family = scrape.families.get(family_name)
        assert family is not None, f"the parser found no family {family_name}"
        assert family.type == kind
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, f"{sample.name} {sample.labels}"

    # Bounded label values.
    assert {s.labels["source"] for s in scrape.matching("dns_sidecar_responses_total")} <= SOURCES
    assert {s.labels["reason"] for s in scrape.matching("dns_sidecar_dropped_total")} <= (
        DROP_REASONS
    )
    assert {
        s.labels["reason"] for s in scrape.matching("dns_sidecar_upstream_errors_total")
    } <= UPSTREAM_ERROR_REASONS
    assert {s.labels["type"] for s in scrape.matching("dns_sidecar_cache_hits_total")} <= {
        "success",
        "denial",
    }

    # What the traffic above must have produced.
    assert scrape.value("dns_sidecar_requests_total", proto="tcp", type="TXT") >= 1
    assert scrape.value("dns_sidecar_requests_total", proto="udp", type="AAAA") >= 1
    assert scrape.value("dns_sidecar_responses_total", rcode="NXDOMAIN") >= 2
    assert scrape.value("dns_sidecar_cache_hits_total", type="denial") >= 1
    assert scrape.value("dns_sidecar_upstream_healthy") >= 1
    healthy = {
        s.labels["upstream"]: s.value for s in scrape.matching("dns_sidecar_upstream_healthy")
    }
    assert all(v in (0.0, 1.0) for v in healthy.values()), healthy

    info = scrape.matching("dns_sidecar_build_info")
    assert len(info) == 1, info
    assert info[0].value == 1
    assert info[0].labels["version"] == __version__
    assert re.fullmatch(r"3\.\d+\.\d+\S*", info[0].labels["python"]), info[0].labels

    assert scrape.value("process_resident_memory_bytes") > 0
    assert scrape.value("process_cpu_seconds_total") > 0
    assert scrape.value("process_open_fds") > 0


def test_promtool_check_metrics_on_a_live_scrape_prints_nothing(local_sidecar: Observed) -> None:
    traffic(local_sidecar)
    text = local_sidecar.scrape().text
    assert "dns_sidecar_requests_total" in text
    assert run_promtool("check", "metrics", stdin=text) == "exit 0\n"


def test_metrics_content_type_is_the_text_format(local_sidecar: Observed) -> None:
    reply = local_sidecar.get("/metrics")
    assert reply.status == 200
    assert reply.content_type.startswith("text/plain"), reply.content_type


# --- faults move the counters -----------------------------------------------------------------


def test_stale_answer_counted_when_the_upstream_is_silent(
    observed: StartObserved, scripted_upstream: ScriptedUpstream
) -> None:
    name = "stale.obs.test."
    stale_ttl = 7
    stale_after = 0.2
    scripted_upstream.set(name, Answer(("A 192.0.2.77",), ttl=1))
    obs = observed(
        "--upstream",
        scripted_upstream.address,
        "--stale-answer-after",
        str(stale_after),
        "--stale-ttl",
        str(stale_ttl),
        "--prefetch-percent",
        "0",
        "--attempt-timeout",
        "0.5",
        "--query-timeout",
        "1.0",
    )
    assert a_records(ask(obs.sc, name)) == [("192.0.2.77", 1)]
    scripted_upstream.set(name, Silent())
    before = obs.scrape()

    def stale_reply() -> dns.message.Message | None:
        reply = ask(obs.sc, name)
        return reply if a_records(reply) == [("192.0.2.77", stale_ttl)] else None

    # Fresh hits (TTL 1) until the entry expires; then the upstream stays silent and the
    # expired entry comes back with the stale TTL after stale_answer_after.
    reply = poll(stale_reply, 6.0, "a stale answer", interval=0.1)
    assert reply.rcode() == dns.rcode.NOERROR
    after = obs.scrape()

    def delta(sample: str, **labels: str) -> float:
        return after.value(sample, **labels) - before.value(sample, **labels)

    assert delta("dns_sidecar_cache_served_stale_total") == 1
    assert delta("dns_sidecar_responses_total", source="stale", rcode="NOERROR") == 1
    assert delta("dns_sidecar_request_duration_seconds_count", source="stale") == 1
    # The stale answer waited for the upstream first: it is in no bucket below that wait.
    early = [
        s
        for s in after.matching("dns_sidecar_request_duration_seconds_bucket", source="stale")
        if float(s.labels["le"]) < stale_after * 0.9
    ]
    assert early, "no histogram buckets below stale_answer_after"
    for sample in early:
        assert sample.value == before.value(sample.name, **sample.labels), sample

    # The refresh goes on in the background and times out against the silent upstream.
    poll(
        lambda: (
            obs.scrape().value(
                "dns_sidecar_upstream_errors_total",
                upstream=scripted_upstream.address,
                reason="timeout",
            )
            > before.value(
                "dns_sidecar_upstream_errors_total",
                upstream=scripted_upstream.address,
                reason="timeout",
            )
        ),
        5.0,
        "an upstream timeout to be counted",
    )


def test_upstream_timeout_counted_and_health_gauge_follows(
    observed: StartObserved, scripted_upstream: ScriptedUpstream
) -> None:
    name = "silent.obs.test."
    probe = "probe.obs.test."
    scripted_upstream.set(probe, Answer(("NS ns.obs.test.",), ttl=60))
    obs = observed(
        "--upstream",
        scripted_upstream.address,
        "--attempt-timeout",
        "0.3",
        "--query-timeout",
        "0.6",
        "--max-fails",
        "1",
        "--probe-name",
        probe,
        "--probe-interval",
        "0.2",
        "--servfail-ttl",
        "0",
    )
    upstream = scripted_upstream.address
    before = obs.scrape()
    assert before.value("dns_sidecar_upstream_healthy", upstream=upstream) == 1
    assert len(before.matching("dns_sidecar_upstream_healthy", upstream=upstream)) == 1

    scripted_upstream.set(name, Silent())
    scripted_upstream.set(probe, Silent())
    reply = ask(obs.sc, name, timeout=5.0)
    assert reply.rcode() == dns.rcode.SERVFAIL
    after = obs.scrape()

    def delta(sample: str, **labels: str) -> float:
        return after.value(sample, **labels) - before.value(sample, **labels)

    assert delta("dns_sidecar_upstream_errors_total", upstream=upstream, reason="timeout") >= 1
    assert delta("dns_sidecar_upstream_errors_total", reason="timeout") == delta(
        "dns_sidecar_upstream_errors_total"
    ), "a silent upstream gave errors other than timeouts"
    # The rules and the dashboard select rcode="SERVFAIL".
    assert delta("dns_sidecar_responses_total", rcode="SERVFAIL") == 1
    assert delta("dns_sidecar_cache_misses_total") == 1

    # One failure marks it down (--max-fails 1); the probe is silent too, so it stays down...
    poll(
        lambda: (
            obs.scrape().matching("dns_sidecar_upstream_healthy", upstream=upstream)[0].value == 0
        ),
        5.0,
        "dns_sidecar_upstream_healthy to turn 0",
    )
    # ...until the probe name answers again.
    scripted_upstream.set(probe, Answer(("NS ns.obs.test.",), ttl=60))
    poll(
        lambda: (
            obs.scrape().matching("dns_sidecar_upstream_healthy", upstream=upstream)[0].value == 1
        ),
        5.0,
        "dns_sidecar_upstream_healthy to turn 1 again",
    )


def test_malformed_datagram_counted_as_dropped(local_sidecar: Observed) -> None:
    before = local_sidecar.scrape()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"\xde\xad\xbe\xef", (local_sidecar.sc.addr, local_sidecar.sc.port))

    def dropped(scrape: Scrape, reason: str) -> float:
        return scrape.value("dns_sidecar_dropped_total", reason=reason)

    def counted() -> Scrape | None:
        scrape = local_sidecar.scrape()
        return scrape if dropped(scrape, "malformed") > dropped(before, "malformed") else None

    after = poll(
        counted,
        5.0,
        'dns_sidecar_dropped_total{reason="malformed"} to count the datagram',
    )
    assert dropped(after, "malformed") - dropped(before, "malformed") == 1
    for reason in DROP_REASONS - {"malformed"}:
        assert dropped(after, reason) == dropped(before, reason), reason
    # A datagram that is no query is not answered, so it gets no response either.
    assert after.value("dns_sidecar_responses_total") == before.value("dns_sidecar_responses_total")


class TcpAcceptor:
    """A TCP port that accepts and closes connections: a healthy endpoint for tcp probes."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _addr = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.close()
            self.accepted += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def test_endpoint_metrics_follow_discovery_health(
    observed: StartObserved,
    scripted_upstream: ScriptedUpstream,
    loopback: Callable[[], str],
    free_port: Callable[..., int],
) -> None:
    # Two endpoints on loopback: one accepts TCP on the probed port, the other refuses.
    alive, dead = loopback(), loopback()
    port = free_port(alive)
    acceptor = TcpAcceptor(alive, port)
    try:
        scripted_upstream.set("svc.disc.test.", Answer((f"A {alive}", f"A {dead}"), ttl=30))
        obs = observed(
            "--upstream",
            scripted_upstream.address,
            "--zone",
            f"disc.test={scripted_upstream.address}",
            "--health-check",
            f"disc.test=tcp:{port}",
            "--endpoint-probe-interval",
            "0.2",
            "--endpoint-rise",
            "1",
            "--endpoint-fall",
            "1",
        )
        assert sorted(a for a, _ in a_records(ask(obs.sc, "svc.disc.test."))) == sorted(
            [alive, dead]
        )

        def health_known() -> Scrape | None:
            scrape = obs.scrape()
            healthy = {
                s.labels["address"]: s.value
                for s in scrape.matching("dns_sidecar_endpoint_healthy", zone="disc.test")
            }
            return scrape if healthy == {alive: 1.0, dead: 0.0} else None

        scrape = poll(health_known, 10.0, f"endpoint health {alive}=1 and {dead}=0")
        latency = scrape.matching(
            "dns_sidecar_endpoint_latency_seconds", zone="disc.test", address=alive
        )
        assert len(latency) == 1 and 0 < latency[0].value < 1, latency
        assert scrape.value("dns_sidecar_endpoint_probes_total", zone="disc.test") >= 2
        assert acceptor.accepted >= 1

        # Answers of the zone now leave the dead endpoint out, and that is counted.
        def shaped() -> Scrape | None:
            reply = ask(obs.sc, "svc.disc.test.")
            scrape = obs.scrape()
            if [a for a, _ in a_records(reply)] != [alive]:
                return None
            if scrape.value("dns_sidecar_answers_shaped_total", zone="disc.test") <= 0:
                return None
            return scrape

        scrape = poll(shaped, 5.0, "a shaped answer without the dead endpoint", interval=0.1)
        for name in (
            "dns_sidecar_endpoint_healthy",
            "dns_sidecar_endpoint_latency_seconds",
            "dns_sidecar_endpoint_probes_total",
            "dns_sidecar_answers_shaped_total",
        ):
            samples = scrape.matching(name)
            assert samples, name
            for sample in samples:
                assert set(sample.labels) == FAMILIES[name][1], sample
        assert run_promtool("check", "metrics", stdin=scrape.text) == "exit 0\n"
    finally:
        acceptor.close()


# --- health and readiness ---------------------------------------------------------------------


def test_health_and_ready_answer_200_while_running(local_sidecar: Observed) -> None:
    health = local_sidecar.get("/health")
    assert health.status == 200, health
    ready = local_sidecar.get("/ready")
    assert ready.status == 200, ready
    assert ask(local_sidecar.sc, "resource-server.local.").rcode() == dns.rcode.NOERROR


def test_ready_turns_503_while_draining_and_the_process_exits_0(
    observed: StartObserved, nsd_local: NsdServer, scripted_upstream: ScriptedUpstream
) -> None:
    drain = 4.0
    obs = observed(
        "--upstream",
        scripted_upstream.address,
        "--zone",
        f"local={nsd_local.address}",
        "--drain-seconds",
        str(drain),
    )
    assert ask(obs.sc, "resource-server.local.").rcode() == dns.rcode.NOERROR  # now cached
    assert obs.get("/ready").status == 200

    sent = time.monotonic()
    obs.sc.proc.send_signal(signal.SIGTERM)
    ready = poll(
        lambda: r if (r := obs.get("/ready")).status == 503 else None,
        drain / 2,
        "/ready to answer 503 after SIGTERM",
    )
    assert "drain" in ready.body.lower(), f"503 without the reason: {ready.body!r}"
    assert obs.get("/health").status == 200
    # DNS is still served, from the cache and from the upstream.
    hit = ask(obs.sc, "resource-server.local.")
    assert hit.rcode() == dns.rcode.NOERROR and len(a_records(hit)) == 3
    miss = ask(obs.sc, "short.local.")
    assert a_records(miss) == [("10.0.0.5", 5)]
    assert obs.get("/ready").status == 503
    assert time.monotonic() - sent < drain, "the checks above took longer than the drain"

    try:
        code = obs.sc.proc.wait(timeout=drain + 10)
    except subprocess.TimeoutExpired:
        pytest.fail("the sidecar did not exit after its drain:\n" + obs.sc.stderr_text())
    elapsed = time.monotonic() - sent
    assert code == 0, obs.sc.stderr_text()
    assert elapsed >= drain * 0.9, f"exited {elapsed:.2f}s after SIGTERM, drain is {drain}s"


# --- the alert rules --------------------------------------------------------------------------


def alert_blocks(text: str) -> dict[str, str]:
    """alert name -> the text of its rule (block YAML, as config/prometheus-rules.yml is)."""
    blocks: dict[str, str] = {}
    matches = list(re.finditer(r"^(\s*)- alert:\s*(\S+)\s*$", text, re.MULTILINE))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        blocks[m.group(2)] = text[m.start() : end]
    return blocks


def without_annotations(text: str) -> str:
    """The rules text without the `annotations:` mappings (promtool test rules compares them
    verbatim, and they are prose)."""
    out: list[str] = []
    skip_deeper_than: int | None = None
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        if skip_deeper_than is not None:
            if not line.strip() or indent > skip_deeper_than:
                continue
            skip_deeper_than = None
        if line.strip() == "annotations:":
            skip_deeper_than = indent
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def test_promtool_check_rules_passes() -> None:
    output = run_promtool("check", "rules", str(RULES))
    assert output.startswith("exit 0\n"), output
    count = len(alert_blocks(RULES.read_text()))
    assert f"SUCCESS: {count} rules found" in output, output


def test_every_alert_has_severity_summary_and_description() -> None:
    blocks = alert_blocks(RULES.read_text())
    assert {
        "DnsSidecarDown",
        "DnsSidecarUpstreamDown",
        "DnsSidecarServingStale",
        "DnsSidecarCacheHitRatioLow",
        "DnsSidecarZoneAllEndpointsUnhealthy",
        "DnsSidecarServfailRatioHigh",
    } <= set(blocks), sorted(blocks)
    for name, block in blocks.items():
        assert re.search(r"^\s+severity:\s*(critical|warning|info)\s*$", block, re.M), name
        assert re.search(r"^\s+summary:\s*\S", block, re.M), name
        assert re.search(r"^\s+description:\s*\S", block, re.M), name
        assert re.search(r"^\s+for:\s*\d+[smh]\s*$", block, re.M), name


# Instance a is in trouble in every way; instance b is fine (or too quiet to matter).
# (metric, instance, extra labels, values in promtool's expanding notation, one per minute)
SYNTHETIC_SERIES: list[tuple[str, str, str, str]] = [
    ("up", "a", "", "0x20"),
    ("up", "b", "", "1x20"),
    ("dns_sidecar_upstream_healthy", "a", 'upstream="10.0.0.2:53"', "0x20"),
    ("dns_sidecar_upstream_healthy", "a", 'upstream="10.0.0.3:53"', "1x20"),
    ("dns_sidecar_upstream_healthy", "b", 'upstream="10.0.0.2:53"', "1x20"),
    ("dns_sidecar_cache_served_stale_total", "a", "", "0+30x20"),
    ("dns_sidecar_cache_served_stale_total", "b", "", "7x20"),
    # a: 1 hit/s against 10 misses/s at 11 qps; b: the same ratio at 1.1 qps.
    ("dns_sidecar_cache_hits_total", "a", 'type="success"', "0+60x20"),
    ("dns_sidecar_cache_misses_total", "a", "", "0+600x20"),
    ("dns_sidecar_requests_total", "a", 'proto="udp", type="A"', "0+660x20"),
    ("dns_sidecar_cache_hits_total", "b", 'type="success"', "0+6x20"),
    ("dns_sidecar_cache_misses_total", "b", "", "0+60x20"),
    ("dns_sidecar_requests_total", "b", 'proto="udp", type="A"', "0+66x20"),
    # svc.local has no healthy endpoint left; api.local has one.
    ("dns_sidecar_endpoint_healthy", "a", 'zone="svc.local", address="10.0.0.1"', "0x20"),
    ("dns_sidecar_endpoint_healthy", "a", 'zone="svc.local", address="10.0.0.2"', "0x20"),
    ("dns_sidecar_endpoint_healthy", "a", 'zone="api.local", address="10.0.1.1"', "1x20"),
    ("dns_sidecar_endpoint_healthy", "a", 'zone="api.local", address="10.0.1.2"', "0x20"),
    # a: 10% SERVFAIL at 10 responses/s; b: none.
    ("dns_sidecar_responses_total", "a", 'rcode="SERVFAIL", source="upstream"', "0+60x20"),
    ("dns_sidecar_responses_total", "a", 'rcode="NOERROR", source="cache"', "0+540x20"),
    ("dns_sidecar_responses_total", "b", 'rcode="NOERROR", source="cache"', "0+600x20"),
]
# (alert, evaluation time, labels of the alerts expected then besides job and instance="a")
EXPECTED_ALERTS: list[tuple[str, str, dict[str, str] | None]] = [
    ("DnsSidecarDown", "30s", None),
    ("DnsSidecarDown", "15m", {"severity": "critical"}),
    ("DnsSidecarUpstreamDown", "30s", None),
    ("DnsSidecarUpstreamDown", "15m", {"severity": "warning", "upstream": "10.0.0.2:53"}),
    ("DnsSidecarServingStale", "3m", None),
    ("DnsSidecarServingStale", "15m", {"severity": "warning"}),
    ("DnsSidecarCacheHitRatioLow", "5m", None),
    ("DnsSidecarCacheHitRatioLow", "15m", {"severity": "warning"}),
    ("DnsSidecarZoneAllEndpointsUnhealthy", "15m", {"severity": "critical", "zone": "svc.local"}),
    ("DnsSidecarServfailRatioHigh", "3m", None),
    ("DnsSidecarServfailRatioHigh", "15m", {"severity": "warning"}),
]


def promtool_rule_tests() -> str:
    lines = [
        "rule_files: [rules.yml]",
        "evaluation_interval: 1m",
        "tests:",
        "  - interval: 1m",
        "    input_series:",
    ]
    for metric, instance, extra, values in SYNTHETIC_SERIES:
        labels = f'job="dns-sidecar", instance="{instance}"' + (f", {extra}" if extra else "")
        lines += [f"      - series: '{metric}{{{labels}}}'", f"        values: '{values}'"]
    lines.append("    alert_rule_test:")
    for alert, at, labels in EXPECTED_ALERTS:
        lines += [f"      - eval_time: {at}", f"        alertname: {alert}"]
        if labels is None:
            lines.append("        exp_alerts: []")
        else:
            expected = {"job": "dns-sidecar", "instance": "a", **labels}
            lines += ["        exp_alerts:", f"          - exp_labels: {json.dumps(expected)}"]
    return "\n".join(lines) + "\n"


def test_alerts_fire_on_synthetic_series(tmp_path: Path) -> None:
    (tmp_path / "rules.yml").write_text(without_annotations(RULES.read_text()))
    (tmp_path / "rules_test.yml").write_text(promtool_rule_tests())
    output = run_promtool("test", "rules", "rules_test.yml", cwd=tmp_path)
    assert output.startswith("exit 0\n"), output


def test_rule_metric_names_exist_in_a_live_scrape(local_sidecar: Observed) -> None:
    names = set(METRIC_NAME.findall(RULES.read_text()))
    assert len(names) >= 6, names
    traffic(local_sidecar)
    scrape = local_sidecar.scrape()
    assert sorted(n for n in names if not scrape.has(n)) == []


# --- the dashboard ----------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))


def panel_exprs(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query target of every panel."""
    return [
        (panel.get("title", ""), target["expr"])
        for panel in walk_panels(board["panels"])
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def variable_queries(board: dict[str, Any]) -> list[str]:
    out = []
    for var in board["templating"]["list"]:
        if var.get("type") != "query":
            continue
        query = var.get("query")
        out.append(query["query"] if isinstance(query, dict) else str(query))
        if var.get("definition"):
            out.append(var["definition"])
    return out


def test_dashboard_shape() -> None:
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41, board["schemaVersion"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["type"] == "query", name
        assert variables[name]["datasource"]["uid"] == "${datasource}", name
    instance_query = variables["instance"]["query"]
    if isinstance(instance_query, dict):
        instance_query = instance_query["query"]
    assert "$job" in instance_query, "the instance variable should depend on $job"

    panels = list(walk_panels(board["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel.get("targets"), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]

    # Every selector of a sidecar metric is narrowed to the chosen jobs and instances.
    for title, expr in panel_exprs(board):
        for m in re.finditer(r"((?:dns_sidecar|process)_[A-Za-z0-9_]+)(\{[^}]*\})?", expr):
            matchers = m.group(2) or ""
            assert 'job=~"$job"' in matchers and 'instance=~"$instance"' in matchers, (
                f"{title}: {m.group(0)}"
            )


def test_dashboard_shows_every_sidecar_family() -> None:
    board = dashboard()
    used = {
        name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
        for _title, expr in panel_exprs(board)
        for name in METRIC_NAME.findall(expr)
    }
    assert sorted(set(FAMILIES) - used) == []
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total"} <= used
    titles = " | ".join(p.get("title", "") for p in walk_panels(board["panels"])).lower()
    for words in ("source", "hit ratio", "p99", "stale", "endpoint", "dropped", "upstream"):
        assert words in titles, words


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool checks PromQL when it checks rules: turn each query into a recording rule.
    substitutions = {
        "$__rate_interval": "5m",
        "$__interval": "1m",
        "$__range": "1h",
        "$job": ".+",
        "$instance": ".+",
    }
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    exprs = panel_exprs(dashboard())
    assert len(exprs) >= 15
    for i, (title, expr) in enumerate(exprs):
        for var, value in substitutions.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"{title}: unknown variable in {expr}"
        lines += [f"      - record: dashboard:query_{i}", f"        expr: {json.dumps(expr)}"]
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    output = run_promtool("check", "rules", str(rules))
    assert output.startswith("exit 0\n"), output


def test_dashboard_metric_names_exist_in_a_live_scrape(local_sidecar: Observed) -> None:
    board = dashboard()
    queries = [expr for _title, expr in panel_exprs(board)] + variable_queries(board)
    names = {name for query in queries for name in METRIC_NAME.findall(query)}
    assert len(names) >= 15, names
    traffic(local_sidecar)
    scrape = local_sidecar.scrape()
    assert sorted(n for n in names if not scrape.has(n)) == []
