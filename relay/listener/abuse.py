"""Limits against a compromised account or a password-guessing client.

- Per-account message rate (`accounts[].rate`): a token bucket of the configured size,
  refilled continuously, so "2000/h" allows a burst of 2,000 and then one every 1.8 s.
  Checked at MAIL, so an account over its limit has nothing half-accepted.
- AUTH failures per client IP within a window: each failure is answered later than the
  last (0, 0.5, 1, 2, 4 s), and after `LOCKOUT_AFTER` failures AUTH is refused outright
  until the window passes. The same answer for a wrong password and an unknown account:
  replies must not tell an attacker which names exist.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from relay.config.model import Account
from relay.shaping.rate import Gcra

AUTH_WINDOW = 900.0  # seconds over which failures count
LOCKOUT_AFTER = 5  # failures in the window before AUTH is refused
MAX_DELAY = 4.0


class AccountRates:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, Gcra] = {}

    def allow(self, account: Account) -> bool:
        """Take one message from the account's budget; False when it is spent."""
        if account.rate is None:
            return True
        bucket = self._buckets.get(account.name)
        if bucket is None or bucket.interval != account.rate.period / account.rate.count:
            bucket = self._buckets[account.name] = Gcra(
                account.rate, burst=max(1, int(account.rate.count))
            )
        now = self._clock()
        if bucket.delay(now) > 0:
            return False
        bucket.take(now)
        return True


class AuthThrottle:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, ip: str) -> deque[float]:
        now = self._clock()
        failures = self._failures.get(ip)
        if failures is None:
            return deque()
        while failures and now - failures[0] > AUTH_WINDOW:
            failures.popleft()
        if not failures:
            del self._failures[ip]
        return failures

    def locked(self, ip: str) -> bool:
        return len(self._recent(ip)) >= LOCKOUT_AFTER

    def failed(self, ip: str) -> float:
        """Record a failure; the delay before answering it."""
        failures = self._recent(ip)
        failures.append(self._clock())
        self._failures[ip] = failures
        if len(self._failures) > 100_000:  # a botnet's worth of IPs: forget the oldest
            for stale in list(self._failures)[:10_000]:
                del self._failures[stale]
        count = len(failures)
        return 0.0 if count <= 1 else min(MAX_DELAY, 0.5 * 2 ** (count - 2))
