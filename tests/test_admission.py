"""Admission control end to end (SPEC §12): a class's backlog per provider has a cap,
RCPTs past it get 452 4.3.1, and the count stays exact under concurrent sessions."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import threading

from tests.relayproc import make_message
from tests.support import depth, listener_pid, route, scrape, wait_until

CAP = 30
DOWN = "421 4.3.0 Not now"


def bulk_config(password_hash: str, cap: int = CAP) -> dict[str, object]:
    """Account `lists` sends bulk (capped); `app` sends transactional (not capped)."""
    account = {"password": password_hash, "senders": ["*@example.org"]}
    return {
        "accounts": [
            {"name": "app", "class": "transactional", **account},
            {"name": "lists", "class": "bulk", **account},
        ],
        "classes": {"bulk": {"max_queued": cap}},
        "providers": {"orange": {"domains": ["orange.fr"]}},
    }


def refused_metric(relay, provider: str = "orange", class_name: str = "bulk") -> float:
    key = (("class", class_name), ("provider", provider))
    return scrape(relay)["relay_admission_refused_total"].get(key, -1.0)


def backlog(relay, provider: str = "orange", class_name: str = "bulk") -> float:
    """Recipients queued in any state, from one scrape (they move between states)."""
    return sum(
        value
        for labels, value in scrape(relay)["relay_queue_depth"].items()
        if ("provider", provider) in labels and ("class", class_name) in labels
    )


def delivered(mx) -> int:
    return sum(len(message.rcpt_tos) for message in mx.messages)


def fan_out(relay, threads: int, messages: int, recipients: int) -> list[tuple[int, str]]:
    """Bulk sessions in parallel, all starting together: every RCPT's (code, text)."""
    replies: list[tuple[int, str]] = []
    lock = threading.Lock()
    start = threading.Barrier(threads, timeout=30)

    def session(t: int) -> None:
        with relay.client(login="lists") as smtp:
            start.wait()
            for m in range(messages):
                assert smtp.mail("news@example.org")[0] == 250
                codes = []
                for r in range(recipients):
                    code, text = smtp.rcpt(f"u{t}-{m}-{r}@orange.fr")
                    codes.append(code)
                    with lock:
                        replies.append((code, text.decode()))
                if 250 in codes:
                    assert smtp.data(make_message(f"fan {t}-{m}"))[0] == 250
                else:
                    smtp.rset()

    pool = [threading.Thread(target=session, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(120)
    assert len(replies) == threads * messages * recipients, "a session did not finish"
    return replies


def test_bulk_fan_out_stops_at_the_cap_and_resumes_once_the_backlog_drains(
    relay_factory, dns_server, mx_farm, password_hash
):
    route(dns_server, "orange.fr", "127.0.0.30")
    mx = mx_farm.server("127.0.0.30")
    mx.greeting = DOWN  # nothing drains until the provider is back
    relay = relay_factory(**bulk_config(password_hash))

    replies = fan_out(relay, threads=8, messages=2, recipients=5)  # 80 RCPTs for 30 slots

    accepted = [text for code, text in replies if code == 250]
    refused = [text for code, text in replies if code != 250]
    assert len(accepted) == CAP
    assert refused and all(
        text.startswith("4.3.1 orange backlog full, try again later") for text in refused
    ), set(refused)
    assert {code for code, _ in replies} == {250, 452}
    assert refused_metric(relay) == len(refused)
    assert backlog(relay) == CAP
    assert relay.wait_log("admission: RCPT to orange.fr refused: provider=orange")

    # Transactional mail to the same provider has no cap.
    relay.send("app@example.org", ["vip@orange.fr"], make_message("password reset"))
    with relay.client(login="lists") as smtp:
        smtp.mail("news@example.org")
        code, text = smtp.rcpt("late@orange.fr")
        assert (code, text.decode()) == (452, "4.3.1 orange backlog full, try again later")
    assert refused_metric(relay) == len(refused) + 1

    # The provider is back: its backlog drains, and bulk is taken again.
    mx.greeting = None
    assert mx.wait_for(lambda: delivered(mx) == CAP + 1, timeout=60)
    assert wait_until(lambda: depth(relay, "orange", "deferred", "bulk") == 0)
    with relay.client(login="lists") as smtp:
        smtp.mail("news@example.org")
        assert smtp.rcpt("again@orange.fr")[0] == 250
        assert smtp.data(make_message("after the drain"))[0] == 250
    assert mx.wait_for(lambda: delivered(mx) == CAP + 2, timeout=30)
    assert refused_metric(relay) == len(refused) + 1


def test_slots_of_an_unfinished_transaction_are_freed_when_it_ends(
    relay_factory, dns_server, mx_farm, password_hash
):
    """RSET and a dropped connection give back what the transaction held; a message
    keeps its slots once queued."""
    route(dns_server, "orange.fr", "127.0.0.31")
    mx_farm.server("127.0.0.31").greeting = DOWN
    relay = relay_factory(**bulk_config(password_hash, cap=3))

    def rcpt(smtp: smtplib.SMTP, address: str) -> int:
        return int(smtp.rcpt(address)[0])

    with relay.client(login="lists") as holder, relay.client(login="lists") as other:
        holder.mail("news@example.org")
        assert [rcpt(holder, f"h{i}@orange.fr") for i in range(3)] == [250, 250, 250]
        other.mail("news@example.org")
        assert rcpt(other, "o1@orange.fr") == 452  # the holder's reservations count
        holder.rset()
        assert rcpt(other, "o1@orange.fr") == 250
        holder.mail("news@example.org")
        assert [rcpt(holder, f"h{i}@orange.fr") for i in range(3)] == [250, 250, 452]
        holder.sock.shutdown(socket.SHUT_RDWR)  # gone without QUIT: its two slots come back
        assert wait_until(lambda: rcpt(other, "o2@orange.fr") == 250, timeout=10)
        assert rcpt(other, "o3@orange.fr") == 250
        assert other.data(make_message("three"))[0] == 250
    with relay.client(login="lists") as smtp:  # the message holds the three slots now
        smtp.mail("news@example.org")
        assert rcpt(smtp, "late@orange.fr") == 452
    assert backlog(relay) == 3


def test_a_lost_listener_process_leaves_no_slot_behind(
    relay_factory, dns_server, mx_farm, password_hash
):
    route(dns_server, "orange.fr", "127.0.0.34")
    relay = relay_factory(**bulk_config(password_hash, cap=2))
    first = listener_pid(relay)
    assert first is not None
    with relay.client(login="lists") as smtp:
        smtp.mail("news@example.org")
        assert [smtp.rcpt(f"h{i}@orange.fr")[0] for i in range(3)] == [250, 250, 452]
        os.kill(first, signal.SIGKILL)  # with the transaction open: no RSET, no QUIT
    relay.wait_log("the listener process exited")
    assert wait_until(lambda: listener_pid(relay) not in (None, first))
    with relay.client(login="lists") as smtp:
        smtp.mail("news@example.org")
        assert [smtp.rcpt(f"n{i}@orange.fr")[0] for i in range(3)] == [250, 250, 452]


def test_a_capped_rcpt_is_answered_while_the_relay_drains(
    relay_factory, dns_server, mx_farm, password_hash
):
    """The listener process still reads its answers while it waits for sessions to end."""
    route(dns_server, "orange.fr", "127.0.0.35")
    mx = mx_farm.server("127.0.0.35")
    relay = relay_factory(**bulk_config(password_hash, cap=1))
    with relay.client(login="lists") as smtp:
        smtp.mail("news@example.org")
        relay.proc.send_signal(signal.SIGTERM)
        relay.wait_log("shutting down")
        assert smtp.rcpt("a@orange.fr")[0] == 250
        assert smtp.rcpt("b@orange.fr")[0] == 452
        assert smtp.data(make_message("in flight"))[0] == 250
    assert relay.proc.wait(60) == 0
    relay.start()
    assert mx.wait_messages(1)[0].rcpt_tos == ["a@orange.fr"]


def test_the_cap_is_per_site_for_domains_without_a_provider(
    relay_factory, dns_server, mx_farm, password_hash
):
    """Two domains on one MX host share one backlog; another host has its own."""
    for domain in ("one.test", "two.test"):
        dns_server.mx(domain, (10, "mx.shared.test"))
    dns_server.add("mx.shared.test", "A", "127.0.0.32")
    route(dns_server, "three.test", "127.0.0.33")
    for ip in ("127.0.0.32", "127.0.0.33"):
        mx_farm.server(ip).greeting = DOWN
    relay = relay_factory(**bulk_config(password_hash, cap=2))
    with relay.client(login="lists") as smtp:
        smtp.mail("news@example.org")
        codes = [smtp.rcpt(a)[0] for a in ("a@one.test", "b@two.test", "c@one.test")]
        assert codes == [250, 250, 452]
        assert smtp.rcpt("d@three.test")[0] == 250
        code, text = smtp.rcpt("e@two.test")
        assert (code, text.decode()) == (
            452,
            "4.3.1 default:mx.shared.test backlog full, try again later",
        )
    assert refused_metric(relay, "default") == 2
