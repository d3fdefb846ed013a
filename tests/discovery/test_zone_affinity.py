"""The zone affinity rule (discovery/zone_affinity.py) as arithmetic."""

from __future__ import annotations

import pytest

from sidecar.discovery.zone_affinity import OUTLIER_WEIGHT, affinity_weights, local_share


@pytest.mark.parametrize(
    ("local", "live", "zones", "share"),
    [(2, 6, 3, 1.0), (1, 5, 3, 0.6), (2, 8, 3, 0.75), (0, 5, 3, 0.0), (3, 4, 2, 1.0)],
)
def test_local_share_is_what_the_local_endpoints_can_carry(
    local: int, live: int, zones: int, share: float
) -> None:
    assert local_share(local, live, zones) == pytest.approx(share)


def shares(weights: list[float]) -> list[float]:
    total = sum(weights)
    return [w / total for w in weights]


def test_enough_local_endpoints_take_every_first_place() -> None:
    got = shares(affinity_weights([1.0] * 6, ["a", "a", "b", "b", "c", "c"], "a"))
    assert got[0] + got[1] == pytest.approx(1.0, abs=1e-6)


def test_too_few_spill_over_in_proportion_to_the_others_weights() -> None:
    got = shares(affinity_weights([1.0, 1.0, 1.0, 0.5, 0.5], ["a", "b", "b", "c", "c"], "a"))
    assert got[0] == pytest.approx(0.6)
    assert got[1] == pytest.approx(got[2]) == pytest.approx(2 * got[3])


def test_a_local_az_of_outliers_or_none_known_is_skipped() -> None:
    slow = OUTLIER_WEIGHT / 2
    w = [slow, 1.0, 1.0]
    assert affinity_weights(w, ["a", "b", "c"], "a") == w
    assert affinity_weights(w, ["a", "b", "c"], None) == w
    assert affinity_weights(w, [None, None, None], "a") == w
