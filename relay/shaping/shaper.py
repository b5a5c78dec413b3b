"""The live limits of one delivery lane.

Configured shaping, narrowed for a while by `throttle` rules, by adaptive limits
(adaptive.py: a provider's "too many" halves them) and by slow start: after a
suspension or an outage the lane reopens with one connection and doubles it with each
successful transaction, so a backlog is not released onto a provider all at once.
`limits()` says which of these is in force and why.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from relay.config.model import Rule, Shaping, TrafficClass
from relay.config.units import Rate
from relay.shaping.adaptive import Adaptive, Cut
from relay.shaping.rate import (
    Bucket,
    BucketFactory,
    Mailboxes,
    MailboxFactory,
    local_bucket,
    local_mailboxes,
)

log = logging.getLogger("relay.shaping")


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit in force, and why: what `relay provider show` prints and
    `relay_provider_limit` exports."""

    name: str  # "max_connections" or "rate"
    value: int | Rate | None  # None: no rate limit
    configured: int | Rate | None
    why: str  # "configured", "adaptive", "throttle" or "slow start"
    since: float | None = None  # wall-clock time the narrowing began
    until: float | None = None  # wall-clock time it ends by itself (a throttle)
    reason: str = ""  # the reply behind it


def configured_limits(shaping: Shaping) -> list[Limit]:
    """The limits of a lane with nothing narrowing it (or of one not running)."""
    return [
        Limit("max_connections", shaping.max_connections, shaping.max_connections, "configured"),
        Limit("rate", shaping.rate, shaping.rate, "configured"),
    ]


class Shaper:
    def __init__(
        self,
        shaping: Shaping,
        classes: dict[str, TrafficClass],
        clock: Callable[[], float] = time.monotonic,
        buckets: BucketFactory = local_bucket,  # a cluster's shared rates (SPEC §9)
        adaptive: Adaptive | None = None,
        mailboxes: MailboxFactory = local_mailboxes,  # a cluster's, too
    ) -> None:
        """`adaptive`: the previous shaper's, on a reload: a cut in force stays."""
        self.shaping = shaping
        self._clock = clock
        self._bucket = buckets
        self._rate = buckets("provider", shaping.rate) if shaping.rate else None
        self._connections = (
            buckets("connection", shaping.connection_rate) if shaping.connection_rate else None
        )
        self._mailboxes: Mailboxes | None = (
            mailboxes(shaping.recipient_rate) if shaping.recipient_rate else None
        )
        self._classes = {
            name: buckets(f"class {name}", c.rate) for name, c in classes.items() if c.rate
        }
        self._throttle_until = 0.0
        self._throttle_rate: Bucket | None = None
        self._throttle_rule: Rule | None = None
        self._throttle_reason = ""
        self._ceiling: int | None = None  # slow start; None when not ramping
        self.adaptive: Adaptive | None = None
        self._adaptive_rate: Bucket | None = None  # while adaptive limits cut the rate
        if shaping.adaptive:
            self.adaptive = adaptive or Adaptive(shaping.max_connections, shaping.rate)
            self.adaptive.reconfigure(shaping.max_connections, shaping.rate)
            self._follow_adaptive_rate()

    # connections

    def max_connections(self) -> int:
        limit = self.shaping.max_connections
        if self.adaptive is not None:
            limit = min(limit, self.adaptive.connections)
        rule = self._throttle_rule
        if self._throttled() and rule is not None and rule.max_connections is not None:
            limit = min(limit, rule.max_connections)
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

    def _provider_rates(self) -> list[Bucket]:
        """The provider's rate in force (the adaptive one while cut), and a throttle's
        while one runs: both apply, so the narrower one decides."""
        rates = [self._adaptive_rate or self._rate]
        if self._throttled():
            rates.append(self._throttle_rate)
        return [rate for rate in rates if rate is not None]

    def _message_buckets(self, class_name: str) -> list[Bucket]:
        buckets = self._provider_rates()
        bucket = self._classes.get(class_name)
        if bucket is not None:
            buckets.append(bucket)
        return buckets

    def provider_delay(self) -> float:
        now = self._clock()
        return max((rate.delay(now) for rate in self._provider_rates()), default=0.0)

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

    async def admit_mailboxes(self, addresses: list[str]) -> list[float]:
        """Take each mailbox's rate for a recipient about to be sent: 0 for those
        taken, the wait for the others (they are held back)."""
        if self._mailboxes is None:
            return [0.0] * len(addresses)
        return await self._mailboxes.admit([a.lower() for a in addresses], self._clock())

    # adjustments

    def _throttled(self) -> bool:
        return self._throttle_until > self._clock()

    def throttle(self, rule: Rule, reason: str = "") -> None:
        """Narrow the limits for `rule.duration`; a later throttle replaces an earlier one."""
        self._throttle_until = self._clock() + (rule.duration or 0)
        self._throttle_rate = self._bucket("throttle", rule.rate) if rule.rate else None
        self._throttle_rule = rule
        self._throttle_reason = reason

    def reduce(self, open_connections: int, reason: str, now: float) -> bool:
        """A throttle-kind reply (adaptive.py); True when a limit went down."""
        if self.adaptive is None or not self.adaptive.reduce(open_connections, reason, now):
            return False
        self._follow_adaptive_rate()
        return True

    def assume(self, connections: int, rate: Rate | None, reason: str, at: float) -> bool:
        """Another node's adaptive limits for this lane; True when they changed here."""
        if self.adaptive is None or not self.adaptive.assume(connections, rate, Cut(at, reason)):
            return False
        self._follow_adaptive_rate()
        return True

    def _follow_adaptive_rate(self) -> None:
        """The provider rate in force: the adaptive one while it is cut. It keeps the
        provider bucket's name, so a cluster's shared budget carries on at the new
        spacing; a local bucket starts afresh (at most one message sooner)."""
        rate = self.adaptive.rate if self.adaptive is not None else None
        cut = rate is not None and rate != self.shaping.rate
        self._adaptive_rate = self._bucket("provider", rate) if cut and rate else None

    def restart_slowly(self) -> None:
        if self.shaping.max_connections > 1:
            self._ceiling = 1

    def at_rest(self) -> bool:
        """Nothing to remember: no throttle or slow start in force, every rate back to its
        resting state. Only then may a lane be forgotten without letting a burst through."""
        if self._throttled() or self._ceiling is not None:
            return False
        if self.adaptive is not None and self.adaptive.narrowed:
            return False
        now = self._clock()
        buckets = [
            self._rate,
            self._adaptive_rate,
            self._connections,
            self._throttle_rate,
            *self._classes.values(),
        ]
        if any(b is not None and not b.idle(now) for b in buckets):
            return False
        return self._mailboxes is None or self._mailboxes.idle(now)

    def succeeded(self) -> bool:
        """A transaction was delivered with no throttle-kind reply; True when slow start
        or adaptive limits widened the lane."""
        widened = False
        if self.adaptive is not None and self.adaptive.delivered():
            self._follow_adaptive_rate()
            widened = True
        if self._ceiling is None:
            return widened
        self._ceiling *= 2
        if self._ceiling >= self.shaping.max_connections:
            self._ceiling = None
        return True

    # explanation

    def limits(self, now: float) -> list[Limit]:
        """Each limit in force and what set it; `now` is wall-clock time. The narrowest
        cause wins the explanation, as it wins the limit."""
        shaping = self.shaping
        configured = shaping.max_connections
        connections, rate = configured_limits(shaping)
        adaptive = self.adaptive
        if adaptive is not None and adaptive.narrowed and adaptive.cut is not None:
            cut = adaptive.cut
            if adaptive.connections < configured:
                connections = Limit(
                    "max_connections",
                    adaptive.connections,
                    configured,
                    "adaptive",
                    cut.at,
                    reason=cut.reason,
                )
            if adaptive.rate != shaping.rate:
                rate = Limit(
                    "rate", adaptive.rate, shaping.rate, "adaptive", cut.at, reason=cut.reason
                )
        left = self._throttle_until - self._clock()
        rule = self._throttle_rule
        if left > 0 and rule is not None:
            until, reason = now + left, self._throttle_reason
            if rule.max_connections is not None and rule.max_connections <= self.max_connections():
                connections = Limit(
                    "max_connections",
                    rule.max_connections,
                    configured,
                    "throttle",
                    until=until,
                    reason=reason,
                )
            current = rate.value
            narrower = not isinstance(current, Rate) or (
                rule.rate is not None and rule.rate.per_second <= current.per_second
            )
            if rule.rate is not None and narrower:
                rate = Limit(
                    "rate", rule.rate, shaping.rate, "throttle", until=until, reason=reason
                )
        if self._ceiling is not None and self._ceiling == self.max_connections():
            connections = Limit(
                "max_connections",
                self._ceiling,
                configured,
                "slow start",
                reason="reopening after a suspension or an outage",
            )
        return [connections, rate]
