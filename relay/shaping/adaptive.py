"""Adaptive limits (SPEC §12): a provider that says "too many" gets fewer of us.

A reply of the throttle kind halves the connections and the rate in force (never below
one); then every `CLEAN_STEP` delivered transactions without another one add a
connection back and double the rate, up to the configured limits. As TCP's congestion
window does: cut at once, grow back gently, so a provider's real capacity is found and
held without an admin watching the logs.

Connection cuts are counted against what is open, not only against the limit: a
provider at `max_connections: 10` that refuses our third connection gets at most one,
not five (in a cluster, where the limit is the cluster's, the limit itself halves). The
rate halves once per incident: a burst of refusals with no delivery between them is one.
Without a configured `rate` there is no rate to halve; connections adapt alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.config.units import Rate

CLEAN_STEP = 50  # delivered transactions without a throttle-kind reply, per step back up

_UNITS = ((86400.0, "d"), (3600.0, "h"), (60.0, "min"), (1.0, "s"))


def rate_text(count: float, period: float) -> str:
    """As an admin writes it: "150/min", "0.5/min"."""
    unit = next((name for seconds, name in _UNITS if period == seconds), None)
    if unit is None:
        return f"{count / period:g}/s"
    return f"{count:g}/{unit}"


def scaled(rate: Rate, factor: float) -> Rate:
    count = max(1.0, rate.count * factor)
    return Rate(count, rate.period, rate_text(count, rate.period))


@dataclass(frozen=True, slots=True)
class Cut:
    at: float  # wall-clock time of the cut
    reason: str  # the reply that asked for it


class Adaptive:
    """The adaptive part of one lane's limits. Outlives a config reload: a new shaping
    keeps the brake on, within its own new limits."""

    def __init__(self, max_connections: int, rate: Rate | None) -> None:
        self._configured = (max_connections, rate)
        self.connections = max_connections
        self.rate = rate
        self.cut: Cut | None = None  # the last cut, while the limits are still below
        self._clean = 0
        self._incident = False  # the rate was cut and nothing was delivered since

    @property
    def narrowed(self) -> bool:
        configured_connections, configured_rate = self._configured
        return self.connections < configured_connections or self.rate != configured_rate

    def reconfigure(self, max_connections: int, rate: Rate | None) -> None:
        """New configured limits; a cut still in force stays, capped by them."""
        narrowed = self.narrowed
        self._configured = (max_connections, rate)
        if not narrowed:
            self.connections, self.rate, self.cut = max_connections, rate, None
            return
        self.connections = min(self.connections, max_connections)
        if rate is None or self.rate is None or self.rate.per_second >= rate.per_second:
            self.rate = rate
        else:
            self.rate = scaled(rate, self.rate.per_second / rate.per_second)
        if not self.narrowed:
            self.cut = None

    def reduce(self, open_connections: int, reason: str, now: float) -> bool:
        """A throttle-kind reply: halve. True when a limit went down.

        Connections halve at each such reply: refusals of extra connections go on until
        no more are open than the receiver takes. The rate halves once per incident: the
        replies of one burst, with no delivery between them, cut it once, not once each."""
        connections = max(1, min(self.connections, open_connections) // 2)
        rate = self.rate
        if rate is not None and not self._incident:
            rate = scaled(rate, 0.5)
            self._incident = True
        changed = connections < self.connections or rate != self.rate
        self.connections, self.rate = connections, rate
        self.cut = Cut(now, reason)
        self._clean = 0
        return changed

    def delivered(self) -> bool:
        """A transaction delivered with no throttle-kind reply. True when this one
        completed a step and the limits widened."""
        self._incident = False
        if not self.narrowed:
            return False
        self._clean += 1
        if self._clean < CLEAN_STEP:
            return False
        self._clean = 0
        configured_connections, configured_rate = self._configured
        self.connections = min(self.connections + 1, configured_connections)
        if self.rate is not None and configured_rate is not None:
            doubled = self.rate.per_second * 2
            self.rate = (
                configured_rate
                if doubled >= configured_rate.per_second
                else scaled(configured_rate, doubled / configured_rate.per_second)
            )
        if not self.narrowed:
            self.cut = None
        return True

    def assume(self, connections: int, rate: Rate | None, cut: Cut) -> bool:
        """Limits another node arrived at (SPEC §9), capped by ours; True if they changed."""
        configured_connections, configured_rate = self._configured
        connections = max(1, min(connections, configured_connections))
        if rate is None or configured_rate is None or rate.per_second >= configured_rate.per_second:
            rate = configured_rate
        if (connections, rate) == (self.connections, self.rate):
            return False
        self.connections, self.rate = connections, rate
        self.cut = cut if self.narrowed else None
        self._clean = 0
        return True

    @property
    def clean(self) -> int:
        """Delivered transactions toward the next step."""
        return self._clean
