"""Cloud Map parsing and bookkeeping, without AWS (no boto3 needed)."""

from __future__ import annotations

from typing import Any

from sidecar.discovery.cloudmap import (
    NOT_FOUND_HOLD,
    CloudMapSource,
    error_code,
    region_from_task_metadata,
    resolve_region,
)
from sidecar.discovery.registry import Instance, instances_of, statuses


def statuses_of(raw: list[dict[str, Any]]) -> dict[str, str]:
    return statuses(instances_of(raw))


def instance(status: str, **attributes: str) -> dict[str, Any]:
    return {"InstanceId": "i", "HealthStatus": status, "Attributes": attributes}


def test_statuses_of_reads_addresses_and_leaves_unknown_out() -> None:
    got = statuses_of(
        [
            instance("HEALTHY", AWS_INSTANCE_IPV4="10.0.0.1", AWS_INSTANCE_PORT="80"),
            instance("UNHEALTHY", AWS_INSTANCE_IPV4="10.0.0.2"),
            instance("UNKNOWN", AWS_INSTANCE_IPV4="10.0.0.3"),
            instance("HEALTHY", AWS_INSTANCE_IPV6="2001:DB8:0:0:0:0:0:1"),
            instance("HEALTHY", AWS_INSTANCE_IPV4="10.0.0.4", AWS_INSTANCE_IPV6="2001:db8::4"),
            instance("HEALTHY", AWS_INSTANCE_IPV4="not-an-address"),
            instance("HEALTHY", AWS_ALIAS_DNS_NAME="lb.example.com"),
            instance("UNHEALTHY", AWS_INSTANCE_IPV4="10.0.0.5"),
            instance("HEALTHY", AWS_INSTANCE_IPV4="10.0.0.5"),  # listed twice: UNHEALTHY wins
            {"InstanceId": "no-attributes", "HealthStatus": "HEALTHY"},
        ]
    )
    assert got == {
        "10.0.0.1": "HEALTHY",
        "10.0.0.2": "UNHEALTHY",
        "2001:db8::1": "HEALTHY",
        "10.0.0.4": "HEALTHY",
        "2001:db8::4": "HEALTHY",
        "10.0.0.5": "UNHEALTHY",
    }


def test_services_of_a_zone_merge_unhealthy_wins() -> None:
    source = CloudMapSource("local", "local", client=object())  # type: ignore[arg-type]
    source.listed("a", (Instance("1", "10.0.0.1", health="HEALTHY"),))
    source.listed("b", (Instance("2", "10.0.0.1", health="UNHEALTHY"),))
    assert source.zone_statuses() == {"10.0.0.1": "UNHEALTHY"}


def test_error_code_is_read_without_botocore() -> None:
    exc = RuntimeError("throttled")
    exc.response = {"Error": {"Code": "ThrottlingException"}}  # type: ignore[attr-defined]
    assert error_code(exc) == "ThrottlingException"
    assert error_code(ValueError("x")) is None


def test_region_from_task_metadata() -> None:
    arn = "arn:aws:ecs:eu-west-1:111122223333:task/cluster/0123456789abcdef"
    assert region_from_task_metadata({"TaskARN": arn, "AvailabilityZone": "x"}) == "eu-west-1"
    assert region_from_task_metadata({"AvailabilityZone": "us-east-1a"}) == "us-east-1"
    assert region_from_task_metadata({"AvailabilityZone": "us-west-2-lax-1a"}) == "us-west-2"
    assert region_from_task_metadata({"AvailabilityZone": "us-gov-west-1b"}) == "us-gov-west-1"
    assert region_from_task_metadata({}) is None


def test_resolve_region_order_without_metadata() -> None:
    env = {"AWS_REGION": "eu-central-1", "AWS_DEFAULT_REGION": "us-west-2"}
    assert resolve_region("ap-south-1", env) == "ap-south-1"
    assert resolve_region(None, env) == "eu-central-1"
    assert resolve_region(None, {"AWS_DEFAULT_REGION": "us-west-2"}) == "us-west-2"
    assert resolve_region(None, {}) is None  # left to boto3; no metadata URI, no request


def test_services_asked_for_are_deduplicated_bounded_and_held_when_unknown() -> None:
    now = [0.0]
    client: Any = object()  # never called
    source = CloudMapSource("local", "local", client=client, clock=lambda: now[0])
    assert source.add_service("resource-server")
    assert not source.add_service("Resource-Server.")  # DNS names ignore case
    assert source.due() == ["resource-server"]  # first lookup due (no spread: at once)
    source.schedule(["resource-server"], 10.0)  # looked up: next one an interval on
    assert source.due() == []
    assert source.add_service("typo")
    source.listed("typo", (Instance("9", "10.0.0.9", health="HEALTHY"),))
    source.drop_service("typo")
    assert source.services() == ["resource-server"]
    assert source.zone_statuses() == {}
    assert not source.add_service("typo")
    now[0] += NOT_FOUND_HOLD + 1
    assert source.add_service("typo")
    for i in range(1000):
        source.add_service(f"s{i}")
    assert len(source.services()) == 256


def test_services_not_asked_within_forget_after_are_no_longer_polled() -> None:
    now = [0.0]
    source = CloudMapSource("local", "local", clock=lambda: now[0])
    assert source.add_service("a") and source.add_service("b")
    now[0] = 200.0
    assert not source.add_service("a")  # asked again: known, its time renewed
    now[0] = 350.0
    assert source.forget_unasked(300.0) == ["b"]
    assert source.services() == ["a"]
    now[0] = 501.0
    assert source.forget_unasked(300.0) == ["a"]
    assert source.add_service("a")  # asked again later: polled again


def test_a_listing_is_believed_only_while_cloud_map_confirms_it() -> None:
    now = [0.0]
    source = CloudMapSource("local", "local", client=object(), clock=lambda: now[0])  # type: ignore[arg-type]
    source.fresh_for = 30.0
    source.add_service("resource-server")
    assert source.listing("resource-server", now[0]) is None  # never looked up: DNS stands
    first = (Instance("t1", "10.0.0.1"),)
    assert source.listed("resource-server", first)  # new
    assert not source.listed("resource-server", first)  # the same again: no change
    assert source.listing("Resource-Server", now[0]) is not None
    now[0] = 25.0
    source.confirmed("resource-server")  # the revision stood still: confirmed now
    now[0] = 50.0
    listing = source.listing("resource-server", now[0])
    assert listing is not None and listing.instances == first
    assert source.ages(now[0]) == [("resource-server", 25.0)]
    now[0] = 56.0  # throttled or failing since 25 s: 31 s unconfirmed, DNS stands again
    assert source.listing("resource-server", now[0]) is None
    assert source.listing("other", now[0]) is None


def test_first_lookups_are_spread_over_one_interval_not_made_at_once() -> None:
    now = [0.0]
    source = CloudMapSource("local", "local", client=object(), clock=lambda: now[0])  # type: ignore[arg-type]
    source.first_spread = 10.0
    for i in range(200):
        source.add_service(f"s{i}")
    due = []
    for t in range(11):
        now[0] = float(t)
        due.append(len(source.due()))
    assert due[0] <= 2 and due[-1] == 200
    assert 70 <= due[5] <= 130, due  # about half within half the interval
    source.schedule(["s0"], 100.0)
    assert "s0" not in source.due()
    due = source.next_due()
    assert due is not None and due <= 10.0
