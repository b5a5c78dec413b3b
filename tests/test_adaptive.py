"""Adaptive limits (SPEC §12): a throttle-kind reply halves a provider's connections and
rate; clean transactions win them back, one step per CLEAN_STEP. The arithmetic on a
fake clock, then a relay against an MX that refuses every connection past the first."""

from __future__ import annotations

import re

from relay.config.model import Rule, Shaping
from relay.config.units import parse_rate
from relay.delivery.classify import throttle_kind
from relay.reply import Reply
from relay.shaping.adaptive import CLEAN_STEP, Adaptive
from relay.shaping.shaper import Shaper
from tests.support import route, scrape, submit_many, wait_until

TROP = "421 4.7.0 Trop de connexions"


def shaping(max_connections: int = 8, rate: str | None = "600/min", adaptive: bool = True):
    return Shaping(
        max_connections=max_connections,
        max_messages_per_connection=100,
        max_recipients_per_message=100,
        rate=parse_rate(rate) if rate else None,
        connection_rate=None,
        recipient_rate=None,
        route=None,
        tls="opportunistic",
        rules=(),
        adaptive=adaptive,
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_cut_halves_what_is_open_and_the_rate_once_per_incident():
    adaptive = Adaptive(8, parse_rate("600/min"))
    assert adaptive.reduce(open_connections=8, reason=TROP, now=5.0)
    assert (adaptive.connections, adaptive.rate.per_second) == (4, 5.0)
    # Only 3 open when the next refusal comes: what the receiver took is what counts.
    # The same burst (nothing delivered between): the rate is not cut again.
    adaptive.reduce(open_connections=3, reason=TROP, now=6.0)
    assert (adaptive.connections, adaptive.rate.per_second) == (1, 5.0)
    assert adaptive.cut is not None and adaptive.cut.at == 6.0 and adaptive.cut.reason == TROP


def test_the_rate_never_goes_below_one():
    adaptive = Adaptive(2, parse_rate("8/min"))
    for _ in range(10):  # incidents, each after a delivery
        adaptive.reduce(open_connections=1, reason=TROP, now=7.0)
        adaptive.delivered()
    assert adaptive.connections == 1
    assert adaptive.rate.count == 1 and adaptive.rate.period == 60


def test_each_step_of_clean_transactions_adds_a_connection_and_doubles_the_rate():
    adaptive = Adaptive(3, parse_rate("600/min"))
    adaptive.reduce(3, TROP, 0.0)
    assert (adaptive.connections, str(adaptive.rate)) == (1, "300/min")
    widened = [adaptive.delivered() for _ in range(CLEAN_STEP)]
    assert widened == [False] * (CLEAN_STEP - 1) + [True]
    assert (adaptive.connections, str(adaptive.rate)) == (2, "600/min")
    assert adaptive.narrowed  # connections still below 3
    for _ in range(CLEAN_STEP):
        adaptive.delivered()
    assert not adaptive.narrowed and adaptive.cut is None
    assert not adaptive.delivered()  # nothing left to win back


def test_a_reload_keeps_the_cut_within_the_new_limits():
    adaptive = Adaptive(8, parse_rate("600/min"))
    adaptive.reduce(8, TROP, 0.0)
    adaptive.reconfigure(6, parse_rate("1200/min"))
    assert (adaptive.connections, str(adaptive.rate)) == (4, "300/min")
    assert adaptive.narrowed and adaptive.cut is not None
    # New limits at or below the cut: they are the limits, nothing is cut any more.
    adaptive.reconfigure(2, parse_rate("60/min"))
    assert (adaptive.connections, str(adaptive.rate)) == (2, "60/min")
    assert not adaptive.narrowed and adaptive.cut is None


def test_the_shaper_explains_each_limit_by_what_narrows_it():
    clock = FakeClock()
    shaper = Shaper(shaping(max_connections=4), {}, clock)
    assert [(limit.name, limit.why) for limit in shaper.limits(0.0)] == [
        ("max_connections", "configured"),
        ("rate", "configured"),
    ]
    assert shaper.reduce(4, TROP, now=100.0)
    connections, rate = shaper.limits(200.0)
    assert (connections.value, connections.why, connections.since) == (2, "adaptive", 100.0)
    assert connections.reason == TROP
    assert str(rate.value) == "300/min" and rate.why == "adaptive"
    assert shaper.max_connections() == 2 and not shaper.at_rest()
    rule = Rule(re.compile("x"), "throttle", duration=600.0, max_connections=1)
    shaper.throttle(rule, "421 4.7.0 slow down")
    connections, _ = shaper.limits(200.0)
    assert (connections.value, connections.why, connections.until) == (1, "throttle", 800.0)
    clock.now += 601
    assert shaper.limits(200.0)[0].why == "adaptive"  # the throttle ended, the cut stays


def test_the_cut_rate_spaces_messages_twice_as_far():
    clock = FakeClock()
    shaper = Shaper(shaping(rate="60/min"), {}, clock)
    shaper.take_message("transactional")
    assert shaper.provider_delay() == 1.0
    shaper.reduce(8, TROP, now=0.0)
    shaper.take_message("transactional")
    assert shaper.provider_delay() == 2.0


def test_limits_from_another_node_are_taken_within_ours():
    shaper = Shaper(shaping(max_connections=4, rate="600/min"), {}, FakeClock())
    assert shaper.assume(2, parse_rate("150/min"), TROP + " (from node b)", at=50.0)
    connections, rate = shaper.limits(60.0)
    assert (connections.value, connections.why, connections.since) == (2, "adaptive", 50.0)
    assert str(rate.value) == "150/min" and "from node b" in rate.reason
    assert not shaper.assume(2, parse_rate("150/min"), "again", at=51.0)  # nothing new
    assert shaper.assume(9, None, "restored", at=52.0)
    assert shaper.max_connections() == 4 and shaper.at_rest()


def test_adaptive_false_leaves_the_limits_alone():
    shaper = Shaper(shaping(adaptive=False), {}, FakeClock())
    assert not shaper.reduce(8, TROP, now=0.0)
    assert shaper.max_connections() == 8


def test_which_replies_are_of_the_throttle_kind():
    assert throttle_kind(Reply.parse(421, "4.7.0 Trop de connexions"), None)
    assert throttle_kind(Reply.parse(421, "4.7.0 Too many connections from your host"), None)
    assert throttle_kind(Reply.parse(421, "Too many concurrent SMTP connections"), None)
    assert not throttle_kind(Reply.parse(421, "4.3.2 Service shutting down"), None)
    assert not throttle_kind(Reply.parse(451, "4.7.0 Trop de connexions"), None)
    assert not throttle_kind(Reply.local(421, "4.7.0", "too many connections"), None)
    rule = Rule(re.compile("slow"), "throttle", duration=60.0, rate=parse_rate("1/s"))
    assert throttle_kind(Reply.parse(450, "4.7.1 slow down"), rule)


def test_the_relay_converges_to_what_the_receiver_takes(relay_factory, dns_server, mx_farm):
    """An MX that answers `421 4.7.0 Trop de connexions` to any connection past the first:
    relay cuts to one connection, delivers everything, and tries a second one only once
    per CLEAN_STEP delivered transactions."""
    route(dns_server, "orange.test", "127.0.0.61")
    mx = mx_farm.server("127.0.0.61")
    mx.crowd_limit = 1
    count = 200
    relay = relay_factory(
        providers={
            "orange": {
                "domains": ["orange.test"],
                "max_connections": 4,
                "max_messages_per_connection": 20,
                "rate": "6000/min",
            }
        },
        retry={"initial": "1s", "max": "2s", "lifetime": "1h"},
    )
    submit_many(relay, lambda i: [f"user{i}@orange.test"], count, threads=4)
    mx.wait_messages(count, timeout=90)
    delivered = mx.recipients()
    assert sorted(delivered) == sorted(f"user{i}@orange.test" for i in range(count))
    # Up to 3 refusals while the first connections open together; after that, one try
    # of a second connection per step of clean transactions.
    refusals = len(mx.crowded)
    assert 1 <= refusals <= 3 + count // CLEAN_STEP + 1, (refusals, relay.log()[-4000:])

    shown = relay.cli("provider", "show", "orange")
    assert shown.returncode == 0, shown.stderr
    first = shown.stdout.splitlines()[1]
    assert re.match(r"  max_connections [12] of 4 since \d\d:\d\d:\d\d \(adaptive", first), (
        shown.stdout
    )
    assert first.endswith(TROP), shown.stdout
    # The rate was halved once, for the first burst; steps of clean deliveries double it
    # back, faster than connections come back one by one.
    rate = shown.stdout.splitlines()[2]
    assert rate in ("  rate 6000/min (configured)",) or rate.startswith(
        "  rate 3000/min of 6000/min"
    )
    limits = scrape(relay)["relay_provider_limit"]
    key = (("egress", "default"), ("limit", "max_connections"), ("provider", "orange"))
    assert limits[key] in (1, 2)
    assert wait_until(lambda: not relay.api("GET", "/api/queue")[1]["messages"], timeout=20)
    assert "queue=orange adaptive limits: max_connections 1" in relay.log()
