"""One account's figures, as the account guard judges them: recipients in the last hour
against a baseline learnt hour by hour, and the share of remote rejects among the
recipients that finished in the last hour.

Pure arithmetic on the times it is given (wall-clock seconds), so it is tested on a fake
clock and kept in the spool as it is (`to_dict`).

- The last hour slides: twelve five-minute slots, so a burst that starts at 12:55 is
  not forgiven at 13:00 (a calendar hour would reset).
- The baseline is an exponentially weighted average of whole calendar hours, quiet
  ones included, with a half-life of a week: a night or a weekend without mail lowers
  it a little, not to nothing, and Monday morning does not look like an attack. The
  first hours are averaged without the weight's bias towards zero (the running sum is
  divided by the weight seen so far), so an account a day old has the mean of its
  day. An account without a whole hour yet has no baseline and is judged by
  `min_volume` alone.
- While the account is tripped nothing is learnt: the attack must not become usual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relay.config.model import GuardSettings

SLOT = 300.0  # seconds per slot of the sliding hour
SLOTS = 12
HOUR = 3600.0
HALF_LIFE_HOURS = 168.0
DECAY = 0.5 ** (1 / HALF_LIFE_HOURS)  # the weight an hour keeps, one hour later

_SENT, _DELIVERED, _BOUNCED = 0, 1, 2


@dataclass(frozen=True, slots=True)
class Trip:
    since: float  # wall clock
    reason: str  # what was over which limit, for `relay account list` and the log


class Ledger:
    __slots__ = (
        "baseline",
        "bounce_baseline",
        "bounce_hours",
        "hour",
        "hour_counts",
        "hours",
        "judged_since",
        "partial",
        "slots",
        "trip",
    )

    def __init__(self) -> None:
        self.slots: dict[int, list[int]] = {}  # slot number → [sent, delivered, bounced]
        self.hour: int | None = None  # the calendar hour being counted (time // 3600)
        self.hour_counts = [0, 0, 0]
        # The hour counting began in is not whole: an attack starting at 12:55 must not
        # become the baseline at 13:00.
        self.partial = False
        self.baseline: float | None = None  # recipients per hour; None: no whole hour yet
        self.hours = 0  # whole hours learnt
        self.bounce_baseline: float | None = None  # the usual ratio, for people to compare
        self.bounce_hours = 0  # whole hours learnt that had finished recipients
        self.trip: Trip | None = None
        # Outcomes of mail received before this (a release) are not judged again: the
        # held mail an admin lets go would otherwise trip the account a second time.
        self.judged_since = 0.0

    # counting

    def sent(self, now: float, recipients: int) -> None:
        self._count(now, _SENT, recipients)

    def finished(self, now: float, bounced: bool) -> None:
        self._count(now, _BOUNCED if bounced else _DELIVERED, 1)

    def _count(self, now: float, what: int, n: int) -> None:
        self.advance(now)
        slot = self.slots.setdefault(int(now // SLOT), [0, 0, 0])
        slot[what] += n
        self.hour_counts[what] += n

    def advance(self, now: float) -> None:
        """Learn the whole hours that ended before `now`, and drop slots older than an hour."""
        hour = int(now // HOUR)
        if self.hour is None:
            self.hour, self.partial = hour, True
        elif hour > self.hour:
            if self.trip is None:
                self._learn(hour - self.hour - 1)
            self.hour, self.hour_counts, self.partial = hour, [0, 0, 0], False
        oldest = int(now // SLOT) - SLOTS + 1
        for number in [n for n in self.slots if n < oldest]:
            del self.slots[number]

    def _learn(self, quiet: int) -> None:
        """Fold the hour just ended, then `quiet` hours without mail, into the baselines."""
        if self.partial:
            self.baseline, self.hours = _quiet(self.baseline, self.hours, quiet)
            return
        sent, delivered, bounced = self.hour_counts
        self.baseline, self.hours = _average(self.baseline, self.hours, float(sent), quiet)
        if delivered + bounced:
            self.bounce_baseline, self.bounce_hours = _average(
                self.bounce_baseline, self.bounce_hours, bounced / (delivered + bounced), 0
            )

    # reading

    def volume(self, now: float) -> int:
        """Recipients received in the last hour."""
        self.advance(now)
        return sum(slot[_SENT] for slot in self.slots.values())

    def outcomes(self, now: float) -> tuple[int, int]:
        """(finished, bounced): recipients with a final remote answer in the last hour."""
        self.advance(now)
        delivered = sum(slot[_DELIVERED] for slot in self.slots.values())
        bounced = sum(slot[_BOUNCED] for slot in self.slots.values())
        return delivered + bounced, bounced

    def limit(self, settings: GuardSettings) -> float:
        """The volume over which the account trips: `volume_factor` times its baseline,
        never below `min_volume`."""
        if self.baseline is None:
            return float(settings.min_volume)
        return max(float(settings.min_volume), settings.volume_factor * self.baseline)

    def judge(self, now: float, settings: GuardSettings) -> str | None:
        """Why the account should trip now, or None."""
        volume, limit = self.volume(now), self.limit(settings)
        if volume > limit:
            if self.baseline is not None and limit > settings.min_volume:
                over = (
                    f"{limit:.0f} ({settings.volume_factor:g} x its baseline of "
                    f"{self.baseline:.1f}/h)"
                )
            elif self.baseline is None:
                over = f"min_volume {settings.min_volume} (no baseline yet)"
            else:
                over = f"min_volume {settings.min_volume} (baseline {self.baseline:.1f}/h)"
            return f"{volume} recipients in the last hour, over {over}"
        finished, bounced = self.outcomes(now)
        # A ratio from a handful of recipients means nothing: 1 bounce out of 2 is 50 %.
        if finished >= settings.min_outcomes and bounced > settings.max_bounce_ratio * finished:
            return (
                f"{bounced} of {finished} recipients finished in the last hour were "
                f"rejected by the receiving servers ({bounced / finished:.0%}, over "
                f"max_bounce_ratio {settings.max_bounce_ratio:.0%})"
            )
        return None

    # tripping

    def release(self, now: float) -> None:
        """Untrip and start counting afresh: what tripped it is not judged again."""
        self.trip = None
        self.slots.clear()
        self.hour, self.hour_counts, self.partial = int(now // HOUR), [0, 0, 0], True
        self.judged_since = now

    # the state file

    def to_dict(self) -> dict[str, Any]:
        return {
            "hour": self.hour,
            "hour_counts": self.hour_counts,
            "partial": self.partial,
            "slots": [[number, *counts] for number, counts in sorted(self.slots.items())],
            "baseline": self.baseline,
            "hours": self.hours,
            "bounce_baseline": self.bounce_baseline,
            "bounce_hours": self.bounce_hours,
            "trip": None if self.trip is None else [self.trip.since, self.trip.reason],
            "judged_since": self.judged_since,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Ledger:
        """Missing keys take their starting values, so a state file written by hand
        (a baseline for a new relay, say) needs only `baseline` and `hours`. Raises
        ValueError, TypeError or KeyError on a damaged entry."""
        ledger = cls()
        hour = data.get("hour")
        ledger.hour = None if hour is None else int(hour)
        counts = [int(x) for x in data.get("hour_counts", [0, 0, 0])]
        if len(counts) != 3:
            raise ValueError("hour_counts: expected 3 numbers")
        ledger.hour_counts = counts
        ledger.partial = bool(data.get("partial", False))
        for number, *slot in data.get("slots", []):
            if len(slot) != 3:
                raise ValueError("slots: expected [number, sent, delivered, bounced]")
            ledger.slots[int(number)] = [int(x) for x in slot]
        baseline = data.get("baseline")
        ledger.baseline = None if baseline is None else float(baseline)
        ledger.hours = int(data.get("hours", 0 if baseline is None else 1))
        bounce = data.get("bounce_baseline")
        ledger.bounce_baseline = None if bounce is None else float(bounce)
        ledger.bounce_hours = int(data.get("bounce_hours", 0 if bounce is None else 1))
        trip = data.get("trip")
        if trip is not None:
            ledger.trip = Trip(float(trip[0]), str(trip[1]))
        ledger.judged_since = float(data.get("judged_since", 0.0))
        return ledger


def _quiet(mean: float | None, hours: int, quiet: int) -> tuple[float | None, int]:
    """`quiet` hours of zero added to the mean (see _average)."""
    if not quiet:
        return mean, hours
    total = (mean or 0.0) * (1 - DECAY**hours) * DECAY**quiet
    hours += quiet
    return total / (1 - DECAY**hours), hours


def _average(mean: float | None, hours: int, value: float, quiet: int) -> tuple[float, int]:
    """An hour of `value`, then `quiet` hours of zero, added to a bias-corrected
    exponentially weighted mean of `hours` hours; returns the new mean and hours."""
    # The mean is the weighted sum divided by the weight seen so far (1 - DECAY**n):
    # with few hours that divisor is small, and the mean is the plain average.
    total = (mean or 0.0) * (1 - DECAY**hours)
    total = DECAY * total + (1 - DECAY) * value
    hours += 1
    if quiet:
        total *= DECAY**quiet
        hours += quiet
    return total / (1 - DECAY**hours), hours
