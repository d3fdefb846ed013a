"""The upstream packet budget: a token bucket with a reserve that only client work may spend."""

from __future__ import annotations

import pytest

from sidecar.core.packet_budget import BURST_SECONDS, RESERVE, TCP_PACKETS, PacketBudget


def spend_all(budget: PacketBudget, now: float, *, background: bool = False) -> int:
    taken = 0
    while budget.take(1, now, background=background):
        taken += 1
    return taken


def test_a_full_bucket_holds_a_tenth_of_a_second_of_packets() -> None:
    assert spend_all(PacketBudget(900, 0.0), 0.0) == int(900 * BURST_SECONDS)


@pytest.mark.parametrize("rate", [900, 1000, 50, 7])
def test_no_one_second_window_gets_more_than_1_1_times_the_rate(rate: int) -> None:
    budget = PacketBudget(rate, 0.0)
    sent: list[float] = []
    now = 0.0
    while now < 5.0:  # a client asking every millisecond, more than any rate here allows
        if budget.take(1, now):
            sent.append(now)
        now += 0.001
    worst = max(sum(1 for t in sent if start <= t < start + 1.0) for start in sent)
    assert worst <= rate * (1 + BURST_SECONDS) + TCP_PACKETS * (rate < 50)
    assert len(sent) >= rate * 4.9  # and the rate is really given


def test_background_work_stops_at_the_reserve_and_a_client_takes_the_rest() -> None:
    budget = PacketBudget(1000, 0.0)
    capacity = int(1000 * BURST_SECONDS)
    background = spend_all(budget, 0.0, background=True)
    assert background == capacity - int(capacity * RESERVE)
    assert spend_all(budget, 0.0) == int(capacity * RESERVE)


def test_a_denied_take_spends_nothing() -> None:
    budget = PacketBudget(100, 0.0)  # capacity 10
    assert budget.take(8, 0.0)
    assert not budget.take(TCP_PACKETS, 0.0)
    assert budget.take(2, 0.0)
    assert not budget.take(1, 0.0)


def test_tokens_come_back_at_the_rate() -> None:
    budget = PacketBudget(900, 0.0)
    spend_all(budget, 0.0)
    assert not budget.take(1, 0.0)
    assert spend_all(budget, 0.01) == 9  # 10 ms at 900/s


def test_rate_zero_turns_the_budget_off() -> None:
    budget = PacketBudget(0, 0.0)
    assert all(budget.take(TCP_PACKETS, 0.0, background=True) for _ in range(100_000))


def test_a_small_rate_still_fits_one_tcp_query() -> None:
    assert PacketBudget(1, 0.0).take(TCP_PACKETS, 0.0)


def test_a_reload_keeps_what_was_spent() -> None:
    budget = PacketBudget(900, 0.0)
    spend_all(budget, 0.0)
    budget.resize(2000, 0.0)  # a bigger bucket does not come full
    assert not budget.take(1, 0.0)
    budget.resize(0, 0.0)
    assert budget.take(1, 0.0)
