from __future__ import annotations

import math
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


def test_backoff_grows_and_caps_with_half_of_each_step_jittered() -> None:
    ceilings = [2, 4, 8, 16, 32, 60, 60]
    for seed in range(50):
        backoff = Backoff(2.0, 60.0, rng=random.Random(seed))
        for ceiling in ceilings:
            assert ceiling / 2 <= backoff.next_delay() <= ceiling
        backoff.reset()
        assert 1.0 <= backoff.next_delay() <= 2.0


def test_backoff_floor() -> None:
    backoff = Backoff(1.0, 1.0, rng=random.Random(1))
    assert backoff.next_delay(floor=30.0) == 30.0


def test_backoff_spreads_a_fleet() -> None:
    delays = {round(Backoff(10, 100, rng=random.Random(seed)).next_delay(), 3)
              for seed in range(20)}
    assert len(delays) > 15


def _first_tries_after(outage: float, *, devices: int, seed: int) -> list[float]:
    """Seconds from the provider's return to each device's first try after it: every
    device failed first at its own moment of the outage's first minute and has
    retried with its own back-off since (2 s doubling to 300 s, the defaults)."""
    rng = random.Random(seed)
    firsts = []
    for _ in range(devices):
        backoff = Backoff(2.0, 300.0, rng=random.Random(rng.random()))
        at = rng.uniform(0.0, 60.0)
        while at < outage:
            at += backoff.next_delay()
        firsts.append(at - outage)
    return firsts


def test_a_fleet_back_from_a_long_outage_comes_back_without_a_peak() -> None:
    # Full jitter (uniform in [0, cap]) brings twice the mean rate in the first seconds
    # after the return: the wait left of a uniform [0, cap] delay is most often short.
    # The fleet's target is a peak under twice the mean with refreshes near expiry and
    # scheduled ones on top, so the back-off alone must stay well below it.
    firsts = _first_tries_after(1800.0, devices=20_000, seed=8628)
    window = max(firsts)
    counts = [0] * math.ceil(window / 10.0)
    for first in firsts:
        counts[min(len(counts) - 1, int(first // 10.0))] += 1
    mean = len(firsts) / (window / 10.0)
    assert max(counts) < 1.6 * mean, (max(counts), mean)
