"""Sites end to end: connections belong to the MX host, limits hold at the socket level.

SPEC §2 and §5: a connection open to an MX host carries mail for every domain hosted
there, one transaction per domain; a destination never sees more than `max_connections`
open, even while connections churn or a reload lowers the limit; an unreachable site backs
off alone; domains are normalised (UTS #46) before routing; the greeting has its own
timeout, and a connection still waiting for it holds no mail. The servers count
connections from the transport's connection_made to the client's FIN (tests/mxserver.py).
"""

from __future__ import annotations

import re
import signal
import time
from collections import Counter

import yaml

from tests.relayproc import make_message
from tests.support import route, scrape, submit_many, wait_until

ORANGE_DOMAINS = ["orange.fr", "wanadoo.fr", "client.example"]  # the last: a customer's


def orange_provider(**limits: object) -> dict[str, object]:
    return {
        "orange": {
            "domains": ["orange.fr", "wanadoo.fr"],
            "mx": ["*.orange.fr"],
            "max_connections": 2,
            "max_messages_per_connection": 3,
            **limits,
        }
    }


def orange_site(dns_server, mx_farm, ip: str):  # type: ignore[no-untyped-def]
    """orange.fr, wanadoo.fr and a customer domain, all hosted on smtp-in.orange.fr."""
    for domain in ORANGE_DOMAINS:
        dns_server.mx(domain, (10, "smtp-in.orange.fr"))
    dns_server.add("smtp-in.orange.fr", "A", ip)
    return mx_farm.server(ip)


def attempt_line(relay, address: str) -> str:  # type: ignore[no-untyped-def]
    """The first delivery log line for `address` (waits for it, bounded)."""
    relay.wait_log(f"to=<{address}>")
    return next(line for line in relay.log().splitlines() if f"to=<{address}>" in line)


def queue_depth(relay) -> Counter[str]:  # type: ignore[no-untyped-def]
    """relay_queue_depth summed over providers and classes, by state."""
    states: Counter[str] = Counter()
    for labels, value in scrape(relay)["relay_queue_depth"].items():
        states[dict(labels)["state"]] += int(value)
    return states


def test_one_connection_carries_every_domain_hosted_on_the_mx(relay_factory, dns_server, mx_farm):
    mx = orange_site(dns_server, mx_farm, "127.0.0.40")
    relay = relay_factory(providers=orange_provider())
    expected = [f"u{i}@{ORANGE_DOMAINS[i % 3]}" for i in range(60)]
    with relay.client() as smtp:
        for i, address in enumerate(expected):  # interleaved: orange, wanadoo, customer, ...
            assert smtp.sendmail("app@example.org", [address], make_message(f"m{i}")) == {}
    messages = mx.wait_messages(60, timeout=60)
    assert sorted(r for m in messages for r in m.rcpt_tos) == sorted(expected)
    assert mx.max_open <= 2, f"{mx.max_open} connections open at once, limit 2"
    assert max(mx.transactions.values()) <= 3
    # 60 transactions, 3 per connection: 20 connections would do. A connection kept to one
    # recipient domain would need one per message here (the domains alternate).
    assert mx.connections <= 35, f"{mx.connections} connections for 60 messages"
    mixed = sum(
        1
        for conn in mx.transactions
        if len({r.rsplit("@", 1)[1] for m in messages if m.connection == conn for r in m.rcpt_tos})
        > 1
    )
    print(f"\n60 messages over {mx.connections} connections, {mixed} of them to several domains")
    # the customer's domain is Orange's mail too: routed by its MX, under Orange's limits
    assert "provider=orange" in attempt_line(relay, "u2@client.example")


def test_connections_that_churn_never_overlap(relay_factory, dns_server, mx_farm):
    route(dns_server, "churn.test", "127.0.0.41")
    mx = mx_farm.server("127.0.0.41")
    relay = relay_factory(
        providers={
            "churn": {
                "domains": ["churn.test"],
                "max_connections": 1,
                "max_messages_per_connection": 1,
            }
        }
    )
    submit_many(relay, lambda i: [f"u{i}@churn.test"], 100)
    mx.wait_messages(100, timeout=90)
    assert mx.connections >= 100  # one message per connection: each closed, the next opened
    assert mx.max_open == 1, f"{mx.max_open} connections open at once, limit 1"
    assert max(mx.transactions.values()) == 1


def test_a_reload_to_fewer_connections_holds_at_the_destination(relay_factory, dns_server, mx_farm):
    route(dns_server, "reload.test", "127.0.0.42")
    mx = mx_farm.server("127.0.0.42")
    provider = {
        "domains": ["reload.test"],
        "max_connections": 2,
        "max_messages_per_connection": 5,
        "rate": "40/s",  # 240 messages take six seconds: the reload lands mid-stream
    }
    relay = relay_factory(providers={"reload": provider})
    submit_many(relay, lambda i: [f"u{i}@reload.test"], 240)
    assert mx.wait_for(lambda: mx.max_open == 2), "the relay never used its two connections"
    relay.config["providers"] = {"reload": {**provider, "max_connections": 1}}
    relay.config_path.write_text(yaml.safe_dump(relay.config))
    relay.proc.send_signal(signal.SIGHUP)
    relay.wait_log("configuration reloaded")
    # Connections open under the old limit finish their transaction and close; from the
    # moment all of them are gone, one connection at a time.
    before = mx.open_connections()
    assert mx.wait_for(lambda: not (before & mx.open_ids), timeout=20), (
        "connections opened before the reload stayed open"
    )
    mx.reset_max_open()
    delivered_at_reload = len(mx.messages)
    mx.wait_messages(240, timeout=60)
    assert 240 - delivered_at_reload >= 50, "too few messages left after the reload to tell"
    assert mx.max_open <= 1, f"{mx.max_open} connections open at once after the reload to 1"


def test_outsiders_on_dead_mx_hosts_do_not_hold_up_the_provider(relay_factory, dns_server, mx_farm):
    mx = orange_site(dns_server, mx_farm, "127.0.0.43")
    # outsider.example: its first MX matches Orange's pattern but does not exist
    # (NXDOMAIN); the second refuses connections: nothing listens on 127.0.0.44.
    dns_server.mx("outsider.example", (10, "ghost.orange.fr"), (20, "mx.outsider.example"))
    dns_server.add("mx.outsider.example", "A", "127.0.0.44")
    # deadbox.example: its only MX matches the pattern and exists, and refuses connections:
    # routed to Orange by its MX, whatever routing makes of the other one.
    dns_server.mx("deadbox.example", (10, "dead.orange.fr"))
    dns_server.add("dead.orange.fr", "A", "127.0.0.44")
    relay = relay_factory(providers=orange_provider(), retry={"initial": "5m", "max": "1h"})
    started = time.monotonic()
    relay.send("app@example.org", ["x@outsider.example"], make_message("outsider"))
    relay.send("app@example.org", ["y@deadbox.example"], make_message("dead box"))
    relay.send("app@example.org", ["alice@orange.fr"], make_message("queued behind them"))
    assert "status=deferred" in attempt_line(relay, "x@outsider.example")
    line = attempt_line(relay, "y@deadbox.example")
    assert "provider=orange" in line and "status=deferred" in line, line
    relay.send("app@example.org", ["bob@wanadoo.fr"], make_message("after their failure"))
    messages = mx.wait_messages(2, timeout=10)
    assert sorted(r for m in messages for r in m.rcpt_tos) == ["alice@orange.fr", "bob@wanadoo.fr"]
    print(f"\nOrange's mail delivered {time.monotonic() - started:.2f}s after the outsiders'")
    suspended = scrape(relay)["relay_provider_suspended"]
    assert suspended[(("egress", "default"), ("provider", "orange"))] == 0
    assert "status=bounced" not in relay.log()  # the outsiders wait for their retry


def test_a_full_width_domain_is_the_provider_domain(relay_factory, dns_server, mx_farm):
    dns_server.mx("free.fr", (10, "mx1.free.fr"))
    dns_server.add("mx1.free.fr", "A", "127.0.0.45")
    mx = mx_farm.server("127.0.0.45")
    relay = relay_factory(providers={"free": {"domains": ["free.fr"], "max_connections": 1}})
    with relay.client() as smtp:
        code, reply = smtp.mail("app@example.org", ["SMTPUTF8"])
        assert code == 250, reply
        # U+FF46 FULLWIDTH LATIN SMALL LETTER F; then upper case: all are free.fr (UTS #46)
        for address in ["anne@\uff46ree.fr", "bea@free.fr", "Carl@FREE.FR"]:
            code, reply = smtp.rcpt(address)
            assert code == 250, (address, code, reply)
        code, reply = smtp.data(make_message("full width"))
        assert code == 250, reply
    [message] = mx.wait_messages(1)  # one domain after normalising: one transaction
    assert sorted(message.rcpt_tos) == ["Carl@free.fr", "anne@free.fr", "bea@free.fr"]
    assert "provider=free" in attempt_line(relay, "anne@free.fr")
    delivered = (
        ("class", "transactional"),
        ("egress", "default"),
        ("outcome", "delivered"),
        ("provider", "free"),
    )
    assert wait_until(lambda: scrape(relay)["relay_deliveries_total"].get(delivered) == 3)
    assert not [name for name, _ in dns_server.queries if "xn--" in name or "\uff46" in name]


def test_queue_depth_states_add_up_to_every_queued_recipient(relay_factory, dns_server, mx_farm):
    route(dns_server, "stalled.test", "127.0.0.46")
    stalled = mx_farm.server("127.0.0.46")
    stalled.stall_data()  # transactions hang after the content: their recipients are active
    route(dns_server, "refused.test", "127.0.0.47")  # nothing listens: deferred
    relay = relay_factory(
        defaults={"max_connections": 2},
        retry={"initial": "5m", "max": "1h"},
        delivery={"data_done_timeout": "2m"},
    )
    with relay.client() as smtp:
        for i in range(10):
            recipients = [f"u{i}-{j}@stalled.test" for j in range(50)]
            recipients += [f"u{i}-{j}@refused.test" for j in range(50)]
            assert smtp.sendmail("app@example.org", recipients, make_message(f"m{i}")) == {}
    try:
        assert stalled.wait_for(lambda: stalled.stalled() >= 1), "no transaction reached the MX"
        relay.wait_log("@refused.test> ")  # its first attempt failed

        def settled() -> bool:  # active: exactly the recipients of the hanging transactions
            states = queue_depth(relay)
            return states["active"] == 50 * stalled.stalled() and states["deferred"] > 0

        assert wait_until(settled), (queue_depth(relay), stalled.stalled())
        for _ in range(5):  # several scrapes, each exact
            states = queue_depth(relay)
            assert sum(states.values()) == 1000, states
        print(f"\n1,000 queued recipients by state: {dict(states)}")
    finally:
        stalled.release()  # the stalled site's 500 recipients are delivered
    assert stalled.wait_for(lambda: len(stalled.recipients()) == 500, timeout=60)
    # the other 500 still count, none of them active
    assert wait_until(lambda: sum(queue_depth(relay).values()) == 500), queue_depth(relay)
    states = queue_depth(relay)
    assert states["active"] == 0 and sum(states.values()) == 500, states


def test_a_late_greeting_is_waited_for_apart_from_the_connect(relay_factory, dns_server, mx_farm):
    route(dns_server, "postscreen.test", "127.0.0.48")
    mx = mx_farm.server("127.0.0.48")
    mx.greeting_delay = 3.0  # postscreen's greet pause: TCP at once, the 220 three seconds later
    relay = relay_factory(
        delivery={"connect_timeout": "1s"},  # greeting_timeout stays at its 5m default
        retry={"initial": "5m", "max": "1h"},
    )
    relay.send("app@example.org", ["late@postscreen.test"], make_message("patience"))
    [message] = mx.wait_messages(1, timeout=30)
    assert message.time - mx.connect_times[0] >= 2.9  # the greeting really came late
    assert "status=deferred" not in relay.log()


def test_connections_waiting_for_a_greeting_hold_no_mail(relay_factory, dns_server, mx_farm):
    route(dns_server, "busy.test", "127.0.0.49")
    mx = mx_farm.server("127.0.0.49")
    mx.serve_at_most(2)  # two smtpd "processes": other connections wait for their 220
    relay = relay_factory(
        delivery={"connect_timeout": "1s", "idle_connection_timeout": "10s"},
        retry={"initial": "5m", "max": "1h"},
    )
    started = time.monotonic()
    with relay.client() as smtp:
        for i in range(10):
            refused = smtp.sendmail("app@example.org", [f"u{i}@busy.test"], make_message(f"b{i}"))
            assert refused == {}
    # The two greeted connections carry everything. Mail given to a connection still waiting
    # for its greeting would wait for a process to come free: an idle timeout (10 s) each.
    messages = mx.wait_messages(10, timeout=20)
    assert len({m.connection for m in messages}) <= 2
    print(f"\n10 messages through 2 sessions in {time.monotonic() - started:.2f}s")
    assert not re.search(r"status=(deferred|bounced)", relay.log())
