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
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import REPO_ROOT, clean_env

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)"),
]


def lab(tmp_path: Path, scenario: str, *args: str) -> Any:
    argv = [sys.executable, "-m", "tests.fakes.registry_lab", scenario, str(tmp_path), *args]
    proc = subprocess.run(
        ["unshare", "--net", "--mount", "--propagation", "private", "--", *argv],
        capture_output=True, text=True, timeout=120, check=False, cwd=REPO_ROOT,
        env={**clean_env(), "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    log = tmp_path / "sidecar.log"
    sidecar = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    assert proc.returncode == 0, proc.stderr[-3000:] + sidecar
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(scenario, json.dumps(result))  # the measured shares, in the test output
    return result


def test_every_registered_backend_gets_traffic_though_dns_gives_8_of_12(tmp_path: Path) -> None:
    seen = lab(tmp_path, "all12")
    assert seen["failures"] == []
    assert seen["answer_size"] == 12
    shares = seen["shares"]
    assert len(shares) == 12, shares
    fair = sum(shares.values()) / 12
    assert min(shares.values()) >= fair / 2, shares
    assert seen["registry_answers"], "no answer was made from the registry"


def test_without_cloud_map_the_same_client_reaches_only_the_8_dns_gave(tmp_path: Path) -> None:
    seen = lab(tmp_path, "all12", "--no-cloudmap")  # the control: what DNS alone does
    assert seen["answer_size"] == 8
    assert len(seen["shares"]) == 8, seen["shares"]


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


def test_thirty_seconds_of_nxdomain_cost_the_client_nothing(tmp_path: Path) -> None:
    seen = lab(tmp_path, "nxdomain")
    assert seen["nxdomain_until"] - seen["nxdomain_from"] >= 30
    assert seen["failures"] == [], seen["failures"][:5]
    assert seen["connects_during"] > 500
    assert len(seen["shares_during"]) == 3
    assert seen["upstream_nxdomains"] >= 5  # the upstream was asked, and said NXDOMAIN
    replaced = seen["registry_answers"].get('{kind="negative_replaced",zone="local"}', 0)
    assert replaced >= 5


def test_three_azs_with_a_dead_local_endpoint_spill_over_as_documented(tmp_path: Path) -> None:
    """docs/discovery.md#zone-affinity: 1 live local endpoint of 5 live in 3 AZs takes
    1 x 3 / 5 = 60% of first places; the other two AZs 20% each; the dead one none."""
    seen = lab(tmp_path, "azs")
    # once probed (the first answers come before any probe, the dead endpoint possibly first)
    assert seen["failures"] == []
    assert seen["dead"] not in seen["shares"]
    by_az = seen["by_az"]
    assert by_az["us-east-1a"] == pytest.approx(0.6, abs=0.06), by_az
    assert by_az["us-east-1b"] == pytest.approx(0.2, abs=0.05), by_az
    assert by_az["us-east-1c"] == pytest.approx(0.2, abs=0.05), by_az
