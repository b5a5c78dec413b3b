"""Parsers for the units the YAML speaks: durations, sizes and rates.

Each raises ValueError with a sentence fit to follow "key.path: ".
"""

from __future__ import annotations

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
    """ "30s", "5m", "4h", "5d" (a bare number is seconds) → seconds."""
    if isinstance(value, bool):
        raise ValueError('expected a duration like "30s", "5m", "4h" or "5d"')
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("expected a duration that is not negative")
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f'expected a duration like "30s", "5m", "4h" or "5d", got {value!r}')
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]


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
        raise ValueError(f'expected "N/unit" like "300/min", got {value!r}')
    count = float(match.group(1))
    if count <= 0:
        raise ValueError(f'expected a positive rate like "300/min", got {value!r}')
    return Rate(count, _RATE_UNITS[match.group(2)], str(value).strip())
