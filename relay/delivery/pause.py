"""A provider's lane stopped as a whole: by a `suspend` rule or by an admin (SPEC §3).

No new transaction starts until the pause ends; transactions in flight finish, and the
waiting mail stays queued without counting as failed attempts. Suspensions are saved,
so a provider told to come back in 24 hours is not retried because relay restarted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from relay.clock import Clock
from relay.shaping.suspensions import Suspensions

log = logging.getLogger("relay.delivery")


class Pause:
    def __init__(
        self,
        key: str,
        provider: str,
        store: Suspensions,
        clock: Clock,
        ended: Callable[[], None],
    ) -> None:
        self._key = key
        self._provider = provider
        self._store = store
        self._clock = clock
        self._ended = ended  # the owning lane reopens
        self._until = 0.0  # monotonic
        self._timer: asyncio.TimerHandle | None = None
        self.reason: str | None = None

    @property
    def active(self) -> bool:
        return self._until > self._clock.monotonic()

    @property
    def until(self) -> float | None:
        """Wall-clock end, while active."""
        left = self._until - self._clock.monotonic()
        return self._clock.time() + left if left > 0 else None

    def start(self, duration: float, reason: str, persist: bool = True) -> bool:
        """Suspend for `duration`; False when a longer pause is already in force."""
        if duration <= 0:
            return False
        until = self._clock.monotonic() + duration
        if until <= self._until:
            return False  # a longer pause is in force: its end and reason stand, on disk too
        if persist:
            self._store.set(self._key, self._clock.time() + duration, reason)
        self.reason = reason
        log.warning(
            "provider=%s queue=%s suspended for %.0fs%s: %s",
            self._provider,
            self._key,
            duration,
            "" if persist else " (restored)",
            reason,
        )
        self._until = until
        self._arm(duration)
        return True

    def end(self) -> None:
        """End it now (its timer, or an admin)."""
        self.cancel()
        self._until = 0.0
        if self.reason is not None:
            self.reason = None
            self._store.clear(self._key)
            log.info("provider=%s queue=%s resumed", self._provider, self._key)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, delay: float) -> None:
        self.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, self._due)

    def _due(self) -> None:
        self._timer = None
        remaining = self._until - self._clock.monotonic()
        if remaining > 0:  # extended meanwhile
            self._arm(remaining)
            return
        self._ended()
