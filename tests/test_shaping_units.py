"""GCRA and the lane shaper with a fake clock: microseconds, no sockets."""

from __future__ import annotations

import itertools
import re

from relay.config import parse_config, parse_rate
from relay.config.model import Rule
from relay.shaping.rate import Gcra, KeyedGcra
from relay.shaping.shaper import Shaper


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run_events(bucket: Gcra, seconds: float, clock: Clock) -> list[float]:
    """Take every event the bucket allows, as a busy sender would, for `seconds`."""
    times, end = [], clock.now + seconds
    while clock.now < end:
        wait = bucket.delay(clock.now)
        if wait > 0:
            clock.now += wait
            continue
        bucket.take(clock.now)
        times.append(clock.now)
    return times


def test_gcra_is_smooth_and_exact():
    clock = Clock()
    times = run_events(Gcra(parse_rate("300/min")), 60, clock)
    assert len(times) == 300
    gaps = {round(b - a, 6) for a, b in itertools.pairwise(times)}
    assert gaps == {0.2}  # evenly spaced, never a burst at the start of the minute


def test_gcra_burst_and_refund():
    clock = Clock()
    bucket = Gcra(parse_rate("1/s"), burst=3)
    for _ in range(3):
        assert bucket.delay(clock.now) == 0
        bucket.take(clock.now)
    assert bucket.delay(clock.now) > 0
    bucket.refund()
    assert bucket.delay(clock.now) == 0


def test_keyed_gcra_forgets_idle_mailboxes():
    clock = Clock()
    buckets = KeyedGcra(parse_rate("1/s"), prune_above=100)
    for i in range(100):
        buckets.take(f"user{i}@x.test", clock.now)
    assert buckets.delay("user1@x.test", clock.now) == 1.0
    clock.now += 5
    buckets.take("new@x.test", clock.now)
    assert len(buckets) == 1


def _shaper(clock: Clock, **shaping: object) -> Shaper:
    config = parse_config(
        {"defaults": shaping, "classes": {"bulk": {"priority": 1, "rate": "1/s"}}}
    )
    return Shaper(config.defaults, config.classes, clock)


def test_slow_start_doubles_to_the_limit():
    shaper = _shaper(Clock(), max_connections=8)
    assert shaper.max_connections() == 8
    shaper.restart_slowly()
    seen = [shaper.max_connections()]
    while shaper.succeeded():
        seen.append(shaper.max_connections())
    assert seen == [1, 2, 4, 8]


def test_throttle_narrows_then_expires():
    clock = Clock()
    shaper = _shaper(clock, max_connections=10, rate="100/s")
    shaper.throttle(Rule(re.compile("x"), "throttle", 60, parse_rate("1/s"), 2))
    assert shaper.max_connections() == 2
    shaper.take_message("transactional")
    assert 0.99 < shaper.provider_delay() <= 1.0
    clock.now += 61
    assert shaper.max_connections() == 10
    assert shaper.provider_delay() < 0.011


def test_class_rate_is_separate_from_the_provider():
    clock = Clock()
    shaper = _shaper(clock)
    shaper.take_message("bulk")
    assert shaper.class_delay("bulk") == 1.0
    assert shaper.class_delay("transactional") == 0
