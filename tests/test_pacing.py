import random

import pytest

from agent.pacing import HOUR, Backoff, CodeBudget


def test_budget_allows_per_hour_then_waits_for_the_oldest() -> None:
    budget = CodeBudget(3)
    for t in (0.0, 10.0, 20.0):
        assert budget.next_allowed(t) == t
        budget.spend(t)
    assert budget.next_allowed(30.0) == HOUR
    assert budget.next_allowed(HOUR) == HOUR
    budget.spend(HOUR)
    assert budget.next_allowed(HOUR + 1) == HOUR + 10.0
    assert budget.used == 3


def test_budget_must_allow_something() -> None:
    with pytest.raises(ValueError):
        CodeBudget(0)


def test_backoff_full_jitter_grows_and_caps() -> None:
    backoff = Backoff(2.0, 60.0, rng=random.Random(7))
    ceilings = [2, 4, 8, 16, 32, 60, 60]
    for ceiling in ceilings:
        delay = backoff.next_delay()
        assert 0 <= delay <= ceiling
    backoff.reset()
    assert backoff.next_delay() <= 2.0


def test_backoff_floor() -> None:
    backoff = Backoff(1.0, 1.0, rng=random.Random(1))
    assert backoff.next_delay(floor=30.0) == 30.0


def test_backoff_spreads_a_fleet() -> None:
    delays = {round(Backoff(10, 100, rng=random.Random(seed)).next_delay(), 3)
              for seed in range(20)}
    assert len(delays) > 15
