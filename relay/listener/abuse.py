"""Limits against a compromised account or a password-guessing client.

- Per-account message rate (`accounts[].rate`): a token bucket of the configured size,
  refilled continuously, so "2000/h" allows a burst of 2,000 and then one every 1.8 s.
  Checked at MAIL, so an account over its limit has nothing half-accepted. In a
  cluster the bucket is the cluster's (relay/cluster/accountrates.py).
- AUTH failures within a window, per client IP and per account name (`AuthFailures`).
  Each failure from an IP is answered later than the last (0, 0.5, 1, 2, 4 s); after
  `IP_LOCKOUT_AFTER` failures from the IP, or `ACCOUNT_LOCKOUT_AFTER` for the name from
  anywhere (a guesser spread over a botnet), AUTH is refused outright until the window
  passes. The same answer for a wrong password and an unknown account: replies must not
  tell an attacker which names exist, so unknown names are counted like real ones.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol, TypeVar

from relay.config.model import Account
from relay.config.units import Rate
from relay.shaping.rate import Gcra

AUTH_WINDOW = 900.0  # seconds over which failures count
IP_LOCKOUT_AFTER = 5  # failures from one client IP in the window before AUTH is refused
# Higher than the IP's: locking a name out locks its owner out too (anyone can try its
# name), so this one only stops guessing spread over many addresses.
ACCOUNT_LOCKOUT_AFTER = 20
KNOWN_GOOD_FOR = 86400.0  # an IP that logged in to an account is exempt from its lockout
SETTLE_WAIT = 30.0  # longest wait for parallel checks of the same client to finish
MAX_DELAY = 4.0
MAX_KEYS = 100_000  # a botnet's worth of IPs or names; past it the oldest are forgotten
MAX_NAME = 256  # longer names are counted by their first 256 characters
MAX_TURNS = 1000  # wake-ups one attempt may wait through (SETTLE_WAIT bounds them too)

K = TypeVar("K")
V = TypeVar("V")


class AccountRates(Protocol):
    """The accounts' message rates, asked at MAIL: `LocalAccountRates` on one node, the
    cluster's budget in Redis (relay/cluster/accountrates.py) otherwise."""

    async def allow(self, account: Account) -> bool:
        """Take one message from the account's budget; False when it is spent."""
        ...


class LocalAccountRates:
    """`AccountRates` in this process's memory. `share` divides each rate and its burst:
    a cluster node's part of the budget while Redis does not answer (SPEC §9)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[Rate, int, Gcra]] = {}  # name → (rate, share, bucket)

    async def allow(self, account: Account) -> bool:
        return self.take(account)

    def take(self, account: Account, share: int = 1) -> bool:
        rate = account.rate
        if rate is None:
            return True
        known = self._buckets.get(account.name)
        if known is None or known[:2] != (rate, share):
            bucket = Gcra(
                Rate(rate.count, rate.period * share, rate.text),
                burst=max(1, int(rate.count) // share),
            )
            # What was sent under the old rate or share still counts: no fresh burst.
            bucket.tat = known[2].tat if known is not None else 0.0
            known = self._buckets[account.name] = (rate, share, bucket)
        bucket = known[2]
        now = self._clock()
        if bucket.delay(now) > 0:
            return False
        bucket.take(now)
        return True


class AuthFailures(Protocol):
    """Failed-AUTH bookkeeping shared by every session, per client IP and account name.

    A password check is counted *before* it runs (`attempt`) and uncounted only if it
    succeeds (`passed`): otherwise parallel guesses from one client all pass a "not yet
    locked" test before the first of them has failed, and far more than the limit are
    checked. The in-memory `LocalAuthFailures` serves one node; a cluster can give the
    same three calls to a shared store (an INCR and a DECR in Redis).
    """

    async def attempt(self, ip: str, account: str) -> bool:
        """Count one check of `account`'s password from `ip` as a failure in advance.

        False, counting nothing, when the IP or the name is locked out.
        """
        ...

    async def failed(self, ip: str, account: str) -> int:
        """The check `attempt` counted has failed; the IP's failures in the window."""
        ...

    async def passed(self, ip: str, account: str) -> None:
        """The check `attempt` counted has succeeded: it no longer counts."""
        ...


def auth_delay(failures: int) -> float:
    """Seconds to wait before answering the IP's `failures`-th failure in the window."""
    return 0.0 if failures <= 1 else min(MAX_DELAY, 0.5 * 2 ** (failures - 2))


class _Tally:
    """Failure times in the window plus checks still running (counted, not yet decided)."""

    __slots__ = ("failures", "pending")

    def __init__(self) -> None:
        self.failures: deque[float] = deque()
        self.pending = 0


class LocalAuthFailures:
    """`AuthFailures` in this process's memory: one event loop, so no locks are needed
    between reading a count and changing it (no await in between)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._by_ip: dict[str, _Tally] = {}
        self._by_account: dict[str, _Tally] = {}
        self._known_good: dict[tuple[str, str], float] = {}  # (name, ip) → last success
        # Attempts waiting for running checks of one IP or name; set (and dropped) when
        # one of those settles. Only ever as many as sessions waiting.
        self._waiters: dict[str, asyncio.Event] = {}

    async def attempt(self, ip: str, account: str) -> bool:
        name = account_key(account)
        deadline = self._clock() + SETTLE_WAIT
        for _ in range(MAX_TURNS):  # each turn follows a settled check; deadline bounds all
            by_ip = self._tally(self._by_ip, ip)
            by_account = self._tally(self._by_account, name)
            account_limit = 0 if self._is_known_good(name, ip) else ACCOUNT_LOCKOUT_AFTER
            if len(by_ip.failures) >= IP_LOCKOUT_AFTER or (
                account_limit and len(by_account.failures) >= account_limit
            ):
                return False
            ip_full = len(by_ip.failures) + by_ip.pending >= IP_LOCKOUT_AFTER
            account_full = (
                account_limit > 0 and len(by_account.failures) + by_account.pending >= account_limit
            )
            if not ip_full and not account_full:
                by_ip.pending += 1
                by_account.pending += 1
                self._store(self._by_ip, ip, by_ip)
                self._store(self._by_account, name, by_account)
                return True
            # Only checks still running stand between this one and the limit. If they
            # fail, this one must not run; if they pass (a client opening several
            # sessions at once with the right password), it may: wait and see.
            remaining = deadline - self._clock()
            if remaining <= 0:
                return False
            key = _ip_key(ip) if ip_full else _account_key(name)
            event = self._waiters.setdefault(key, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                return False
        return False

    async def failed(self, ip: str, account: str) -> int:
        name = account_key(account)
        now = self._clock()
        by_ip = self._settle(self._by_ip, ip)
        by_ip.failures.append(now)
        self._settle(self._by_account, name).failures.append(now)
        self._wake(ip, name)
        return len(by_ip.failures)

    async def passed(self, ip: str, account: str) -> None:
        name = account_key(account)
        self._settle(self._by_ip, ip)
        self._settle(self._by_account, name)
        self._known_good[(name, ip)] = self._clock()
        _bound(self._known_good)
        self._wake(ip, name)

    def _tally(self, table: dict[str, _Tally], key: str) -> _Tally:
        """The key's tally with failures older than the window dropped; an empty one
        is removed from the table (and stored again only if something is counted)."""
        tally = table.get(key)
        if tally is None:
            return _Tally()
        now = self._clock()
        while tally.failures and now - tally.failures[0] > AUTH_WINDOW:
            tally.failures.popleft()
        if not tally.failures and not tally.pending:
            del table[key]
        return tally

    @staticmethod
    def _store(table: dict[str, _Tally], key: str, tally: _Tally) -> None:
        table[key] = tally
        _bound(table)

    def _settle(self, table: dict[str, _Tally], key: str) -> _Tally:
        """Take one running check off the key's tally."""
        tally = self._tally(table, key)
        tally.pending = max(0, tally.pending - 1)
        self._store(table, key, tally)
        return tally

    def _wake(self, ip: str, name: str) -> None:
        for key in (_ip_key(ip), _account_key(name)):
            event = self._waiters.pop(key, None)
            if event is not None:
                event.set()

    def known_good(self, name: str, ip: str) -> bool:
        """`ip` logged in to `name` (an `account_key`) within KNOWN_GOOD_FOR."""
        return self._is_known_good(name, ip)

    def _is_known_good(self, name: str, ip: str) -> bool:
        since = self._known_good.get((name, ip))
        if since is None:
            return False
        if self._clock() - since > KNOWN_GOOD_FOR:
            del self._known_good[(name, ip)]
            return False
        return True


def account_key(account: str) -> str:
    """Names differing only in case are one name to a guesser."""
    return account[:MAX_NAME].casefold()


def _ip_key(ip: str) -> str:
    return f"ip {ip}"


def _account_key(name: str) -> str:
    return f"account {name}"


def _bound(table: dict[K, V]) -> None:
    """Forget the oldest tenth of a table that has grown past MAX_KEYS (dicts keep
    insertion order), so a flood of new addresses or names cannot exhaust memory."""
    if len(table) > MAX_KEYS:
        for stale in list(table)[: MAX_KEYS // 10]:
            del table[stale]
