"""Time, injected.

Deadlines run on the monotonic clock: a Raspberry Pi has no real-time clock and its
wall clock jumps when NTP syncs after boot. The wall clock is used only for what is
shown to people or written to disk (and re-checked when read back).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Protocol

__all__ = ["Clock", "SystemClock", "clock_is_set"]

# No device runs this version before it was made (2026-11-01 UTC): a wall clock earlier
# than that has not been set yet. A Pi has no real-time clock and, without
# fake-hwclock, boots in 1970, when every TLS certificate is "not yet valid".
EARLIEST_PLAUSIBLE_TIME = 1_793_491_200.0
# systemd-timesyncd creates it at its first synchronisation (chrony and ntpd do not,
# which is why a plausible clock counts as well).
TIMESYNC_SYNCHRONIZED = Path("/run/systemd/timesync/synchronized")


def clock_is_set(now_wall: float) -> bool:
    return now_wall >= EARLIEST_PLAUSIBLE_TIME or TIMESYNC_SYNCHRONIZED.exists()


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def time(self) -> float:
        """Wall-clock seconds since the epoch."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))
