"""Parsers for the units the YAML speaks: durations, sizes and rates.

Each raises ValueError with a sentence fit to follow "key.path: ".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB|k|K|M|G)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "k": 1024,
    "K": 1024,
    "M": 1024**2,
    "G": 1024**3,
}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour|d|day)\s*$")
_RATE_UNITS = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
}


# Ten years. Anything longer is a typo or an attack: a NaN, an infinity or a 400-digit
# number would otherwise reach timers, heaps and time.localtime() and fail there, far from
# the key or request that carried it.
MAX_DURATION = 3650 * 86400.0
_DURATION_HINT = 'expected a duration like "30s", "5m", "4h" or "5d"'


def _shown(value: object) -> str:
    """The offending value for an error sentence, cut short: a 400-digit number is quoted
    by its start (and repr() of a 5,000-digit int raises ValueError itself)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return "a number too large"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True, slots=True)
class Rate:
    """`count` events per `period` seconds, as written ("300/min")."""

    count: float
    period: float
    text: str

    @property
    def per_second(self) -> float:
        return self.count / self.period

    def __str__(self) -> str:
        return self.text


def parse_duration(value: object) -> float:
    """ "30s", "5m", "4h", "5d" (a bare number is seconds) → seconds, finite and at most
    `MAX_DURATION`. JSON and YAML both spell NaN and infinities as numbers (`NaN`, `1e400`,
    `.inf`); every such value is refused here, so no caller has to remember to."""
    if isinstance(value, bool):
        raise ValueError(_DURATION_HINT)
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an int with hundreds of digits
            seconds = math.inf
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"{_DURATION_HINT}, got {_shown(value)}")
        # float() of a 400-digit string is inf, not an error: checked below like the rest.
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
    if not math.isfinite(seconds) or seconds > MAX_DURATION:
        raise ValueError(f"expected a finite duration of at most 3650d, got {_shown(value)}")
    if seconds < 0:
        raise ValueError("expected a duration that is not negative")
    return seconds


def parse_size(value: object) -> int:
    """ "512KiB", "25MiB" (a bare number is bytes) → bytes."""
    if isinstance(value, bool):
        raise ValueError('expected a size like "512KiB" or "25MiB"')
    if isinstance(value, int):
        if value < 0:
            raise ValueError("expected a size that is not negative")
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f'expected a size like "512KiB" or "25MiB", got {value!r}')
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def parse_rate(value: object) -> Rate:
    """ "300/min", "10/s", "2000/h", "5000/d" → Rate."""
    match = _RATE.match(str(value)) if isinstance(value, str) else None
    if not match:
        raise ValueError(f'expected "N/unit" like "300/min", got {_shown(value)}')
    count = float(match.group(1))
    # A 400-digit count is inf: a token bucket with an infinite rate is no limit at all.
    if not math.isfinite(count) or count <= 0:
        raise ValueError(f'expected a positive rate like "300/min", got {_shown(value)}')
    return Rate(count, _RATE_UNITS[match.group(2)], str(value).strip())
