"""Smooth rate limiting with GCRA (the generic cell rate algorithm).

A token bucket of size one, kept as a single number: the theoretical arrival time (TAT)
of the next event. Events are spaced exactly `period / count` apart, never bunched at
the start of a minute, and each decision is O(1). `burst` lets that many events go
back to back after an idle spell.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from relay.config.units import Rate


class Bucket(Protocol):
    """What a lane's shaper asks of a rate: `Gcra` here, or one budget shared by a
    cluster (relay/cluster/rates.py)."""

    def delay(self, now: float) -> float: ...

    def take(self, now: float) -> None: ...

    def refund(self) -> None: ...

    def idle(self, now: float) -> bool: ...


# (name of the rate within the lane: "provider", "class bulk", "connection", ...) → bucket
BucketFactory = Callable[[str, Rate], Bucket]


def local_bucket(name: str, rate: Rate) -> Bucket:
    return Gcra(rate)


class Mailboxes(Protocol):
    """A lane's per-mailbox rate (`recipient_rate`): `KeyedGcra` here, or one budget per
    mailbox shared by a cluster (relay/cluster/rates.py). Asynchronous, as the shared
    one asks Redis; a batch's recipients are decided together, in order."""

    async def admit(self, keys: list[str], now: float) -> list[float]:
        """For each key: 0 when its rate allows one now (and it is taken), else the wait."""
        ...

    def idle(self, now: float) -> bool: ...


# recipient_rate → the lane's mailboxes
MailboxFactory = Callable[[Rate], Mailboxes]


def local_mailboxes(rate: Rate) -> Mailboxes:
    return KeyedGcra(rate)


class Gcra:
    __slots__ = ("interval", "tat", "tolerance")

    def __init__(self, rate: Rate, burst: int = 1) -> None:
        self.interval = rate.period / rate.count
        self.tolerance = self.interval * (burst - 1)
        self.tat = 0.0

    def delay(self, now: float) -> float:
        """Seconds until an event is allowed (0: now)."""
        return max(0.0, self.tat - self.tolerance - now)

    def take(self, now: float) -> None:
        """Record an event (call when delay() is 0)."""
        self.tat = max(self.tat, now) + self.interval

    def refund(self) -> None:
        """Give back the last event when it did not happen after all."""
        self.tat -= self.interval

    def idle(self, now: float) -> bool:
        """True when the bucket is back to its resting state (safe to forget)."""
        return self.tat <= now


class KeyedGcra:
    """One GCRA per key (per mailbox), forgetting keys that went idle."""

    def __init__(self, rate: Rate, prune_above: int = 10_000) -> None:
        self._rate = rate
        self._buckets: dict[str, Gcra] = {}
        self._prune_above = prune_above

    def delay(self, key: str, now: float) -> float:
        bucket = self._buckets.get(key)
        return bucket.delay(now) if bucket else 0.0

    def take(self, key: str, now: float) -> None:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._prune_above:
                self._buckets = {k: b for k, b in self._buckets.items() if not b.idle(now)}
            bucket = self._buckets[key] = Gcra(self._rate)
        bucket.take(now)

    async def admit(self, keys: list[str], now: float) -> list[float]:
        waits = []
        for key in keys:
            wait = self.delay(key, now)
            if wait <= 0:
                self.take(key, now)
            waits.append(wait)
        return waits

    def __len__(self) -> int:
        return len(self._buckets)

    def idle(self, now: float) -> bool:
        return all(bucket.idle(now) for bucket in self._buckets.values())
