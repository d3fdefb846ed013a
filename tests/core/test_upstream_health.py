"""Upstream health and policies, without sockets."""

from __future__ import annotations

import random

import pytest

from sidecar.core.upstream_health import UpstreamSet


def test_sequential_keeps_order_and_skips_down_upstreams() -> None:
    ups = UpstreamSet(["a", "b", "c"], max_fails=2)
    assert ups.order() == ["a", "b", "c"]
    assert not ups.failed("a")
    assert ups.order() == ["a", "b", "c"]  # one failure is not enough
    assert ups.failed("a")  # the second in a row marks it down
    assert ups.order() == ["b", "c"] and ups.down() == ["a"]
    assert ups.answered("a", 0.01)  # one answer brings it back
    assert ups.order() == ["a", "b", "c"] and ups.down() == []


def test_an_answer_resets_the_failure_count() -> None:
    ups = UpstreamSet(["a", "b"], max_fails=2)
    ups.failed("a")
    ups.answered("a", 0.01)
    ups.failed("a")
    assert ups.healthy("a")


def test_all_down_means_all_are_tried_in_order() -> None:
    ups = UpstreamSet(["a", "b"], max_fails=1)
    ups.failed("a")
    ups.failed("b")
    assert ups.order() == ["a", "b"]


def test_fastest_orders_by_smoothed_rtt_and_tries_the_unmeasured_first() -> None:
    ups = UpstreamSet(["slow", "fast", "new"], policy="fastest")
    ups.answered("slow", 0.200)
    ups.answered("fast", 0.010)
    assert ups.order() == ["new", "fast", "slow"]
    ups.answered("new", 0.100)
    assert ups.order() == ["fast", "new", "slow"]
    for _ in range(40):  # EWMA: a server that becomes fast overtakes
        ups.answered("slow", 0.001)
    assert ups.order()[0] == "slow"


def test_random_spreads_over_every_upstream() -> None:
    ups = UpstreamSet(["a", "b", "c"], policy="random", rng=random.Random(7))
    firsts = {ups.order()[0] for _ in range(60)}
    assert firsts == {"a", "b", "c"}


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="policy"):
        UpstreamSet(["a"], policy="roundrobin")
    with pytest.raises(ValueError):
        UpstreamSet([])


@pytest.mark.parametrize("policy", ["sequential", "random", "fastest"])
def test_order_follows_every_change_of_health(policy: str) -> None:
    """order() skips reading the state while nothing is down: the same answers as reading it."""
    rng = random.Random(5)
    ups = UpstreamSet(["a", "b", "c"], policy=policy, max_fails=2, rng=random.Random(1))
    for _ in range(2000):
        upstream = rng.choice("abc")
        if rng.random() < 0.5:
            ups.failed(upstream)
        else:
            ups.answered(upstream, rng.random())
        down = [u for u in "abc" if ups.state[u].down]
        assert ups.down() == down
        order = ups.order()
        expected = [u for u in "abc" if u not in down] or list("abc")
        assert sorted(order) == sorted(expected)
        if policy == "sequential":
            assert order == expected
            # What a question reads first: the configured order exactly while none is down.
            assert ups.fixed_order == (None if down else ("a", "b", "c"))
        else:
            assert ups.fixed_order is None  # the policy decides each time
        if policy == "fastest":
            assert order == sorted(expected, key=lambda u: ups.state[u].srtt or 0.0)


def test_a_single_upstream_keeps_its_order_under_any_policy_until_it_is_down() -> None:
    for policy in ("sequential", "random", "fastest"):
        ups = UpstreamSet(["a"], policy=policy, max_fails=1)
        assert ups.fixed_order == ("a",)
        ups.failed("a")
        assert ups.fixed_order is None and ups.order() == ["a"]  # all down: tried anyway
        ups.answered("a", 0.01)
        assert ups.fixed_order == ("a",)
