"""Zone routing: the longest zone that contains the name, on whole labels."""

from __future__ import annotations

import pytest

from sidecar.core.routing import ZoneRouter, name_to_wire, wire_to_name

ROUTER = ZoneRouter("default", {"local": "local-ns", "svc.local": "svc-ns", "b.c": "bc"})


@pytest.mark.parametrize(
    ("name", "zone", "upstreams"),
    [
        ("resource-server.local", "local", "local-ns"),
        ("LOCAL", "local", "local-ns"),
        ("a.svc.local", "svc.local", "svc-ns"),
        ("svc.local.", "svc.local", "svc-ns"),
        ("x.nonlocal", ".", "default"),  # suffix of a label is not the zone
        ("ab.c", ".", "default"),
        ("a.b.c", "b.c", "bc"),
        ("example.com", ".", "default"),
        (".", ".", "default"),
    ],
)
def test_longest_zone_wins(name: str, zone: str, upstreams: str) -> None:
    assert ROUTER.route(name_to_wire(name)) == (zone, upstreams)


def test_wire_names_round_trip() -> None:
    assert name_to_wire("Resource-Server.local.") == b"\x0fresource-server\x05local\x00"
    assert wire_to_name(b"\x0fresource-server\x05local\x00") == "resource-server.local."
    assert wire_to_name(b"\x00") == "."
