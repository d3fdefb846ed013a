"""Endpoint health and latency bookkeeping with an injected clock."""

from __future__ import annotations

import random

from sidecar.discovery.endpoints import EndpointTable, ProbeSettings


def table(**kw: float) -> EndpointTable:
    return EndpointTable(ProbeSettings(**kw), rng=random.Random(1))  # type: ignore[arg-type]


def test_new_endpoints_are_unknown_and_due_at_once() -> None:
    t = table()
    t.seen("local", ["10.0.0.1", "10.0.0.2"], now=100.0)
    due = t.due(100.0)
    assert [e.address for e in due] == ["10.0.0.1", "10.0.0.2"]
    assert all(e.healthy is None for e in due)
    assert t.due(100.0) == []  # already running


def test_first_probe_decides_then_rise_and_fall() -> None:
    t = table(rise=2, fall=2)
    t.seen("local", ["a"], 0.0)
    (e,) = t.due(0.0)
    assert t.probed(e, False, None, 0.0)  # unknown -> unhealthy at once
    assert e.healthy is False
    assert not t.probed(e, True, 0.001, 1.0)  # one success is not enough to rise
    assert t.probed(e, True, 0.001, 2.0)
    assert e.healthy is True
    assert not t.probed(e, False, None, 3.0)  # one failure is not enough to fall
    assert t.probed(e, False, None, 4.0)
    assert e.healthy is False


def test_a_definite_failure_demotes_at_once_a_timeout_needs_fall() -> None:
    t = table(rise=1, fall=3)
    t.seen("local", ["a"], 0.0)
    (e,) = t.due(0.0)
    assert t.probed(e, True, 0.001, 0.0)
    assert not t.probed(e, False, None, 1.0)  # a timeout: one of three
    assert e.healthy is True
    assert t.probed(e, False, None, 2.0, definite=True)  # refused, or a 503: at once
    assert e.healthy is False


def test_next_probe_is_interval_with_jitter() -> None:
    t = table(interval=1.0)
    t.seen("local", ["a"], 0.0)
    (e,) = t.due(0.0)
    t.probed(e, True, 0.001, 10.0)
    assert 10.8 <= e.next_probe <= 11.2
    assert t.due(10.5) == []
    assert t.due(11.3) == [e]


def test_latency_is_smoothed_and_version_moves_on_bands_only() -> None:
    t = table()
    t.seen("local", ["a"], 0.0)
    (e,) = t.due(0.0)
    t.probed(e, True, 0.010, 0.0)
    version = t.version
    e.probing = True
    t.probed(e, True, 0.0101, 1.0)  # jitter within the band: no new version
    assert t.version == version
    for step in range(10):
        t.probed(e, True, 0.090, 2.0 + step)
    assert e.latency is not None and 0.08 < e.latency < 0.09
    assert t.version > version


def test_cloudmap_unhealthy_overrides_a_good_probe() -> None:
    t = table()
    t.seen("local", ["a", "b"], 0.0)
    for e in t.due(0.0):
        t.probed(e, True, 0.001, 0.0)
    version = t.version
    changed = t.set_cloudmap("local", {"a": "UNHEALTHY", "b": "HEALTHY"})
    assert [e.address for e in changed] == ["a"]
    assert t.get("local", "a").healthy is False  # type: ignore[union-attr]
    assert t.get("local", "b").healthy is True  # type: ignore[union-attr]
    assert t.version == version + 1
    assert t.get("local", "a").describe(1.0)["health_source"] == "cloudmap"  # type: ignore[union-attr]


def test_cloudmap_status_applies_to_endpoints_first_seen_after_the_refresh() -> None:
    t = table()
    assert t.set_cloudmap("local", {"a": "UNHEALTHY", "b": "HEALTHY"}) == []  # none known yet
    t.seen("local", ["a", "b", "c"], 0.0)
    t.seen("other", ["a"], 0.0)  # the same address in another zone: not Cloud Map's
    assert t.get("local", "a").healthy is False  # type: ignore[union-attr]
    assert t.get("local", "b").healthy is True  # type: ignore[union-attr]
    assert t.get("local", "c").healthy is None  # type: ignore[union-attr]
    assert t.get("other", "a").healthy is None  # type: ignore[union-attr]
    t.set_cloudmap("local", {"b": "HEALTHY"})  # the latest refresh replaces what is remembered
    t.forget(1000.0)  # a is forgotten, then seen anew
    t.seen("local", ["a"], 1000.0)
    assert t.get("local", "a").cloudmap is None  # type: ignore[union-attr]


def test_forgotten_when_not_seen_and_bounded_in_size() -> None:
    t = table(forget_after=300.0, max_endpoints=3)
    t.seen("local", ["a", "b"], 0.0)
    t.seen("local", ["b"], 200.0)
    assert [e.address for e in t.forget(350.0)] == ["a"]
    t.seen("local", ["c", "d", "e"], 400.0)
    assert sorted(addr for _z, addr, _port in t.endpoints) == [
        "c",
        "d",
        "e",
    ]  # b, least recent, went


def test_the_probe_rate_budget_starts_at_most_its_rate_most_overdue_first() -> None:
    t = EndpointTable(ProbeSettings(interval=1.0, max_per_second=10.0), rng=random.Random(1))
    t.seen("local", [f"10.0.{i // 250}.{i % 250}" for i in range(100)], 0.0)
    assert len(t.due(0.0)) == 10  # a second's worth at once
    assert t.due(0.0) == []
    started = 0
    for step in range(1, 41):  # 4 s at 10 looks a second
        now = step * 0.1
        batch = t.due(now)
        started += len(batch)
        for endpoint in batch:
            t.probed(endpoint, True, 0.001, now)
    assert 38 <= started <= 41  # 10 a second
    overdue = min(e.next_probe for e in t.endpoints.values() if not e.probing)
    batch = t.due(4.25)  # two tokens more
    assert len(batch) == 2 and min(e.next_probe for e in batch) == overdue


def test_without_a_budget_every_due_endpoint_starts() -> None:
    t = EndpointTable(ProbeSettings(max_per_second=0.0))
    t.seen("local", [f"10.0.0.{i}" for i in range(50)], 0.0)
    assert len(t.due(0.0)) == 50


def test_endpoints_of_names_not_asked_are_probed_less_often() -> None:
    t = EndpointTable(ProbeSettings(interval=1.0), rng=random.Random(1))
    t.seen("local", ["a"], 0.0)
    (e,) = t.due(0.0)
    t.probed(e, True, 0.001, 10.0)  # named 10 s ago: asked recently
    assert 10.8 <= e.next_probe <= 11.2
    t.probed(e, True, 0.001, 40.0)  # no answer named it for 40 s
    assert 44.0 <= e.next_probe <= 46.0
