"""The relay as users run it: `relay serve` subprocess, smtplib in, real DNS, real MX servers."""

from __future__ import annotations

import email
import email.policy
import smtplib

import pytest

from tests.relayproc import make_message
from tests.support import wait_until


def _dsn_parts(data: bytes) -> tuple[email.message.EmailMessage, list[dict[str, str]]]:
    """Parse a DSN; return the message and its per-recipient delivery-status fields."""
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    status = next(
        p for p in message.iter_parts() if p.get_content_type() == "message/delivery-status"
    )
    blocks = [dict(b.items()) for b in status.get_payload()]
    return message, blocks[1:]


def test_delivers_with_headers_intact(relay_factory, dns_server, mx_farm):
    dns_server.mx("example.test", (10, "mx1.example.test"))
    dns_server.add("mx1.example.test", "A", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    relay = relay_factory()
    body = "Line one\r\n.leading dot stays\r\n..two dots\r\nCaf\u00e9 \u2615\r\n"
    queue_id = relay.send(
        "app@example.org",
        ["bob@example.test"],
        make_message("Greetings", body, "X-Custom: kept\r\n")
        .replace(b"Hello.", b"")
        .decode("utf-8")
        .encode("utf-8"),
    )
    [received] = mx.wait_messages(1)
    assert received.mail_from == "app@example.org"
    assert received.rcpt_tos == ["bob@example.test"]
    parsed = email.message_from_bytes(received.data, policy=email.policy.default)
    assert parsed["Subject"] == "Greetings"
    assert parsed["X-Custom"] == "kept"
    assert parsed["Message-ID"] == f"<{queue_id}@relay.test>"  # added: it was missing
    assert parsed["Date"]
    assert f"by relay.test (relay) with ESMTPSA id {queue_id}" in " ".join(
        parsed["Received"].split()
    )
    assert received.data.endswith(b"\r\n\r\n" + body.encode("utf-8"))
    relay.wait_log(
        f"id={queue_id} to=<bob@example.test> provider=default relay=mx1.example.test[127.0.0.2]"
    )
    # Delivered: nothing left behind (the files go after the outcome is logged).
    assert wait_until(lambda: relay.spool_files() == []), relay.spool_files()


def test_existing_message_id_and_date_are_kept(relay_factory, dns_server, mx_farm):
    dns_server.add("example.test", "A", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    relay = relay_factory()
    relay.send(
        "app@example.org",
        ["bob@example.test"],
        make_message(
            "x", headers="Message-ID: <own@app>\r\nDate: Mon, 2 Nov 2026 10:00:00 +0000\r\n"
        ),
    )
    [received] = mx.wait_messages(1)
    parsed = email.message_from_bytes(received.data, policy=email.policy.default)
    assert parsed["Message-ID"] == "<own@app>"
    assert b"\r\nDate: Mon, 2 Nov 2026 10:00:00 +0000\r\n" in received.data
    assert received.data.count(b"\nDate:") == 1


def test_never_an_open_relay(relay_factory):
    relay = relay_factory()
    with relay.client(auth=False) as smtp:
        assert smtp.mail("app@example.org") == (530, b"5.7.0 Authentication required")
        assert smtp.rcpt("victim@example.test")[0] == 503
    with relay.client(auth=False, tls=False) as smtp:
        code, reply = smtp.docmd("AUTH", "PLAIN AGFwcABz")
        assert code == 538 and reply.startswith(b"5.7.11")
    with relay.client(auth=False) as smtp, pytest.raises(smtplib.SMTPAuthenticationError) as err:
        smtp.login("app", "wrong password")
    assert err.value.smtp_code == 535


def test_trusted_network_submits_without_auth(relay_factory, dns_server, mx_farm):
    dns_server.add("example.test", "A", "127.0.0.2")
    dns_server.add("anywhere.test", "A", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    relay = relay_factory(
        listeners=[
            {
                "name": "local",
                "address": "127.0.0.1",
                "port": __import__("tests.relayproc", fromlist=["free_port"]).free_port(),
                "tls": "none",
                "auth": "none",
                "trusted_networks": ["127.0.0.0/8"],
            }
        ]
    )
    relay.send(
        "anyone@anywhere.test", ["bob@example.test"], make_message("t"), auth=False, tls=False
    )
    assert mx.wait_messages(1)[0].mail_from == "anyone@anywhere.test"


def test_sender_refusals(relay_factory):
    relay = relay_factory()
    with relay.client() as smtp:
        code, reply = smtp.mail("intruder@elsewhere.test")
        assert code == 553 and reply.startswith(b"5.7.1")
        smtp.rset()
        code, reply = smtp.docmd("MAIL FROM:<>")
        assert code == 550 and reply.startswith(b"5.7.1")
        code, reply = smtp.docmd("MAIL FROM:<not an address>")
        assert code == 501 and reply.startswith(b"5.1.7")
        code, reply = smtp.docmd("MAIL FROM:<@a.test:user@example.org>")
        assert code == 501


def test_connection_and_transaction_limits_at_the_destination(relay_factory, dns_server, mx_farm):
    dns_server.mx("limited.test", (10, "mx.limited.test"))
    dns_server.add("mx.limited.test", "A", "127.0.0.3")
    mx = mx_farm.server("127.0.0.3")
    relay = relay_factory(
        providers={
            "limited": {
                "domains": ["limited.test"],
                "max_connections": 2,
                "max_messages_per_connection": 3,
            }
        }
    )
    count = 30
    with relay.client() as smtp:
        for i in range(count):
            smtp.sendmail("app@example.org", [f"user{i}@limited.test"], make_message(f"m{i}"))
    messages = mx.wait_messages(count)
    assert len(messages) == count
    assert mx.max_open <= 2
    assert max(mx.transactions.values()) <= 3
    assert mx.connections >= count // 3


def test_recipients_grouped_per_domain_and_transaction(relay_factory, dns_server, mx_farm):
    dns_server.add("one.test", "A", "127.0.0.4")
    dns_server.add("two.test", "A", "127.0.0.5")
    one, two = mx_farm.server("127.0.0.4"), mx_farm.server("127.0.0.5")
    relay = relay_factory(defaults={"max_recipients_per_message": 2})
    relay.send(
        "app@example.org",
        [f"u{i}@one.test" for i in range(5)] + ["v@two.test"],
        make_message("grouped"),
    )
    assert one.wait_for(lambda: sum(len(m.rcpt_tos) for m in one.messages) == 5)
    assert sorted(len(m.rcpt_tos) for m in one.messages) == [1, 2, 2]
    assert [m.rcpt_tos for m in two.wait_messages(1)] == [["v@two.test"]]


def test_partial_rcpt_failure_bounces_only_the_refused(
    relay_factory, dns_server, mx_farm, example_org
):
    dns_server.add("example.test", "A", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    mx.rcpt_hook = lambda a: (
        "550 5.1.1 <nobody@example.test>: user unknown" if a.startswith("nobody") else None
    )
    relay = relay_factory()
    relay.send(
        "app@example.org",
        ["alice@example.test", "nobody@example.test", "carol@example.test"],
        make_message("partial"),
    )
    [delivered] = mx.wait_messages(1)
    assert sorted(delivered.rcpt_tos) == ["alice@example.test", "carol@example.test"]
    [dsn] = example_org.wait_messages(1)
    assert dsn.mail_from in ("", "<>") and dsn.rcpt_tos == ["app@example.org"]
    message, recipients = _dsn_parts(dsn.data)
    assert message["From"].addresses[0].addr_spec == "MAILER-DAEMON@relay.test"
    assert [r["Final-Recipient"] for r in recipients] == ["rfc822; nobody@example.test"]
    assert recipients[0]["Action"] == "failed"
    assert recipients[0]["Status"] == "5.1.1"
    assert recipients[0]["Remote-MTA"] == "dns; example.test"  # its implicit MX
    assert "user unknown" in recipients[0]["Diagnostic-Code"]


def test_temporary_failure_then_success(relay_factory, dns_server, mx_farm):
    dns_server.add("example.test", "A", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    tries = {"n": 0}

    def flaky(address: str) -> str | None:
        tries["n"] += 1
        return "451 4.7.1 Greylisted, try again later" if tries["n"] == 1 else None

    mx.rcpt_hook = flaky
    relay = relay_factory()
    queue_id = relay.send("app@example.org", ["bob@example.test"], make_message("later"))
    mx.wait_messages(1)
    log = relay.wait_log("attempt=2 dsn=2.0.0 status=delivered")
    assert (
        f"id={queue_id} to=<bob@example.test> provider=default relay=example.test[127.0.0.2]:"
    ) in log
    assert "attempt=1 dsn=4.7.1 status=deferred (451 4.7.1 Greylisted" in log
    assert "attempt=2 dsn=2.0.0 status=delivered" in log


def test_mailbox_full_is_retried_not_bounced(relay_factory, dns_server, mx_farm):
    dns_server.add("example.test", "A", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    replies = iter(["552 5.2.2 Mailbox full"])
    mx.rcpt_hook = lambda a: next(replies, None)
    relay = relay_factory()
    relay.send("app@example.org", ["full@example.test"], make_message("quota"))
    mx.wait_messages(1)
    assert "dsn=5.2.2 status=deferred" in relay.log()


def test_permanent_failure_produces_parseable_dsn(relay_factory, dns_server, mx_farm, example_org):
    dns_server.add("example.test", "A", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    mx.data_hook = lambda m: "554 5.7.1 Message refused by policy"
    relay = relay_factory()
    with relay.client() as smtp:
        smtp.ehlo()
        smtp.docmd("MAIL FROM:<app@example.org> RET=HDRS ENVID=app+2Did+3D42")
        smtp.docmd("RCPT TO:<bob@example.test> NOTIFY=FAILURE ORCPT=rfc822;bob@example.test")
        code, _ = smtp.data(make_message("refused"))
        assert code == 250
    [dsn] = example_org.wait_messages(1)
    message, [recipient] = _dsn_parts(dsn.data)
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert recipient["Final-Recipient"] == "rfc822; bob@example.test"
    assert recipient["Original-Recipient"] == "rfc822;bob@example.test"
    assert recipient["Status"] == "5.7.1"
    assert recipient["Diagnostic-Code"] == "smtp; 554 5.7.1 Message refused by policy"
    assert "Original-Envelope-Id: app-id=42" in dsn.data.decode()
    returned = [p.get_content_type() for p in message.iter_parts()]
    assert returned[-1] == "text/rfc822-headers"  # RET=HDRS: headers only


def test_notify_never_means_no_dsn(relay_factory, dns_server, mx_farm, example_org):
    dns_server.add("example.test", "A", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    mx.rcpt_hook = lambda a: "550 5.1.1 unknown"
    relay = relay_factory()
    with relay.client() as smtp:
        smtp.docmd("MAIL FROM:<app@example.org>")
        smtp.docmd("RCPT TO:<bob@example.test> NOTIFY=NEVER")
        assert smtp.data(make_message("quiet"))[0] == 250
    relay.wait_log("status=bounced")
    relay.stop()
    assert example_org.messages == []


def test_null_mx_bounces(relay_factory, dns_server, example_org):
    dns_server.mx("nomail.test", (0, "."))
    relay = relay_factory()
    relay.send("app@example.org", ["x@nomail.test"], make_message("null mx"))
    [dsn] = example_org.wait_messages(1)
    _, [recipient] = _dsn_parts(dsn.data)
    assert recipient["Status"] == "5.1.10"
    assert "null MX" in recipient["Diagnostic-Code"]


def test_nxdomain_bounces(relay_factory, example_org):
    relay = relay_factory()
    relay.send("app@example.org", ["x@no-such-domain.test"], make_message("nx"))
    [dsn] = example_org.wait_messages(1)
    _, [recipient] = _dsn_parts(dsn.data)
    assert recipient["Status"] == "5.1.2"


def test_implicit_mx_uses_the_domain_address(relay_factory, dns_server, mx_farm):
    dns_server.add("implicit.test", "A", "127.0.0.6")
    mx = mx_farm.server("127.0.0.6")
    relay = relay_factory()
    relay.send("app@example.org", ["x@implicit.test"], make_message("implicit"))
    assert mx.wait_messages(1)[0].rcpt_tos == ["x@implicit.test"]


def test_mx_preference_order_and_fallback(relay_factory, dns_server, mx_farm):
    dns_server.mx("pref.test", (20, "backup.pref.test"), (10, "primary.pref.test"))
    dns_server.add("primary.pref.test", "A", "127.0.0.7")  # nothing listens there
    dns_server.add("backup.pref.test", "A", "127.0.0.8")
    backup = mx_farm.server("127.0.0.8")
    relay = relay_factory()
    relay.send("app@example.org", ["x@pref.test"], make_message("fallback"))
    backup.wait_messages(1)
    assert ("primary.pref.test.", "A") in dns_server.queries


def test_all_mx_unreachable_defers_the_destination(relay_factory, dns_server):
    dns_server.mx("down.test", (10, "mx1.down.test"), (20, "mx2.down.test"))
    dns_server.add("mx1.down.test", "A", "127.0.0.10")
    dns_server.add("mx2.down.test", "A", "127.0.0.11")
    relay = relay_factory(retry={"initial": "30s", "max": "1m"})
    ids = [
        relay.send("app@example.org", [f"u{i}@down.test"], make_message(f"d{i}")) for i in range(5)
    ]
    relay.wait_log("site=mx1.down.test,mx2.down.test unreachable, deferred")
    relay.wait_log("status=deferred")
    assert relay.stop() == 0
    # One destination-level failure holds the queue: the other messages wait without
    # each hammering the dead hosts (counted over the whole run, not at the first failure).
    assert relay.log().count("status=deferred") < len(ids)
    assert len([f for f in relay.spool_files() if not f.endswith(".st")]) == len(ids)


def test_lifetime_expiry_returns_a_dsn(relay_factory, dns_server, mx_farm, example_org):
    dns_server.add("example.test", "A", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    mx.rcpt_hook = lambda a: "451 4.3.0 Temporary local problem"
    relay = relay_factory(retry={"initial": "1s", "max": "1s", "lifetime": "3s"})
    queue_id = relay.send("app@example.org", ["slow@example.test"], make_message("expire"))
    [dsn] = example_org.wait_messages(1, timeout=30)
    _, [recipient] = _dsn_parts(dsn.data)
    assert recipient["Action"] == "failed"
    assert "delivery time expired" in recipient["Diagnostic-Code"]
    assert "451 4.3.0 Temporary local problem" in recipient["Diagnostic-Code"]
    assert f"id={queue_id} to=<slow@example.test>" in relay.wait_log("status=expired")


def test_size_and_recipient_limits(relay_factory):
    relay = relay_factory(limits={"max_message_size": "10KiB", "max_recipients": 3})
    with relay.client() as smtp:
        assert smtp.docmd("MAIL FROM:<app@example.org> SIZE=20000")[0] == 552
        smtp.mail("app@example.org")
        for i in range(3):
            assert smtp.rcpt(f"u{i}@example.test")[0] == 250
        code, reply = smtp.rcpt("u4@example.test")
        assert (code, reply[:5]) == (452, b"4.5.3")
        code, reply = smtp.data(make_message("big", "x" * 70 + "\r\n") * 200)
        assert (code, reply[:5]) == (552, b"5.3.4")
        # the session goes on
        smtp.mail("app@example.org")
        smtp.rcpt("u@example.test")
        assert smtp.data(make_message("small"))[0] == 250


def test_implicit_tls_listener_with_auth_login(relay_factory, dns_server, mx_farm):
    import ssl

    from tests.relayproc import PASSWORD, free_port

    dns_server.add("example.test", "A", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    port = free_port()
    relay = relay_factory(
        start=False,
        listeners=[
            {"name": "submissions", "address": "127.0.0.1", "port": free_port(), "tls": "starttls"},
            {"name": "implicit", "address": "127.0.0.1", "port": port, "tls": "implicit"},
        ],
    )
    relay.start()
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP_SSL("127.0.0.1", port, context=context, timeout=15) as smtp:
        smtp.ehlo("client.test")
        assert "LOGIN" in smtp.esmtp_features["auth"]
        smtp.user, smtp.password = "app", PASSWORD
        code, _ = smtp.auth("LOGIN", smtp.auth_login)
        assert code == 235
        smtp.sendmail("app@example.org", ["bob@example.test"], make_message("implicit tls"))
    [received] = mx.wait_messages(1)
    assert b"with ESMTPSA id" in received.data


def test_provider_by_mx_pattern_and_smarthost_route(relay_factory, dns_server, mx_farm):
    dns_server.mx("hosted.test", (10, "in1.bigmail.test"))
    dns_server.add("in1.bigmail.test", "A", "127.0.0.12")
    bigmail = mx_farm.server("127.0.0.12")
    smarthost = mx_farm.server("127.0.0.13")
    relay = relay_factory(
        providers={
            "bigmail": {"mx": ["*.bigmail.test"], "max_connections": 1},
            "partner": {"domains": ["*.partner.test"], "route": f"127.0.0.13:{mx_farm.port}"},
        }
    )
    first = relay.send("app@example.org", ["a@hosted.test"], make_message("by mx"))
    second = relay.send("app@example.org", ["b@eu.partner.test"], make_message("routed"))
    assert bigmail.wait_messages(1)[0].rcpt_tos == ["a@hosted.test"]
    assert smarthost.wait_messages(1)[0].rcpt_tos == ["b@eu.partner.test"]
    log = relay.wait_log(f"id={second} to=<b@eu.partner.test> provider=partner")
    assert f"id={first} to=<a@hosted.test> provider=bigmail relay=in1.bigmail.test" in log
    assert ("eu.partner.test.", "MX") not in dns_server.queries  # a route needs no MX


def test_delivers_over_ipv6(relay_factory, dns_server, mx_farm):
    dns_server.mx("six.test", (10, "mx.six.test"))
    dns_server.add("mx.six.test", "AAAA", "::1")
    mx = mx_farm.server("::1")
    relay = relay_factory()
    queue_id = relay.send("app@example.org", ["v6@six.test"], make_message("ipv6"))
    assert mx.wait_messages(1)[0].rcpt_tos == ["v6@six.test"]
    relay.wait_log(f"id={queue_id} to=<v6@six.test> provider=default relay=mx.six.test[::1]")


def test_warn_after_sends_one_delay_dsn_and_keeps_trying(
    relay_factory, dns_server, mx_farm, example_org
):
    dns_server.add("example.test", "A", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    mx.rcpt_hook = lambda a: "451 4.2.0 Try again later"
    relay = relay_factory(retry={"initial": "1s", "max": "1s", "warn_after": "1s"})
    queue_id = relay.send("app@example.org", ["late@example.test"], make_message("delay"))
    [dsn] = example_org.wait_messages(1, timeout=30)
    message, [recipient] = _dsn_parts(dsn.data)
    assert message["Subject"] == "Delayed Mail (still being retried)"
    assert recipient["Action"] == "delayed"
    assert recipient["Status"] == "4.2.0"
    relay.wait_log(
        f"id={queue_id} to=<late@example.test> provider=default relay=example.test[127.0.0.2]:"
    )
    # Warned once, durably: later attempts and a restart do not warn again.
    log = relay.wait_log("attempt=4 ")
    assert log.count("sender delay notification") == 1
    relay.stop()
    relay.start()
    relay.wait_log("attempt=5 ")
    mx.rcpt_hook = lambda a: None
    mx.wait_messages(1, timeout=30)
    relay.stop()
    assert len(example_org.messages) == 1


@pytest.fixture
def mx_tls_context():
    import ssl

    import trustme

    authority = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("mx.tls.test").configure_cert(context)
    return context


def test_opportunistic_starttls_to_the_destination(
    relay_factory, dns_server, mx_farm, mx_tls_context
):
    dns_server.mx("tls.test", (10, "mx.tls.test"))
    dns_server.add("mx.tls.test", "A", "127.0.0.14")
    mx = mx_farm.server("127.0.0.14", tls_context=mx_tls_context)
    relay = relay_factory()
    relay.send("app@example.org", ["x@tls.test"], make_message("encrypted"))
    [received] = mx.wait_messages(1)
    assert received.tls  # certificate unknown to relay: still encrypted (RFC 7435)


def test_required_tls_refuses_an_unverifiable_destination(
    relay_factory, dns_server, mx_farm, mx_tls_context
):
    dns_server.mx("tls.test", (10, "mx.tls.test"))
    dns_server.add("mx.tls.test", "A", "127.0.0.14")
    mx = mx_farm.server("127.0.0.14", tls_context=mx_tls_context)
    relay = relay_factory(providers={"strict": {"domains": ["tls.test"], "tls": "required"}})
    queue_id = relay.send("app@example.org", ["x@tls.test"], make_message("must be verified"))
    log = relay.wait_log(f"id={queue_id} to=<x@tls.test> provider=strict")
    assert "status=deferred" in log and "dsn=4.7.5" in log
    assert mx.messages == []
