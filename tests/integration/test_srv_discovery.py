"""SRV answers of a discovery zone (bridge and host mode: SRV only, dynamic ports), end to end:
NSD serving `svc.local SRV` with four targets on one instance address at four ports, real HTTP
backends on those ports (one dead, one slow), the sidecar probing each target at its SRV port,
and real clients (dnspython, dig) reading what it hands out."""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.query
import dns.rdatatype
import pytest

from tests.fakes.backends import BackendPool
from tests.fakes.nsd import NsdServer, free_port, loopback_host, running_nsd
from tests.integration.conftest import Sidecar, StartSidecar

pytestmark = pytest.mark.integration

SLOW_DELAY = 0.08  # the slow target's HTTP answers wait this long
ASKS = 200


@dataclass
class Instance:
    host: str
    ports: dict[str, int]  # target letter -> its port (a: dead, b: slow, c and d: fast)
    nsd: NsdServer

    def target(self, letter: str) -> str:
        return f"{letter}.svc.local."


def zone(host: str, ports: dict[str, int]) -> str:
    lines = ["$ORIGIN local.", "$TTL 60", "@ IN SOA ns hostmaster 1 3600 600 86400 30"]
    lines += ["@ IN NS ns", "ns IN A 127.0.0.1"]
    lines += [f"svc IN SRV 1 1 {port} {letter}.svc.local." for letter, port in ports.items()]
    lines += [f"{letter}.svc IN A {host}" for letter in ports]
    return "\n".join(lines) + "\n"


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[Instance]:
    host = loopback_host(7)
    with BackendPool() as pool:
        ports: dict[str, int] = {}
        for letter in "abcd":
            port = free_port(host)
            ports[letter] = port
            if letter != "a":  # a: nothing listens (a dead task)
                pool.start(host, port, delay=SLOW_DELAY if letter == "b" else 0.0)
        with running_nsd({"local.": zone(host, ports)}, tmp_path / "nsd") as nsd:
            yield Instance(host, ports, nsd)


def ask_srv(sc: Sidecar) -> dns.message.Message:
    query = dns.message.make_query("svc.local.", "SRV")
    return dns.query.udp(query, sc.addr, port=sc.port, timeout=2.0)


def srv_rows(reply: dns.message.Message) -> dict[str, tuple[int, int, int]]:
    """target -> (priority, weight, port) of the answer's SRV records."""
    return {
        rd.target.to_text(): (rd.priority, rd.weight, rd.port)
        for rrset in reply.answer
        if rrset.rdtype == dns.rdatatype.SRV
        for rd in rrset
    }


def additional_owners(reply: dns.message.Message) -> set[str]:
    return {rrset.name.to_text() for rrset in reply.additional}


def test_srv_answers_leave_the_dead_target_out_and_weigh_the_slow_one_less(
    sidecar: StartSidecar, instance: Instance
) -> None:
    sc = sidecar(
        "--upstream", instance.nsd.address, "--zone", f"local={instance.nsd.address}",
        "--health-check", "local=http:1/health",  # the port is each SRV record's
        "--endpoint-probe-interval", "0.5",
    )  # fmt: skip
    first = ask_srv(sc)
    assert len(srv_rows(first)) == 4  # nothing probed yet: every target as it came
    time.sleep(3.0)  # the first probes decide; a few more measure latency

    weights: dict[str, list[int]] = {}
    present: Counter[str] = Counter()
    for _ in range(ASKS):
        reply = ask_srv(sc)
        rows = srv_rows(reply)
        owners = additional_owners(reply)
        assert instance.target("a") not in rows and instance.target("a") not in owners
        assert owners == set(rows)  # exactly the addresses of the targets kept
        for target, (priority, weight, port) in rows.items():
            assert priority == 1 and weight >= 1
            assert port == instance.ports[target[0]]
            weights.setdefault(target, []).append(weight)
            present[target] += 1
        assert all(rrset.ttl <= 5 for rrset in reply.answer)  # discovery.answer_ttl
    slow = max(weights[instance.target("b")])
    fast = min(min(weights[instance.target(x)]) for x in "cd")
    print(f"\n[srv] {ASKS} asks: present {dict(present)}; weights slow {slow}, fast >= {fast}")
    assert present[instance.target("c")] == present[instance.target("d")] == ASKS
    assert slow < fast


def test_dig_reads_every_shaped_srv_answer(sidecar: StartSidecar, instance: Instance) -> None:
    sc = sidecar(
        "--upstream", instance.nsd.address, "--zone", f"local={instance.nsd.address}",
        "--health-check", "local=tcp:1",
    )  # fmt: skip
    ask_srv(sc)
    time.sleep(1.5)
    for _ in range(5):
        done = subprocess.run(
            ["dig", f"@{sc.addr}", "-p", str(sc.port), "svc.local.", "SRV", "+tries=1", "+time=2"],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "status: NOERROR" in done.stdout
        answers = [line for line in done.stdout.splitlines() if "\tSRV\t" in line]
        assert len(answers) == 3, done.stdout  # the dead target left out
        assert not any(" a.svc.local." in line for line in answers)
