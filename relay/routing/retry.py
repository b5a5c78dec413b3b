"""When to try again: exponential backoff with jitter, bounded by the lifetime."""

from __future__ import annotations

import random

from relay.config.model import Retry


def backoff(retry: Retry, attempts: int) -> float:
    """Delay before the attempt after `attempts` failures: initial * 2^(n-1), capped, ±10 %."""
    delay = min(retry.max, retry.initial * 2.0 ** max(0, attempts - 1))
    return delay * random.uniform(0.9, 1.1)


def expired(retry: Retry, received_at: float, now: float) -> bool:
    return now - received_at >= retry.lifetime
