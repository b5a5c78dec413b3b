"""Sites that could not be reached: their mail waits, nobody else's does (SPEC §5).

When no MX host of a site answers, that site backs off as a whole (exponential, like a
recipient's retries), as Postfix's qmgr marks a dead destination: the next message for it
is not another round of connection timeouts. A provider's other sites, and the provider
itself, carry on.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.clock import Clock
from relay.config.model import Retry
from relay.routing.retry import backoff

MAX_SITES = 100_000


@dataclass(slots=True)
class _Backoff:
    failures: int
    until: float  # wall clock


class SiteBackoff:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._sites: dict[str, _Backoff] = {}

    def __len__(self) -> int:
        return len(self._sites)

    def failed(self, key: str, retry: Retry) -> float:
        """Record a failed round; returns until when (wall clock) the site waits."""
        entry = self._sites.get(key)
        failures = 1 if entry is None else entry.failures + 1
        until = self._clock.time() + backoff(retry, failures)
        if len(self._sites) >= MAX_SITES and entry is None:
            self._prune()
        self._sites[key] = _Backoff(failures, until)
        return until

    def until(self, key: str) -> float | None:
        """While the site backs off, when it may be tried again; else None."""
        entry = self._sites.get(key)
        if entry is None or entry.until <= self._clock.time():
            return None
        return entry.until

    def reached(self, key: str) -> None:
        self._sites.pop(key, None)

    def clear(self) -> None:
        """An admin flush: every site is tried again now."""
        self._sites.clear()

    def _prune(self) -> None:
        now = self._clock.time()
        self._sites = {k: v for k, v in self._sites.items() if v.until > now}
