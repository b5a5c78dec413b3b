"""Provider etiquette end to end: emulators with real reply texts, asserted from what they saw."""

from __future__ import annotations

import itertools
import re
import time

import pytest

from tests import providers as p
from tests.mxserver import Blackhole
from tests.relayproc import make_message
from tests.support import route, submit_many


def assert_suspended_then_delivered(relay, mx, quirk_off, seconds: float, address: str):
    """After the suspension is logged: no connection until it ends, then delivery."""
    relay.wait_log("suspended for")
    started = time.monotonic()
    connections = mx.connections
    quirk_off()
    # Nothing must reach the provider while it is suspended: watch (bounded) for it.
    assert not mx.wait_for(lambda: mx.connections > connections, timeout=seconds - 0.5), (
        "the relay connected during the suspension"
    )
    [message] = mx.wait_messages(1, timeout=20)
    assert message.rcpt_tos == [address]
    assert message.time - started >= seconds - 0.6
    relay.wait_log("resumed")


@pytest.mark.parametrize(
    ("domain", "stage", "reply"),
    [
        pytest.param("orange.fr", "rcpt", p.ORANGE_OFR_506, id="orange-ofr_506-at-RCPT"),
        pytest.param("laposte.net", "greeting", p.LAPOSTE_BUSY, id="postscreen-busy-at-greeting"),
        pytest.param("free.fr", "mail", p.FREE_TOO_MANY_ERRORS, id="free-errors-at-MAIL"),
        pytest.param(
            "facebook.com", "greeting", p.FACEBOOK_POL_P4, id="facebook-POL-P4-at-greeting"
        ),
    ],
)
def test_provider_reply_suspends_then_delivers(
    relay_factory, dns_server, mx_farm, domain, stage, reply
):
    route(dns_server, domain, "127.0.0.20")
    mx = mx_farm.server("127.0.0.20")
    quirk = p.Quirk(reply)
    if stage == "greeting":
        p.at_greeting(mx, reply)
    elif stage == "mail":
        mx.mail_hook = quirk
    else:
        mx.rcpt_hook = quirk

    def behave() -> None:
        quirk.off()
        mx.greeting = None

    relay = relay_factory(**p.shipped("3s"))
    relay.send("app@example.org", [f"user@{domain}"], make_message(reply))
    assert_suspended_then_delivered(relay, mx, behave, 3, f"user@{domain}")
    log = relay.log()
    assert reply in log  # the provider's own words are in the log line
    assert "status=bounced" not in log  # even the 5xx ones that mean "later"


def test_laposte_lpn007_510_is_retried_not_bounced(relay_factory, dns_server, mx_farm, example_org):
    route(dns_server, "laposte.net", "127.0.0.21")
    mx = mx_farm.server("127.0.0.21")
    mx.data_hook = p.Quirk(p.LAPOSTE_LATER, times=1)
    relay = relay_factory(**p.shipped("3s"))
    queue_id = relay.send("app@example.org", ["erin@laposte.net"], make_message("later"))
    mx.wait_messages(1)
    log = relay.wait_log(f"id={queue_id} to=<erin@laposte.net> provider=laposte")
    assert "dsn=5.5.0 status=deferred" in relay.wait_log("status=delivered")
    assert "status=bounced" not in log
    relay.stop()
    assert example_org.messages == []  # no DSN


def test_mailbox_full_452_is_retried(relay_factory, dns_server, mx_farm):
    route(dns_server, "example.test", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    mx.rcpt_hook = p.Quirk(p.MAILBOX_FULL, times=2)
    relay = relay_factory()
    relay.send("app@example.org", ["full@example.test"], make_message("quota"))
    mx.wait_messages(1)
    assert relay.log().count("dsn=4.2.2 status=deferred") == 2


def test_suspension_survives_a_restart(relay_factory, dns_server, mx_farm):
    route(dns_server, "orange.fr", "127.0.0.20")
    mx = mx_farm.server("127.0.0.20")
    quirk = p.Quirk(p.ORANGE_OFR_506)
    mx.rcpt_hook = quirk
    relay = relay_factory(**p.shipped("6s"))
    relay.send("app@example.org", ["alice@orange.fr"], make_message("persist"))
    relay.wait_log("suspended for")
    suspended_at = time.monotonic()
    quirk.off()
    assert relay.stop() == 0
    restarting_at = time.monotonic()
    relay.start()
    restored = re.findall(r"suspended for (\d+)s \(restored\): (.*)", relay.wait_log("(restored)"))
    assert len(restored) == 1, restored
    [(seconds, reason)] = restored
    assert reason == p.ORANGE_OFR_506
    # What is left of the 6 s, not a fresh suspension (the log rounds to the second):
    assert 0 <= int(seconds) <= 6.5 - (restarting_at - suspended_at), seconds
    connections = mx.connections
    remaining = 6 - (time.monotonic() - suspended_at)
    assert not mx.wait_for(lambda: mx.connections > connections, timeout=remaining - 0.5)
    assert mx.wait_messages(1, timeout=20)[0].rcpt_tos == ["alice@orange.fr"]


def test_throttle_rule_narrows_connections(relay_factory, dns_server, mx_farm):
    route(dns_server, "busy.test", "127.0.0.24")
    mx = mx_farm.server("127.0.0.24")
    mx.rcpt_hook = p.Quirk(p.TOO_MANY_CONNECTIONS, times=1)
    relay = relay_factory(
        providers={
            "busy": {
                "domains": ["busy.test"],
                "max_connections": 5,
                "max_messages_per_connection": 2,
                "rules": [
                    {
                        "match": "too many connections",
                        "action": "throttle",
                        "max_connections": 1,
                        "for": "1m",
                    }
                ],
            }
        }
    )
    relay.send("app@example.org", ["first@busy.test"], make_message("first"))
    relay.wait_log("throttled for 60s")
    opened = mx.connections
    submit_many(relay, lambda i: [f"u{i}@busy.test"], 40)
    messages = mx.wait_messages(41)
    assert len(mx.connect_times[opened:]) >= 20
    assert max(mx.transactions.values()) <= 2
    # After the throttle (all 41 were delivered after it), one connection at a time:
    # each connection's transactions end before the next connection's first one.
    spans: dict[int, list[float]] = {}
    for message in messages:
        spans.setdefault(message.connection, []).append(message.time)
    ordered = sorted((min(times), max(times)) for times in spans.values())
    overlapping = [(a, b) for a, b in itertools.pairwise(ordered) if b[0] < a[1]]
    assert not overlapping, f"{len(overlapping)} connections overlapped the one before"


def test_limits_hold_with_1000_queued(relay_factory, dns_server, mx_farm):
    route(dns_server, "orange.fr", "127.0.0.20")
    mx = mx_farm.server("127.0.0.20")
    relay = relay_factory(
        providers={
            "orange": {
                "domains": ["orange.fr", "wanadoo.fr"],
                "max_connections": 2,
                "max_messages_per_connection": 100,
            }
        },
        defaults={"max_recipients_per_message": 100},
    )
    submit_many(relay, lambda i: [f"user{i}@orange.fr"], 1000)
    mx.wait_messages(1000, timeout=120)
    assert mx.max_open <= 2, mx.max_open
    assert max(mx.transactions.values()) <= 100
    assert len(mx.messages) == 1000


def test_smooth_rate_is_never_exceeded(relay_factory, dns_server, mx_farm):
    route(dns_server, "paced.test", "127.0.0.25")
    mx = mx_farm.server("127.0.0.25")
    relay = relay_factory(
        providers={"paced": {"domains": ["paced.test"], "rate": "20/s", "max_connections": 4}}
    )
    submit_many(relay, lambda i: [f"u{i}@paced.test"], 41)
    messages = mx.wait_messages(41, timeout=60)
    times = sorted(m.time for m in messages)
    # 41 messages at 20/s: 40 intervals of 50 ms, so at least 2 s (the lower bound
    # cannot be met by a fast machine cheating; a slow one only takes longer).
    assert times[-1] - times[0] >= 40 * 0.05 * 0.95
    # and never a burst: no 10 messages within 0.4 s
    assert all(b - a >= 0.4 for a, b in zip(times, times[9:], strict=False))


def test_recipient_rate_makes_mail_to_one_mailbox_wait(relay_factory, dns_server, mx_farm):
    route(dns_server, "target.test", "127.0.0.26")
    mx = mx_farm.server("127.0.0.26")
    relay = relay_factory(defaults={"recipient_rate": "2/s"})
    submit_many(relay, lambda i: ["same@target.test"], 6, threads=1)
    messages = mx.wait_messages(6, timeout=30)
    times = sorted(m.time for m in messages)
    assert times[-1] - times[0] >= 5 * 0.5 * 0.95  # none dropped, all paced
    assert "status=bounced" not in relay.log()


def test_transactional_goes_before_a_bulk_backlog(relay_factory, dns_server, mx_farm):
    route(dns_server, "lists.test", "127.0.0.27")
    mx = mx_farm.server("127.0.0.27")
    relay = relay_factory(
        providers={"lists": {"domains": ["lists.test"], "max_connections": 2, "rate": "150/s"}}
    )
    submit_many(
        relay, lambda i: [f"member{i}@lists.test"], 2000, headers="List-Id: <news.example.org>\r\n"
    )
    submit_many(
        relay,
        lambda i: [f"urgent{i}@lists.test"],
        50,
        threads=2,
        headers="X-Kind: password reset\r\n",
    )
    messages = mx.wait_messages(2050, timeout=120)
    order = [m.rcpt_tos[0] for m in sorted(messages, key=lambda m: m.time)]
    last_urgent = max(i for i, a in enumerate(order) if a.startswith("urgent"))
    last_bulk = max(i for i, a in enumerate(order) if a.startswith("member"))
    assert last_urgent < last_bulk
    bulk_after = sum(1 for a in order[last_urgent:] if a.startswith("member"))
    assert bulk_after > 100, f"only {bulk_after} bulk messages were left behind transactional"
    log = relay.log()
    assert "class=bulk" in log and "class=transactional" in log


def test_a_dead_destination_does_not_slow_a_healthy_one(relay_factory, dns_server, mx_farm):
    route(dns_server, "blackhole.test", "127.0.0.30")
    hole = Blackhole(mx_farm, "127.0.0.30")
    route(dns_server, "refused.test", "127.0.0.31")  # nothing listens there
    route(dns_server, "healthy.test", "127.0.0.32")
    healthy = mx_farm.server("127.0.0.32")
    # The black hole costs each connection a full wait for a greeting that never comes
    # (bounded by the connect or the greeting timeout, whichever covers it); a refused
    # connection costs nothing.
    dead_wait = 6
    relay = relay_factory(
        retry={"initial": "20s", "max": "1m"},
        delivery={"connect_timeout": f"{dead_wait}s", "greeting_timeout": f"{dead_wait}s"},
    )
    with relay.client() as smtp:
        for i in range(50):
            smtp.sendmail(
                "app@example.org",
                [f"u{i}-{j}@blackhole.test" for j in range(10)],
                make_message(f"hole {i}"),
            )
            smtp.sendmail(
                "app@example.org",
                [f"u{i}-{j}@refused.test" for j in range(10)],
                make_message(f"refused {i}"),
            )
    started = time.monotonic()
    with relay.client() as smtp:
        for i in range(50):
            smtp.sendmail("app@example.org", [f"ok{i}@healthy.test"], make_message(f"ok {i}"))
    healthy.wait_messages(50, timeout=30)
    elapsed = time.monotonic() - started
    assert hole.connections > 0, "the black hole was not being tried meanwhile"
    # Alone, the 50 take well under a second. Had they queued behind the black hole they
    # would have waited out its connections: a full dead_wait, less the time its mail
    # took to submit.
    assert elapsed < dead_wait / 2, f"50 healthy messages took {elapsed:.2f}s"
    # The dead destinations each cost at most their connection limit, then a backoff:
    assert hole.connections <= 10
    relay.wait_log("refused.test unreachable")
    relay.wait_log("blackhole.test unreachable", timeout=dead_wait + 20)


def test_connection_rate_is_not_bypassed_by_parallel_workers(relay_factory, dns_server, mx_farm):
    route(dns_server, "conn.test", "127.0.0.28")
    mx = mx_farm.server("127.0.0.28")
    relay = relay_factory(
        providers={
            "conn": {
                "domains": ["conn.test"],
                "connection_rate": "10/s",
                "max_connections": 5,
                "max_messages_per_connection": 1,
            }
        }
    )
    submit_many(relay, lambda i: [f"u{i}@conn.test"], 21)
    mx.wait_messages(21, timeout=30)
    times = sorted(mx.connect_times)
    assert len(times) >= 21
    # 5 workers waiting for the same slot must not all take it: ≥ 100 ms between opens.
    assert times[20] - times[0] >= 20 * 0.1 * 0.95
