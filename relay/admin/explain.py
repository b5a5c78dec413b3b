"""Limits in force, put into words: "max_connections 1 of 2 since 12:03:11 (adaptive):
421 4.7.0 Trop de connexions". One phrasing for `relay provider show` and the status
page, from the JSON the admin API returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from relay.shaping.shaper import Limit

# the narrowing causes, as an admin reads them
_CAUSES = {
    "adaptive": "adaptive: halved on a throttle-kind reply",
    "throttle": "throttle rule",
    "slow start": "slow start",
}


def limit_json(limit: Limit) -> dict[str, Any]:
    """A limit as JSON: rates as written ("150/min") and per second, for scripts."""

    def value(v: object) -> Any:
        return v if v is None or isinstance(v, int) else str(v)

    return {
        "name": limit.name,
        "value": value(limit.value),
        "configured": value(limit.configured),
        "per_second": getattr(limit.value, "per_second", None),
        "why": limit.why,
        "since": limit.since,
        "until": limit.until,
        "reason": limit.reason,
    }


def local_clock(when: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(when))


def limit_phrase(
    limit: dict[str, Any], now: float, clock: Callable[[float], str] = local_clock
) -> str:
    value = "unlimited" if limit["value"] is None else str(limit["value"])
    if limit["why"] == "configured":
        return f"{limit['name']} {value} (configured)"
    configured = "unlimited" if limit["configured"] is None else str(limit["configured"])
    words = [f"{limit['name']} {value} of {configured}"]
    if limit["since"] is not None:
        words.append(f"since {clock(limit['since'])}")
    if limit["until"] is not None:
        words.append(f"until {clock(limit['until'])} ({span(limit['until'] - now)} left)")
    words.append(f"({_CAUSES.get(limit['why'], limit['why'])})")
    text = " ".join(words)
    return f"{text}: {limit['reason']}" if limit["reason"] else text


def span(seconds: float) -> str:
    """ "2d 3h", "9m 58s": two units are enough to read at a glance."""
    rest = max(0, int(seconds))
    parts: list[str] = []
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m"), (1, "s")):
        count, rest = divmod(rest, size)
        if count or parts:
            parts.append(f"{count}{unit}")
    return " ".join(parts[:2]) or "0s"
