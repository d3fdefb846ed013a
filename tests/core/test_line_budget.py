from sidecar.core.line_budget import LineBudget


def test_the_first_lines_of_a_kind_in_a_window_are_written_the_rest_held() -> None:
    budget = LineBudget(per_window=3, window=1.0)
    assert [budget.admit("down", 10.0 + i / 100) for i in range(5)] == [True] * 3 + [False] * 2
    assert budget.admit("up", 10.1)  # each kind has its own budget


def test_a_window_over_reports_what_it_held_once_and_opens_anew() -> None:
    budget = LineBudget(per_window=2, window=1.0)
    for _ in range(1000):
        budget.admit("down", 5.0)
    budget.admit("up", 5.5)
    assert budget.ended(5.9) == []
    assert budget.ended(6.0) == [("down", 998)]
    assert budget.ended(6.4) == []  # "up" held nothing, "down" reported already
    assert budget.admit("down", 6.5)


def test_a_kind_that_comes_back_late_after_ended_starts_with_a_full_budget() -> None:
    budget = LineBudget(per_window=1, window=1.0)
    assert budget.admit("down", 0.0)
    assert not budget.admit("down", 0.5)
    assert budget.ended(3.0) == [("down", 1)]
    assert budget.admit("down", 3.0)
    assert not budget.admit("down", 3.1)
