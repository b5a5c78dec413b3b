"""Reply classification, the DSN builder, and the resolver over real DNS."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re

import pytest

from relay.bounces import Failure, build_dsn
from relay.config.model import Dns, Rule
from relay.delivery.classify import classify
from relay.delivery.client import wire_body
from relay.dns import Resolver
from relay.errors import DnsPermanentError, DnsTemporaryError
from relay.reply import Reply, Verdict
from relay.spool import Envelope, EnvelopeRecipient


@pytest.mark.parametrize(
    ("code", "text", "verdict"),
    [
        (250, "2.0.0 ok", Verdict.DELIVERED),
        (451, "4.3.0 later", Verdict.DEFERRED),
        (550, "5.1.1 unknown user", Verdict.BOUNCED),
        (552, "5.2.2 mailbox full", Verdict.DEFERRED),
        (452, "4.2.2 over quota", Verdict.DEFERRED),
    ],
)
def test_default_classification(code, text, verdict):
    assert classify(Reply.parse(code, text), ()).verdict is verdict


def test_rules_come_first():
    rules = (
        Rule(re.compile("LPN007_510", re.I), "retry"),
        Rule(re.compile("no such user here", re.I), "bounce"),
    )
    laposte = Reply.parse(
        550,
        "5.5.0 Service refuse. Veuillez essayer plus tard. "
        "service refused, please try later. LPN007_510",
    )
    assert classify(laposte, rules).verdict is Verdict.DEFERRED
    assert classify(Reply.parse(450, "no such user here"), rules).verdict is Verdict.BOUNCED


def test_reply_parsing():
    reply = Reply.parse(550, "5.7.1 POL-P4\n  Connection refused")
    assert (reply.code, reply.enhanced, reply.text) == (550, "5.7.1", "POL-P4 Connection refused")
    assert Reply.parse(421, "All server ports are busy").status == "4.0.0"


def test_dsn_structure():
    env = Envelope(
        id="Q1",
        sender="a@example.org",
        recipients=(EnvelopeRecipient("b@x.test", None, "rfc822;b@x.test"),),
        received_at=1_700_000_000,
        size=10,
        class_name="transactional",
        account="app",
        envid="E-1",
    )
    original = b"Subject: hi\r\nFrom: a@example.org\r\n\r\nbody\r\n"
    dsn = build_dsn(
        "relay.test",
        env,
        [Failure(env.recipients[0], Reply.parse(550, "5.1.1 unknown"), "mx.x.test")],
        original,
        1_700_000_100,
    )
    message = email.message_from_bytes(dsn, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    parts = list(message.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "message/rfc822",
    ]
    per_message, per_recipient = [dict(b.items()) for b in parts[1].get_payload()]
    assert per_message["Reporting-MTA"] == "dns; relay.test"
    assert per_message["Original-Envelope-Id"] == "E-1"
    assert per_recipient["Status"] == "5.1.1"
    assert per_recipient["Remote-MTA"] == "dns; mx.x.test"
    assert per_recipient["Original-Recipient"] == "rfc822;b@x.test"
    assert parts[2].get_payload(0)["Subject"] == "hi"


def test_resolver_over_the_wire(dns_server):
    dns_server.mx("multi.test", (20, "b.multi.test"), (10, "a.multi.test"), (10, "c.multi.test"))
    dns_server.add("a.multi.test", "A", "127.0.0.2")
    dns_server.add("a.multi.test", "AAAA", "::1")
    dns_server.mx("null.test", (0, "."))
    dns_server.add("bare.test", "A", "127.0.0.3")
    dns_server.servfail("broken.test")
    resolver = Resolver(Dns(nameservers=(("127.0.0.1", dns_server.port),), timeout=2))

    async def go() -> None:
        hosts = [h.name for h in await resolver.mx_hosts("multi.test")]
        assert sorted(hosts[:2]) == ["a.multi.test", "c.multi.test"]
        assert hosts[2] == "b.multi.test"
        assert await resolver.addresses("a.multi.test") == ["::1", "127.0.0.2"]
        assert [h.name for h in await resolver.mx_hosts("bare.test")] == ["bare.test"]
        with pytest.raises(DnsPermanentError) as null:
            await resolver.mx_hosts("null.test")
        assert null.value.reply.status == "5.1.10"
        with pytest.raises(DnsPermanentError) as nx:
            await resolver.mx_hosts("nothing.test")
        assert nx.value.reply.status == "5.1.2"
        with pytest.raises(DnsTemporaryError):
            await resolver.mx_hosts("broken.test")

    asyncio.run(go())


@pytest.mark.parametrize(
    ("reply", "action"),
    [
        ("550 5.2.0 Mail rejete. Mail rejected. ofr_506", "suspend"),
        (
            "550 5.5.0 Service refuse. Veuillez essayer plus tard. service refused, please try "
            "later. LPN007_510",
            "retry",
        ),
        ("421 4.3.2 All server ports are busy", "suspend"),
        ("451 too many errors from your ip", "suspend"),
        ("554 5.7.1 POL-P4 Connection refused", "suspend"),
        ("421 4.7.28 Our system has detected an unusual rate of unsolicited mail", "suspend"),
        (
            "421 4.7.650 The mail server [192.0.2.1] has been temporarily rate limited due to IP "
            "reputation (S775)",
            "suspend",
        ),
        (
            "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected "
            "volume or user complaints",
            "suspend",
        ),
        (
            "421 4.7.0 [TSS09] All messages from 192.0.2.1 will be permanently deferred; "
            "Retrying will NOT succeed",
            "bounce",
        ),
    ],
)
def test_shipped_presets_match_the_real_replies(reply, action):
    from pathlib import Path

    from relay.config import load_config

    config = load_config(str(Path(__file__).resolve().parent.parent / "config" / "relay.yaml"))
    code, _, text = reply.partition(" ")
    parsed = Reply.parse(int(code), text)
    matches = [
        rule.action
        for provider in config.providers
        for rule in provider.shaping.rules + config.rules
        if rule.pattern.search(str(parsed))
    ]
    assert matches and matches[0] == action


@pytest.mark.parametrize(
    ("stored", "sent"),
    [
        (b"Subject: x\r\n\r\nbody\r\n", b"Subject: x\r\n\r\nbody\r\n.\r\n"),
        (b".first\r\n.\r\n..\r\nend\r\n", b"..first\r\n..\r\n...\r\nend\r\n.\r\n"),
        (b"no final newline", b"no final newline\r\n.\r\n"),
        (b"", b".\r\n"),
    ],
)
def test_wire_body_dot_stuffs_and_terminates(stored, sent):
    assert wire_body(stored) == sent
