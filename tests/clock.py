"""A clock the tests move by hand, so minutes of protocol time pass in milliseconds."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable

__all__ = ["ManualClock"]


class ManualClock:
    """Monotonic and wall time that move only when told.

    `sleep` parks the caller until `advance` moves time past its deadline.
    `run_until` is for tests that run real loopback I/O beside it: it lets the loop
    work for a few real milliseconds, and when the condition still does not hold,
    jumps to the earliest pending deadline.
    """

    def __init__(self, *, wall: float = 1_800_000_000.0, mono: float = 10_000.0) -> None:
        self._mono = mono
        self._wall_offset = wall - mono
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def monotonic(self) -> float:
        return self._mono

    def time(self) -> float:
        return self._mono + self._wall_offset

    def jump_wall(self, seconds: float) -> None:
        """The wall clock alone jumps, as when NTP syncs after boot."""
        self._wall_offset += seconds

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._mono + seconds, next(self._seq), future))
        await future

    @property
    def next_deadline(self) -> float | None:
        self._drop_cancelled()
        return self._sleepers[0][0] if self._sleepers else None

    def advance(self, seconds: float) -> None:
        self._mono += seconds
        while self._sleepers and self._sleepers[0][0] <= self._mono:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)

    def advance_to_next(self) -> bool:
        deadline = self.next_deadline
        if deadline is None:
            return False
        self.advance(max(0.0, deadline - self._mono))
        return True

    async def run_until(self, condition: Callable[[], bool], *, max_seconds: float = 86_400,
                        real_timeout: float = 10.0) -> None:
        """Move time forward, deadline by deadline, until `condition()` holds."""
        loop = asyncio.get_running_loop()
        limit = self._mono + max_seconds
        give_up = loop.time() + real_timeout
        while not condition():
            await asyncio.sleep(0.005)
            if condition():
                return
            if loop.time() > give_up:
                raise TimeoutError("condition not met within the real-time limit")
            deadline = self.next_deadline
            if deadline is not None and deadline <= limit:
                self.advance(max(0.0, deadline - self._mono))
            # Otherwise real I/O may still be under way: wait for it, in real time.

    def _drop_cancelled(self) -> None:
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)
