"""Domain normalisation (SPEC §5): one spelling per destination, checked at the door.

Unit tests of relay.domains, then the listener applying it over a real socket: a
look-alike spelling is stored and delivered as its A-label, and a name that does not
normalise is refused at RCPT with 501 5.1.3.
"""

from __future__ import annotations

import pytest

from relay.domains import InvalidDomain, normalize_address, normalize_domain
from tests.relayproc import make_message

FULLWIDTH_F = "\uff46"  # FULLWIDTH LATIN SMALL LETTER F
FULLWIDTH_E = "\uff45"


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        (f"{FULLWIDTH_F}ree.fr", "free.fr"),
        ("\uff46\uff52\uff45\uff45\uff0e\uff46\uff52", "free.fr"),  # all full-width, dot too
        ("free\u3002fr", "free.fr"),  # ideographic full stop separates labels too
        ("FREE.FR", "free.fr"),
        ("free.fr.", "free.fr"),  # absolute form: the root's dot goes
        ("free.fr\uff0e", "free.fr"),
        ("Bücher.example", "xn--bcher-kva.example"),
        ("Bu\u0308cher.example", "xn--bcher-kva.example"),  # decomposed ü: NFC first
        ("xn--BCHER-kva.example", "xn--bcher-kva.example"),  # an A-label, upper-cased
        ("faß.de", "xn--fa-hia.de"),  # IDNA 2008 keeps ß (IDNA 2003 made it "fass.de")
        ("\u2168.example", "ix.example"),  # ROMAN NUMERAL NINE: compatibility mapping
        ("mail.example.org", "mail.example.org"),
    ],
)
def test_spellings_of_one_domain_meet_in_one_a_label(domain: str, expected: str) -> None:
    assert normalize_domain(domain) == expected
    assert normalize_domain(expected) == expected  # idempotent: the router may apply it again


def test_another_script_is_another_domain() -> None:
    # CYRILLIC SMALL LETTER A looks like Latin "a", but UTS #46 does not fold scripts:
    # the look-alike is a different name in the DNS, so it must stay one here too.
    assert normalize_domain("\u0430pple.example") == "xn--pple-43d.example"


@pytest.mark.parametrize(
    "literal", ["[192.0.2.1]", "[IPv6:2001:db8::1]", "[ipv6:::1]", "[IPv6:::ffff:192.0.2.1]"]
)
def test_address_literals_pass_unchanged(literal: str) -> None:
    assert normalize_domain(literal) == literal


@pytest.mark.parametrize(
    "domain",
    [
        "",
        ".",
        "a..example",
        "-a.example",
        "a-.example",
        "ab--cd.example",  # hyphens in 3rd and 4th place are reserved (RFC 5891 §4.2.3.1)
        "xn--zz.example",  # not valid Punycode
        "exa_mple.example",
        "exa mple.example",
        "\u2603.example",  # a snowman: IDNA 2003 took symbols, IDNA 2008 does not
        "example.org\x00",
        "example.org\r\n",
        "a" * 64 + ".example",  # a label has 63 octets at most
        ".".join(["a" * 63] * 4) + ".example",  # a name 253
        "[192.0.2.300]",
        "[2001:db8::1]",  # an IPv6 literal needs its tag
        "[IPv6:192.0.2.1]",
        "[IPv6:fe80::1%eth0]",
        "[192.0.2.1",
    ],
)
def test_what_does_not_normalise_is_refused(domain: str) -> None:
    with pytest.raises(InvalidDomain):
        normalize_domain(domain)


def test_invalid_domain_is_a_value_error() -> None:
    assert issubclass(InvalidDomain, ValueError)


def test_an_address_keeps_its_local_part() -> None:
    assert normalize_address(f"Üser.Name@{FULLWIDTH_F}ree.FR") == "Üser.Name@free.fr"
    assert normalize_address('"a@b"@Example.ORG.') == '"a@b"@example.org'
    assert normalize_address("postmaster@[192.0.2.1]") == "postmaster@[192.0.2.1]"
    for bad in ("no-at-sign", "@example.org", "user@exa_mple.example"):
        with pytest.raises(InvalidDomain):
            normalize_address(bad)


def test_listener_stores_and_delivers_the_normalised_domain(relay_factory, dns_server, mx_farm):
    dns_server.add("free.fr", "A", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    relay = relay_factory()
    with relay.client() as smtp:
        code, reply = smtp.mail("app@xn--zz.example")
        assert (code, reply[:5]) == (501, b"5.1.7")  # bad syntax, before any policy
        smtp.rset()
        # The sender's domain is normalised before the senders check: "*@example.org".
        assert smtp.mail(f"app@{FULLWIDTH_E}xample.org", ["SMTPUTF8"])[0] == 250
        assert smtp.rcpt(f"user@{FULLWIDTH_F}ree.fr")[0] == 250
        assert smtp.rcpt("other@FREE.FR.")[0] == 250
        for bad in ("user@xn--zz.example", "user@\u2603.example", "user@exa_mple.example"):
            code, reply = smtp.rcpt(bad)
            assert (code, reply[:5]) == (501, b"5.1.3"), (bad, reply)
        assert smtp.data(make_message("idn"))[0] == 250
    [message] = mx.wait_messages(1)
    assert message.mail_from == "app@example.org"
    # One destination, one transaction: both spellings met in free.fr's queue.
    assert sorted(message.rcpt_tos) == ["other@free.fr", "user@free.fr"]
