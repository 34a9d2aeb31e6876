"""How often to ask the provider for things: a budget of new codes, and back-off.

Pure: times and randomness come in as arguments.
"""

from __future__ import annotations

import random
from collections import deque

__all__ = ["Backoff", "CodeBudget"]

HOUR = 3600.0


class CodeBudget:
    """At most `per_hour` new device codes in any rolling hour.

    authentik's device endpoint allows 20 accepted requests in any rolling hour per
    address, and then refuses everyone behind that address (all devices behind one NAT
    share the bucket); a code nobody uses is spent all the same.
    """

    def __init__(self, per_hour: int) -> None:
        if per_hour < 1:
            raise ValueError("per_hour must be at least 1")
        self.per_hour = per_hour
        self._spent: deque[float] = deque()

    def _forget_old(self, now: float) -> None:
        while self._spent and self._spent[0] <= now - HOUR:
            self._spent.popleft()

    def next_allowed(self, now: float) -> float:
        """The earliest monotonic time a new code may be requested (now, or later)."""
        self._forget_old(now)
        if len(self._spent) < self.per_hour:
            return now
        return self._spent[0] + HOUR

    def spend(self, now: float) -> None:
        self._forget_old(now)
        self._spent.append(now)

    def reset(self, times: list[float]) -> None:
        """Replace what was spent (monotonic times), oldest first."""
        self._spent = deque(sorted(times))

    def refund(self) -> None:
        """The last request was refused (authentik's 429): its throttle does not count
        refused requests, so neither does the budget."""
        if self._spent:
            self._spent.pop()

    @property
    def spent(self) -> tuple[float, ...]:
        """When the codes of the last hour were asked for (monotonic)."""
        return tuple(self._spent)

    @property
    def used(self) -> int:
        return len(self._spent)


class Backoff:
    """Exponential back-off with equal jitter: each delay is uniform in
    [ceiling / 2, ceiling], the ceiling being min(cap, base * 2**attempt).

    The random half keeps a fleet that lost the provider at one moment from coming
    back in lockstep. The fixed half is for the moment it comes back: a device in
    back-off is then at a random point of its current wait, and what is left of a
    wait uniform in [0, cap] (full jitter) is most often short, so twice the fleet's
    mean rate arrives in the first seconds. What is left of a wait uniform in
    [cap / 2, cap] is spread evenly over the first half of the cap, at 4/3 of the mean.
    """

    def __init__(self, base: float, cap: float, *, rng: random.Random | None = None) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self, floor: float = 0.0) -> float:
        ceiling = min(self.cap, self.base * 2 ** min(self.attempt, 30))
        self.attempt += 1
        return max(floor, self._rng.uniform(ceiling / 2, ceiling))

    def reset(self) -> None:
        self.attempt = 0
