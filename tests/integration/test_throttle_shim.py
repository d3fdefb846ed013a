"""The throttling shim (tests/fakes/throttle_shim.py) in front of moto, through boto3: the
bucket's arithmetic, and throttled calls seen by botocore as AWS's ThrottlingException."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.discovery.cloudmap import CloudMapSource, error_code
from tests.fakes.moto_server import admin_client, running_moto
from tests.fakes.nsd import free_port
from tests.fakes.throttle_shim import ThrottleShim

pytestmark = pytest.mark.integration

REGION = "us-east-1"


@pytest.fixture(scope="module")
def moto_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with running_moto("127.0.0.1", free_port("127.0.0.1"), log_path) as url:
        admin: Any = admin_client(url, REGION)
        admin.create_private_dns_namespace(Name="local", Vpc="vpc-0123456789abcdef0")
        (namespace,) = admin.list_namespaces()["Namespaces"]
        service = admin.create_service(Name="svc", NamespaceId=namespace["Id"])["Service"]
        admin.register_instance(
            ServiceId=service["Id"], InstanceId="t1", Attributes={"AWS_INSTANCE_IPV4": "127.0.7.1"}
        )
        yield url


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy credentials; no profile or metadata that could send a client elsewhere."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def client(url: str) -> Any:
    """A client as the sidecar makes one, without botocore's retry (one request a call)."""
    from botocore.config import Config

    retries = {"mode": "standard", "total_max_attempts": 1}
    return admin_client(url, REGION, Config(inject_host_prefix=False, retries=retries))


def test_the_bucket_lets_its_capacity_through_then_its_refill_rate(moto_url: str) -> None:
    from botocore.exceptions import ClientError

    with ThrottleShim(moto_url, capacity=20, rate=2) as shim:
        sd = client(shim.url)
        codes = []
        start = time.monotonic()
        for _ in range(40):
            try:
                sd.discover_instances_revision(NamespaceName="local", ServiceName="svc")
                codes.append("ok")
            except ClientError as exc:
                codes.append(error_code(exc) or "?")
        elapsed = time.monotonic() - start
        assert codes[:20] == ["ok"] * 20  # the burst
        assert set(codes) == {"ok", "ThrottlingException"}
        assert codes.count("ok") <= 20 + 2 * elapsed + 1, (codes, elapsed)  # then the refill
        time.sleep(1.0)  # 2 tokens back
        found = sd.discover_instances(NamespaceName="local", ServiceName="svc")
        assert [i["InstanceId"] for i in found["Instances"]] == ["t1"]
        outcomes = [c.outcome for c in shim.calls]
        assert outcomes.count("ok") == codes.count("ok") + 1
        assert outcomes.count("throttled") == codes.count("ThrottlingException")
        assert {c.api for c in shim.calls} == {"DiscoverInstances", "DiscoverInstancesRevision"}
        admin: Any = admin_client(shim.url, REGION)
        before = len(shim.calls)
        admin.list_namespaces()  # the admin API passes, uncounted
        assert len(shim.calls) == before


def test_the_sidecars_source_sees_throttling_as_aws_reports_it(moto_url: str) -> None:
    with ThrottleShim(moto_url, capacity=1, rate=0.001) as shim:
        source = CloudMapSource("local", "local", endpoint_url=shim.url, region=REGION)
        assert [i.ipv4 for i in source.discover("svc")] == ["127.0.7.1"]
        with pytest.raises(Exception) as caught:
            source.discover("svc")
        assert error_code(caught.value) == "ThrottlingException"
        # botocore asked again once (total_max_attempts 2): both requests counted
        assert [c.outcome for c in shim.calls] == ["ok", "throttled", "throttled"]


def test_callers_named_in_the_endpoint_share_the_bucket_and_are_told_apart(
    moto_url: str,
) -> None:
    from botocore.exceptions import ClientError

    with ThrottleShim(moto_url, capacity=3, rate=0.001) as shim:
        a, b = client(shim.url_for("sidecar-1")), client(shim.url_for("sidecar/2"))
        assert [i["InstanceId"] for i in a.discover_instances(
            NamespaceName="local", ServiceName="svc")["Instances"]] == ["t1"]  # fmt: skip
        assert b.discover_instances_revision(NamespaceName="local", ServiceName="svc")[
            "InstancesRevision"
        ]
        a.discover_instances_revision(NamespaceName="local", ServiceName="svc")
        with pytest.raises(ClientError) as caught:  # the one bucket is empty for both
            b.discover_instances(NamespaceName="local", ServiceName="svc")
        assert error_code(caught.value) == "ThrottlingException"
        assert [(c.caller, c.api, c.outcome) for c in shim.calls] == [
            ("sidecar-1", "DiscoverInstances", "ok"),
            ("sidecar/2", "DiscoverInstancesRevision", "ok"),
            ("sidecar-1", "DiscoverInstancesRevision", "ok"),
            ("sidecar/2", "DiscoverInstances", "throttled"),
        ]
