"""Where time comes from, as a seam: scheduling, pauses, rates and expiry read it here,
so their logic is unit-tested with a fake clock in microseconds (STYLE: a seam at every
I/O boundary)."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock seconds since the epoch: what is stored (due times, arrival)."""
        ...

    def monotonic(self) -> float:
        """Seconds that never jump: intervals (pauses, rates, idle timers)."""
        ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK = SystemClock()
