"""The Cloud Map registry as an address source (issue #18's acceptance), each scenario in a
network and mount namespace of its own (tests/fakes/registry_lab.py: moto in server mode, a
scripted upstream, real backends, the sidecar on 127.0.0.1:53 and a glibc client loop that
connects to the first address getaddrinfo returns). Nothing leaves the namespace's loopback.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import REPO_ROOT, clean_env
from tests.processes import end

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)"),
]


def start_lab(tmp_path: Path, scenario: str, *args: str) -> subprocess.Popen[bytes]:
    """The scenario running, its output in files (a pipe nobody reads yet could stall it)."""
    argv = [sys.executable, "-m", "tests.fakes.registry_lab", scenario, str(tmp_path), *args]
    with open(tmp_path / "lab.out", "wb") as out, open(tmp_path / "lab.err", "wb") as err:
        return subprocess.Popen(
            ["unshare", "--net", "--mount", "--propagation", "private", "--", *argv],
            stdout=out, stderr=err, cwd=REPO_ROOT,
            env={**clean_env(), "PYTHONPATH": str(REPO_ROOT)},
        )  # fmt: skip


def lab_result(proc: subprocess.Popen[bytes], tmp_path: Path, scenario: str) -> Any:
    try:
        proc.wait(timeout=120)
    finally:
        end(proc)
    log = tmp_path / "sidecar.log"
    sidecar = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    stderr = (tmp_path / "lab.err").read_text(errors="replace")
    assert proc.returncode == 0, stderr[-3000:] + sidecar
    result = json.loads((tmp_path / "lab.out").read_text().strip().splitlines()[-1])
    print(scenario, json.dumps(result))  # the measured shares, in the test output
    return result


def lab(tmp_path: Path, scenario: str, *args: str) -> Any:
    return lab_result(start_lab(tmp_path, scenario, *args), tmp_path, scenario)


Lab = tuple[subprocess.Popen[bytes], Path]

# Scenarios that mostly wait (a lookup and a connection every 10-20 ms) and hold no deadline
# tighter than a second: started with the module when their test is to run, each in a
# namespace of its own, they run while the scenarios before them do, and their tests (the
# module's last) collect them. Run one after another, the module took 95 s; so, ~44.
IN_BACKGROUND = {
    "test_three_azs_with_a_dead_local_endpoint_spill_over_as_documented": ("azs",),
    "test_without_cloud_map_the_same_client_reaches_only_the_8_dns_gave": (
        "all12",
        "--no-cloudmap",
    ),
    "test_thirty_seconds_of_nxdomain_cost_the_client_nothing": ("nxdomain",),
}


@pytest.fixture(scope="module", autouse=True)
def background_labs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Lab]]:
    """Autouse: set up before the module's first test, which starts them."""
    labs: dict[str, Lab] = {}
    try:
        for item in request.session.items:
            scenario = IN_BACKGROUND.get(item.name)
            if scenario is not None and item.name not in labs:
                tmp_path = tmp_path_factory.mktemp(scenario[0])
                labs[item.name] = start_lab(tmp_path, *scenario), tmp_path
        yield labs
    finally:
        for proc, _ in labs.values():
            end(proc)


def collect(background_labs: dict[str, Lab], request: pytest.FixtureRequest) -> Any:
    proc, tmp_path = background_labs[request.node.name]
    return lab_result(proc, tmp_path, IN_BACKGROUND[request.node.name][0])


def test_every_registered_backend_gets_traffic_though_dns_gives_8_of_12(tmp_path: Path) -> None:
    seen = lab(tmp_path, "all12")
    assert seen["failures"] == []
    assert seen["answer_size"] == 12
    shares = seen["shares"]
    assert len(shares) == 12, shares
    fair = sum(shares.values()) / 12
    assert min(shares.values()) >= fair / 2, shares
    assert seen["registry_answers"], "no answer was made from the registry"


def test_a_deregistered_instance_leaves_and_a_new_one_comes_within_one_poll(
    tmp_path: Path,
) -> None:
    seen = lab(tmp_path, "deregister")
    assert seen["failures"] == []
    assert "127.0.6.1" in seen["before"]
    last = seen["last_connect_to_it"]
    assert last is not None
    # one poll: the interval, plus its +-20% jitter
    assert last - seen["deregistered_at"] <= seen["interval"] * 1.2, seen
    assert "127.0.6.1" not in seen["after_shares"]
    assert set(seen["after_shares"]) == {"127.0.6.2", "127.0.6.3", "127.0.6.4"}
    # a new one within one poll, and its first probe (0.5 s interval, +-20%)
    first = seen["first_connect_to_new"]
    assert first is not None
    assert first - seen["registered_at"] <= seen["interval"] * 1.2 + 0.6 + 0.2, seen


def test_three_azs_with_a_dead_local_endpoint_spill_over_as_documented(
    background_labs: dict[str, Lab], request: pytest.FixtureRequest
) -> None:
    """docs/discovery.md#zone-affinity: 1 live local endpoint of 5 live in 3 AZs takes
    1 x 3 / 5 = 60% of first places; the other two AZs 20% each; the dead one none."""
    seen = collect(background_labs, request)
    # once probed (the first answers come before any probe, the dead endpoint possibly first)
    assert seen["failures"] == []
    assert seen["dead"] not in seen["shares"]
    by_az = seen["by_az"]
    assert by_az["us-east-1a"] == pytest.approx(0.6, abs=0.06), by_az
    assert by_az["us-east-1b"] == pytest.approx(0.2, abs=0.05), by_az
    assert by_az["us-east-1c"] == pytest.approx(0.2, abs=0.05), by_az


def test_without_cloud_map_the_same_client_reaches_only_the_8_dns_gave(
    background_labs: dict[str, Lab], request: pytest.FixtureRequest
) -> None:
    seen = collect(background_labs, request)  # the control: what DNS alone does
    assert seen["answer_size"] == 8
    assert len(seen["shares"]) == 8, seen["shares"]


def test_thirty_seconds_of_nxdomain_cost_the_client_nothing(
    background_labs: dict[str, Lab], request: pytest.FixtureRequest
) -> None:
    seen = collect(background_labs, request)
    assert seen["nxdomain_until"] - seen["nxdomain_from"] >= 30
    assert seen["failures"] == [], seen["failures"][:5]
    assert seen["connects_during"] > 500
    assert len(seen["shares_during"]) == 3
    assert seen["upstream_nxdomains"] >= 5  # the upstream was asked, and said NXDOMAIN
    replaced = seen["registry_answers"].get('{kind="negative_replaced",zone="local"}', 0)
    assert replaced >= 5
