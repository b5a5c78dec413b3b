"""The live limits of one delivery lane.

Configured shaping, narrowed for a while by `throttle` rules and by slow start: after a
suspension or an outage the lane reopens with one connection and doubles it with each
successful transaction, so a backlog is not released onto a provider all at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from relay.config.model import Rule, Shaping, TrafficClass
from relay.shaping.rate import Bucket, BucketFactory, KeyedGcra, local_bucket

log = logging.getLogger("relay.shaping")


class Shaper:
    def __init__(
        self,
        shaping: Shaping,
        classes: dict[str, TrafficClass],
        clock: Callable[[], float] = time.monotonic,
        buckets: BucketFactory = local_bucket,  # a cluster's shared rates (SPEC §9)
    ) -> None:
        self.shaping = shaping
        self._clock = clock
        self._bucket = buckets
        self._rate = buckets("provider", shaping.rate) if shaping.rate else None
        self._connections = (
            buckets("connection", shaping.connection_rate) if shaping.connection_rate else None
        )
        self._mailboxes = KeyedGcra(shaping.recipient_rate) if shaping.recipient_rate else None
        self._classes = {
            name: buckets(f"class {name}", c.rate) for name, c in classes.items() if c.rate
        }
        self._throttle_until = 0.0
        self._throttle_rate: Bucket | None = None
        self._throttle_connections: int | None = None
        self._ceiling: int | None = None  # slow start; None when not ramping

    # connections

    def max_connections(self) -> int:
        limit = self.shaping.max_connections
        if self._throttled() and self._throttle_connections is not None:
            limit = min(limit, self._throttle_connections)
        if self._ceiling is not None:
            limit = min(limit, self._ceiling)
        return limit

    def connection_delay(self) -> float:
        if self._connections is None:
            return 0.0
        return self._connections.delay(self._clock())

    def take_connection(self) -> None:
        if self._connections is not None:
            self._connections.take(self._clock())

    # messages

    def _message_buckets(self, class_name: str) -> list[Bucket]:
        buckets = []
        rate = self._throttle_rate if self._throttled() and self._throttle_rate else self._rate
        if rate is not None:
            buckets.append(rate)
        bucket = self._classes.get(class_name)
        if bucket is not None:
            buckets.append(bucket)
        return buckets

    def provider_delay(self) -> float:
        rate = self._throttle_rate if self._throttled() and self._throttle_rate else self._rate
        return rate.delay(self._clock()) if rate else 0.0

    def class_delay(self, class_name: str) -> float:
        bucket = self._classes.get(class_name)
        return bucket.delay(self._clock()) if bucket else 0.0

    def take_message(self, class_name: str) -> None:
        now = self._clock()
        for bucket in self._message_buckets(class_name):
            bucket.take(now)

    def refund_message(self, class_name: str) -> None:
        for bucket in self._message_buckets(class_name):
            bucket.refund()

    # mailboxes

    def mailbox_delay(self, address: str) -> float:
        if self._mailboxes is None:
            return 0.0
        return self._mailboxes.delay(address.lower(), self._clock())

    def take_mailbox(self, address: str) -> None:
        if self._mailboxes is not None:
            self._mailboxes.take(address.lower(), self._clock())

    # adjustments

    def _throttled(self) -> bool:
        return self._throttle_until > self._clock()

    def throttle(self, rule: Rule) -> None:
        """Narrow the limits for `rule.duration`; a later throttle replaces an earlier one."""
        self._throttle_until = self._clock() + (rule.duration or 0)
        self._throttle_rate = self._bucket("throttle", rule.rate) if rule.rate else None
        self._throttle_connections = rule.max_connections

    def restart_slowly(self) -> None:
        if self.shaping.max_connections > 1:
            self._ceiling = 1

    def at_rest(self) -> bool:
        """Nothing to remember: no throttle or slow start in force, every rate back to its
        resting state. Only then may a lane be forgotten without letting a burst through."""
        if self._throttled() or self._ceiling is not None:
            return False
        now = self._clock()
        buckets = [self._rate, self._connections, self._throttle_rate, *self._classes.values()]
        if any(b is not None and not b.idle(now) for b in buckets):
            return False
        return self._mailboxes is None or self._mailboxes.idle(now)

    def succeeded(self) -> bool:
        """A transaction went through; True when slow start widened the lane."""
        if self._ceiling is None:
            return False
        self._ceiling *= 2
        if self._ceiling >= self.shaping.max_connections:
            self._ceiling = None
        return True
