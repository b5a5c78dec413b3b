"""Outbound TLS policy (SPEC §11): MTA-STS, DANE, no downgrade, remembered broken TLS,
and the `relayed` DSN. Real components on loopback: the relay as a subprocess, the tests'
DNS server (with the AD bit and TLSA/TXT records), recording MX servers with trustme
certificates, and an HTTPS server on port 443 serving MTA-STS policies (RFC 8461 §3.3
fixes the port; the tests run as root, so 127.0.43.x:443 can be bound)."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from relay.config import parse_config
from relay.delivery import dane
from relay.delivery.mtasts import parse_policy, txt_id
from relay.delivery.tls_policy import (
    Requirement,
    TlsFacts,
    TlsPolicy,
    judge,
    provider_requirement,
)
from relay.dns.resolver import Resolver, Tlsa
from tests.dnsserver import DnsServer
from tests.mxserver import MxFarm
from tests.relayproc import RelayProcess, make_message
from tests.support import route, scrape, wait_until

# -- helpers -----------------------------------------------------------------------------


class StsServer:
    """HTTPS on <host>:443 in a thread of its own: `policies` maps the Host asked for
    (mta-sts.<domain>) to the policy text served at /.well-known/mta-sts.txt."""

    def __init__(self, host: str, context: ssl.SSLContext) -> None:
        self.host = host
        self.policies: dict[str, str] = {}
        self.fetches: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        app = web.Application()
        app.router.add_get("/.well-known/mta-sts.txt", self._policy)
        self._runner = web.AppRunner(app)

        async def start() -> None:
            await self._runner.setup()
            await web.TCPSite(self._runner, host, 443, ssl_context=context).start()

        asyncio.run_coroutine_threadsafe(start(), self._loop).result(10)
        self.up = True

    async def _policy(self, request: web.Request) -> web.Response:
        name = request.host.partition(":")[0]
        self.fetches.append(name)
        text = self.policies.get(name)
        if text is None:
            raise web.HTTPNotFound()
        return web.Response(text=text, content_type="text/plain")

    def stop(self) -> None:
        if self.up:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self.up = False

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@pytest.fixture
def authority(tmp_path: Path) -> tuple[trustme.CA, str]:
    """A CA the relay trusts through delivery.ca_file."""
    ca = trustme.CA()
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return ca, str(path)


def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


@pytest.fixture
def sts_server(authority: tuple[trustme.CA, str]) -> Iterator[StsServer]:
    ca, _ = authority
    names = [f"mta-sts.sts{i}.test" for i in range(1, 8)]
    server = StsServer("127.0.43.1", server_context(ca, *names))
    yield server
    server.close()


def publish(dns: DnsServer, sts: StsServer, domain: str, policy_id: str, text: str) -> None:
    """The domain publishes an MTA-STS policy (RFC 8461 §3.1, §3.2)."""
    dns.add(f"_mta-sts.{domain}", "TXT", f'"v=STSv1; id={policy_id};"')
    dns.add(f"mta-sts.{domain}", "A", sts.host)
    sts.policies[f"mta-sts.{domain}"] = text


def policy(mode: str, *mx: str, max_age: int = 86400) -> str:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]
    return "\r\n".join(lines) + "\r\n"


def attempt(relay: RelayProcess, queue_id: str, address: str) -> str:
    """The delivery log line of one recipient of one message (waits for it, bounded)."""
    needle = f"id={queue_id} to=<{address}>"
    relay.wait_log(needle)
    return next(line for line in relay.log().splitlines() if needle in line)


def tls_sessions(relay: RelayProcess, policy_name: str, result: str) -> float:
    counts = scrape(relay)["relay_tls_policy_total"]
    key = (("policy", policy_name), ("provider", "default"), ("result", result))
    return counts.get(key, 0.0)


def spki_sha256(issued: trustme.LeafCert) -> str:
    cert = x509.load_pem_x509_certificate(issued.cert_chain_pems[0].bytes())
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def sts_relay(relay_factory, ca_file: str, **extra):  # type: ignore[no-untyped-def]
    delivery = {"ca_file": ca_file, **extra.pop("delivery", {})}
    return relay_factory(delivery=delivery, **extra)


# -- MTA-STS -----------------------------------------------------------------------------


def test_mta_sts_enforce_sends_nothing_to_an_mx_the_policy_does_not_list(
    relay_factory, dns_server, mx_farm, authority, sts_server
):
    ca, ca_file = authority
    route(dns_server, "sts1.test", "127.0.0.61")
    mx = mx_farm.server("127.0.0.61", tls_context=server_context(ca, "mx.sts1.test"))
    publish(dns_server, sts_server, "sts1.test", "1", policy("enforce", "mx.elsewhere.test"))
    relay = sts_relay(relay_factory, ca_file)
    queue_id = relay.send("app@example.org", ["x@sts1.test"], make_message("enforced"))
    line = attempt(relay, queue_id, "x@sts1.test")
    assert "dsn=4.7.5 status=deferred" in line and "policy=mta-sts" in line, line
    assert "is not an MX of sts1.test's policy" in line, line
    assert mx.messages == []
    assert sts_server.fetches == ["mta-sts.sts1.test"]


def test_mta_sts_enforce_defers_an_mx_whose_certificate_is_for_another_name(
    relay_factory, dns_server, mx_farm, authority, sts_server
):
    ca, ca_file = authority
    route(dns_server, "sts2.test", "127.0.0.62")
    # A certificate from a CA the relay trusts, but not for the MX's name.
    mx = mx_farm.server("127.0.0.62", tls_context=server_context(ca, "someone-else.test"))
    publish(dns_server, sts_server, "sts2.test", "1", policy("enforce", "mx.sts2.test"))
    relay = sts_relay(relay_factory, ca_file)
    queue_id = relay.send("app@example.org", ["x@sts2.test"], make_message("wrong name"))
    line = attempt(relay, queue_id, "x@sts2.test")
    assert "dsn=4.7.5 status=deferred" in line and "policy=mta-sts" in line, line
    assert mx.messages == []


def test_mta_sts_enforce_delivers_over_verified_tls(
    relay_factory, dns_server, mx_farm, authority, sts_server
):
    ca, ca_file = authority
    route(dns_server, "sts3.test", "127.0.0.63")
    mx = mx_farm.server("127.0.0.63", tls_context=server_context(ca, "mx.sts3.test"))
    publish(dns_server, sts_server, "sts3.test", "7", policy("enforce", "*.sts3.test"))
    relay = sts_relay(relay_factory, ca_file)
    queue_id = relay.send("app@example.org", ["x@sts3.test"], make_message("verified"))
    [received] = mx.wait_messages(1)
    assert received.tls
    line = attempt(relay, queue_id, "x@sts3.test")
    assert "status=delivered" in line and "policy=mta-sts" in line and " tls=TLSv1." in line
    # One session, counted once it is closed (idle_connection_timeout).
    assert wait_until(lambda: tls_sessions(relay, "mta-sts", "tls") == 1)
    assert tls_sessions(relay, "mta-sts", "failed") == 0


def test_mta_sts_testing_delivers_and_counts_the_failure(
    relay_factory, dns_server, mx_farm, authority, sts_server
):
    ca, ca_file = authority
    route(dns_server, "sts4.test", "127.0.0.64")
    mx = mx_farm.server("127.0.0.64", tls_context=server_context(ca, "mx.sts4.test"))
    publish(dns_server, sts_server, "sts4.test", "1", policy("testing", "mx.elsewhere.test"))
    relay = sts_relay(relay_factory, ca_file)
    queue_id = relay.send("app@example.org", ["x@sts4.test"], make_message("testing"))
    [received] = mx.wait_messages(1)
    assert received.tls
    line = attempt(relay, queue_id, "x@sts4.test")
    assert "status=delivered" in line and "policy=mta-sts" in line, line
    assert "delivered anyway (sts4.test's policy is in testing mode)" in relay.log()
    assert wait_until(lambda: tls_sessions(relay, "mta-sts", "failed") == 1)


def test_mta_sts_policy_outlives_a_restart_without_its_https_server(
    relay_factory, dns_server, mx_farm, authority, sts_server
):
    ca, ca_file = authority
    route(dns_server, "sts5.test", "127.0.0.65")
    good = mx_farm.server("127.0.0.65", tls_context=server_context(ca, "mx.sts5.test"))
    publish(dns_server, sts_server, "sts5.test", "1", policy("enforce", "mx.sts5.test"))
    relay = sts_relay(relay_factory, ca_file)
    relay.send("app@example.org", ["x@sts5.test"], make_message("first"))
    good.wait_messages(1)
    relay.stop()
    state = Path(relay.config["spool"]["path"]) / "state" / "mta-sts.json"
    assert "mx.sts5.test" in state.read_text()
    # Now the HTTPS server is gone and the MX record names a host the policy does not
    # list, with a certificate valid for its own name: only the cached policy stops it.
    sts_server.stop()
    dns_server.mx("sts5.test", (10, "evil.sts5.test"))
    dns_server.add("evil.sts5.test", "A", "127.0.0.66")
    evil = mx_farm.server("127.0.0.66", tls_context=server_context(ca, "evil.sts5.test"))
    relay.start()
    queue_id = relay.send("app@example.org", ["y@sts5.test"], make_message("second"))
    line = attempt(relay, queue_id, "y@sts5.test")
    assert "dsn=4.7.5 status=deferred" in line and "evil.sts5.test is not an MX" in line, line
    assert evil.messages == []


def test_mta_sts_policy_is_fetched_again_when_its_id_changes(
    relay_factory, dns_server, mx_farm, authority, sts_server
):
    ca, ca_file = authority
    route(dns_server, "sts6.test", "127.0.0.67")
    mx = mx_farm.server("127.0.0.67", tls_context=server_context(ca, "mx.sts6.test"))
    publish(dns_server, sts_server, "sts6.test", "1", policy("enforce", "mx.other.test"))
    relay = sts_relay(relay_factory, ca_file)
    first = relay.send("app@example.org", ["x@sts6.test"], make_message("first"))
    assert "dsn=4.7.5 status=deferred" in attempt(relay, first, "x@sts6.test")
    relay.stop()
    # The domain fixes its policy and publishes a new id: the cached one is replaced.
    publish(dns_server, sts_server, "sts6.test", "2", policy("enforce", "mx.sts6.test"))
    relay.start()
    second = relay.send("app@example.org", ["y@sts6.test"], make_message("second"))
    messages = mx.wait_messages(2, timeout=30)  # the first one, retried, too
    assert sorted(r for m in messages for r in m.rcpt_tos) == ["x@sts6.test", "y@sts6.test"]
    assert "policy=mta-sts" in attempt(relay, second, "y@sts6.test")
    assert sts_server.fetches == ["mta-sts.sts6.test"] * 2


# -- DANE --------------------------------------------------------------------------------


def dane_domain(dns: DnsServer, farm: MxFarm, domain: str, ip: str, tlsa: str) -> str:
    """A DNSSEC-signed domain (as the validating resolver says) with TLSA for its MX."""
    route(dns, domain, ip)
    name = f"_{farm.port}._tcp.mx.{domain}"
    dns.add(name, "TLSA", tlsa)
    dns.secure(domain, f"mx.{domain}", name)
    return name


def test_dane_ee_record_matching_the_key_delivers(relay_factory, dns_server, mx_farm):
    # A certificate no CA the relay knows vouches for: DANE-EE needs none (RFC 7672 §3.1.1).
    issued = trustme.CA().issue_cert("mx.dane1.test")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    issued.configure_cert(context)
    dane_domain(dns_server, mx_farm, "dane1.test", "127.0.0.71", f"3 1 1 {spki_sha256(issued)}")
    mx = mx_farm.server("127.0.0.71", tls_context=context)
    relay = relay_factory(dns={"dnssec": True})
    queue_id = relay.send("app@example.org", ["x@dane1.test"], make_message("dane"))
    [received] = mx.wait_messages(1)
    assert received.tls
    line = attempt(relay, queue_id, "x@dane1.test")
    assert "status=delivered" in line and "policy=dane" in line and " tls=TLSv1." in line
    assert wait_until(lambda: tls_sessions(relay, "dane", "tls") >= 1)


@pytest.mark.parametrize("starttls", [True, False], ids=["mismatch", "no-starttls"])
def test_dane_record_not_matching_defers_and_never_sends_plaintext(
    relay_factory, dns_server, mx_farm, starttls
):
    context = None
    if starttls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        trustme.CA().issue_cert("mx.dane2.test").configure_cert(context)
    dane_domain(dns_server, mx_farm, "dane2.test", "127.0.0.72", "3 1 1 " + "ab" * 32)
    mx = mx_farm.server("127.0.0.72", tls_context=context)
    relay = relay_factory(dns={"dnssec": True})
    queue_id = relay.send("app@example.org", ["x@dane2.test"], make_message("no plaintext"))
    line = attempt(relay, queue_id, "x@dane2.test")
    assert "dsn=4.7.5 status=deferred" in line and "policy=dane" in line, line
    why = "no TLSA record of mx.dane2.test matches" if starttls else "does not offer STARTTLS"
    assert why in line, line
    assert mx.messages == []
    assert wait_until(lambda: tls_sessions(relay, "dane", "failed") >= 1)


def test_without_dnssec_the_tlsa_records_are_not_trusted(relay_factory, dns_server, mx_farm):
    """The same mismatching record, but dns.dnssec is off: it cannot be trusted, and the
    mail goes as the provider's `tls` says (so the test above can fail)."""
    dane_domain(dns_server, mx_farm, "dane3.test", "127.0.0.73", "3 1 1 " + "ab" * 32)
    mx = mx_farm.server("127.0.0.73")
    relay = relay_factory()
    queue_id = relay.send("app@example.org", ["x@dane3.test"], make_message("plain"))
    mx.wait_messages(1)
    assert "policy=opportunistic" in attempt(relay, queue_id, "x@dane3.test")


# -- no downgrade ------------------------------------------------------------------------


@pytest.mark.parametrize("tls", ["required", "verify"])
@pytest.mark.parametrize("fault", ["no-starttls", "unknown-ca"])
def test_mandatory_tls_never_falls_back_to_plaintext(
    relay_factory, dns_server, mx_farm, authority, tls, fault
):
    _, ca_file = authority
    route(dns_server, "strict.test", "127.0.0.81")
    context = None
    if fault == "unknown-ca":
        context = server_context(trustme.CA(), "mx.strict.test")
    mx = mx_farm.server("127.0.0.81", tls_context=context)
    relay = relay_factory(
        delivery={"ca_file": ca_file},
        providers={"strict": {"domains": ["strict.test"], "tls": tls}},
    )
    queue_id = relay.send("app@example.org", ["x@strict.test"], make_message("mandatory"))
    line = attempt(relay, queue_id, "x@strict.test")
    assert "dsn=4.7.5 status=deferred" in line, line
    assert mx.messages == [] and mx.connections >= 1  # reached, and nothing given to it


def test_verify_checks_the_name_and_required_only_the_chain(
    relay_factory, dns_server, mx_farm, authority
):
    ca, ca_file = authority
    for n, domain in ((82, "chain.test"), (83, "named.test")):
        route(dns_server, domain, f"127.0.0.{n}")
    # Trusted CA, wrong name on both.
    chain = mx_farm.server("127.0.0.82", tls_context=server_context(ca, "other.test"))
    named = mx_farm.server("127.0.0.83", tls_context=server_context(ca, "other.test"))
    relay = relay_factory(
        delivery={"ca_file": ca_file},
        providers={
            "chain": {"domains": ["chain.test"], "tls": "required"},
            "named": {"domains": ["named.test"], "tls": "verify"},
        },
    )
    first = relay.send("app@example.org", ["x@chain.test"], make_message("chain only"))
    second = relay.send("app@example.org", ["x@named.test"], make_message("named"))
    [received] = chain.wait_messages(1)
    assert received.tls
    assert "policy=required" in attempt(relay, first, "x@chain.test")
    line = attempt(relay, second, "x@named.test")
    assert "dsn=4.7.5 status=deferred" in line and "not trusted for that name" in line, line
    assert named.messages == []


def test_verify_delivers_to_a_certificate_valid_for_the_mx_name(
    relay_factory, dns_server, mx_farm, authority
):
    ca, ca_file = authority
    route(dns_server, "good.test", "127.0.0.84")
    mx = mx_farm.server("127.0.0.84", tls_context=server_context(ca, "mx.good.test"))
    relay = relay_factory(
        delivery={"ca_file": ca_file},
        providers={"good": {"domains": ["good.test"], "tls": "verify"}},
    )
    queue_id = relay.send("app@example.org", ["x@good.test"], make_message("verified"))
    [received] = mx.wait_messages(1)
    assert received.tls
    line = attempt(relay, queue_id, "x@good.test")
    assert "policy=verify" in line and " tls=TLSv1." in line, line


# -- opportunistic: broken TLS remembered --------------------------------------------------


def test_opportunistic_falls_back_once_and_remembers_the_broken_mx(
    relay_factory, dns_server, mx_farm
):
    handshakes = []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("mx.broken.test").configure_cert(context)

    def refuse(ssl_object: object, name: str | None, ctx: ssl.SSLContext) -> int:
        handshakes.append(name)
        return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE  # every handshake fails

    context.sni_callback = refuse
    route(dns_server, "broken.test", "127.0.0.85")
    mx = mx_farm.server("127.0.0.85", tls_context=context)
    relay = relay_factory(delivery={"tls_broken_ttl": "1h", "idle_connection_timeout": "1s"})
    first = relay.send("app@example.org", ["a@broken.test"], make_message("first"))
    [received] = mx.wait_messages(1)
    assert not received.tls and handshakes == ["mx.broken.test"]
    assert "status=delivered" in attempt(relay, first, "a@broken.test")
    assert mx.wait_for(lambda: mx.open == 0)  # the next message needs a new session
    second = relay.send("app@example.org", ["b@broken.test"], make_message("second"))
    messages = mx.wait_messages(2)
    assert not messages[1].tls and messages[1].connection != messages[0].connection
    assert handshakes == ["mx.broken.test"]  # remembered: STARTTLS not tried again
    assert "status=delivered" in attempt(relay, second, "b@broken.test")
    assert "TLS with mx.broken.test[127.0.0.85]" in relay.log()


# -- relayed DSN ---------------------------------------------------------------------------


def test_relayed_dsn_when_the_next_hop_has_no_dsn(relay_factory, dns_server, mx_farm, example_org):
    route(dns_server, "nodsn.test", "127.0.0.86")
    mx = mx_farm.server("127.0.0.86")  # aiosmtpd offers no DSN extension
    relay = relay_factory()
    with relay.client() as smtp:
        assert smtp.has_extn("dsn")
        smtp.mail("app@example.org")
        assert smtp.rcpt("asked@nodsn.test", ["NOTIFY=SUCCESS,FAILURE"])[0] == 250
        assert smtp.rcpt("silent@nodsn.test")[0] == 250
        assert smtp.data(make_message("tell me"))[0] == 250
    mx.wait_messages(1)
    [report] = example_org.wait_messages(1)
    text = report.data.decode()
    assert report.mail_from == "<>" and report.rcpt_tos == ["app@example.org"]
    assert "Subject: Successful Mail Delivery Report" in text
    assert "Action: relayed" in text and "Final-Recipient: rfc822; asked@nodsn.test" in text
    assert "silent@nodsn.test" not in text.split("Content-Type: message/delivery-status")[1]
    assert "Remote-MTA: dns; mx.nodsn.test" in text
    assert "sender success notification" in relay.log()


# -- units: parsing and judging, no I/O ----------------------------------------------------


def test_txt_record_and_policy_parsing():
    assert txt_id(["v=STSv1; id=20240101T01;"]) == "20240101T01"
    assert txt_id(["v=STSv1; id=abc", "v=spf1 -all"]) == "abc"
    assert txt_id(["v=STSv1; id=a", "v=STSv1; id=b"]) is None  # RFC 8461 §3.1: not one
    assert txt_id(["v=STSv1; id=not-alnum!"]) is None
    parsed = parse_policy(
        "ex.test",
        "1",
        "version: STSv1\nmode: enforce\nmx: MX1.ex.test\nmx: *.ex.test\nmax_age: 9999999999\n",
        now=1000.0,
    )
    assert parsed.mx == ("mx1.ex.test", "*.ex.test") and parsed.max_age == 31_557_600
    assert parsed.expires == 1000.0 + 31_557_600
    assert parsed.matches("mx1.ex.test") and parsed.matches("a.ex.test")
    assert not parsed.matches("a.b.ex.test") and not parsed.matches("ex.test")  # one label
    for broken in ("version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n", "mode: testing\n"):
        with pytest.raises(ValueError):
            parse_policy("ex.test", "1", broken, now=0.0)


def _cert(
    name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None, signer: object
) -> x509.Certificate:
    """A certificate as public CAs make them (cryptography's verifier is strict)."""
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ca = issuer is None
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
        builder = builder.add_extension(usage, critical=True)
    else:
        assert issuer is not None
        builder = (
            builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()),  # type: ignore[arg-type]
                critical=False,
            )
        )
    return builder.sign(signer, hashes.SHA256())  # type: ignore[arg-type]


def test_dane_matching_of_ee_and_ta_records():
    root_key, leaf_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    root = _cert("Test Root", root_key, None, root_key)
    leaf = _cert("mx.ex.test", leaf_key, root, root_key)
    chain = [c.public_bytes(Encoding.DER) for c in (leaf, root)]
    spki = leaf.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    root_spki = root.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    ok = [
        Tlsa(3, 1, 1, hashlib.sha256(spki).digest()),
        Tlsa(3, 0, 2, hashlib.sha512(chain[0]).digest()),
        Tlsa(3, 1, 0, spki),
        Tlsa(2, 1, 1, hashlib.sha256(root_spki).digest()),
        Tlsa(2, 0, 0, chain[1]),
    ]
    for record in ok:
        assert dane.authenticate([record], chain, "mx.ex.test") is None, record
    # DANE-EE ignores the name; DANE-TA checks it (RFC 7672 §3.2.2).
    assert dane.authenticate([ok[0]], chain, "other.test") is None
    assert dane.authenticate([ok[3]], chain, "other.test") is not None
    # A TA record for the leaf's own key is no trust anchor; a 2 0 0 without the root sent
    # still anchors.
    assert dane.authenticate([Tlsa(2, 1, 1, hashlib.sha256(spki).digest())], chain, "mx.ex.test")
    assert dane.authenticate([ok[4]], chain[:1], "mx.ex.test") is None
    assert dane.authenticate([Tlsa(3, 1, 1, b"\0" * 32)], chain, "mx.ex.test") is not None
    # PKIX-EE(1) is not usable for SMTP (RFC 7672 §3.1): dropped, TLS still mandatory.
    assert dane.usable([Tlsa(1, 1, 1, hashlib.sha256(spki).digest()), ok[0]]) == (ok[0],)


def test_judging_a_session_against_requirements():
    plain = TlsFacts(note="mx.ex.test does not offer STARTTLS")
    unverified = TlsFacts("TLSv1.3", "no", (), "self-signed certificate")
    verified = TlsFacts("TLSv1.3", "name", ())
    opportunistic, verify = provider_requirement("opportunistic"), provider_requirement("verify")
    assert judge(opportunistic, plain, "mx.ex.test").problem is None
    assert judge(verify, unverified, "mx.ex.test").problem is not None
    assert judge(verify, verified, "mx.ex.test").problem is None
    assert "requires TLS" in (judge(provider_requirement("required"), plain, "mx").problem or "")
    sts = parse_policy("ex.test", "1", policy("enforce", "mx.ex.test"), now=0.0)
    enforce = Requirement("mta-sts", tls=True, chain=True, name=True, sts=sts)
    assert judge(enforce, verified, "mx.ex.test").problem is None
    assert "is not an MX" in (judge(enforce, verified, "mx2.ex.test").problem or "")
    testing = Requirement("mta-sts", sts=parse_policy("ex.test", "1", policy("testing", "x"), 0.0))
    assert judge(testing, plain, "mx.ex.test").problem is None
    assert judge(testing, plain, "mx.ex.test").warning is not None
    dane_only = Requirement("dane", tls=True, tlsa=())  # TLSA present, none usable
    assert judge(dane_only, plain, "mx.ex.test").problem is not None
    assert judge(dane_only, unverified, "mx.ex.test").problem is None


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


def test_broken_tls_is_remembered_for_tls_broken_ttl(tmp_path):
    config = parse_config({"spool": {"path": str(tmp_path)}, "delivery": {"tls_broken_ttl": "1h"}})
    clock = _Clock()
    tls = TlsPolicy(config, Resolver(config.dns), clock)
    assert tls.broken("mx[127.0.0.1]:25") is None
    tls.remember_broken("mx[127.0.0.1]:25")
    clock.now += 3599
    assert tls.broken("mx[127.0.0.1]:25") == 1.0
    clock.now += 2
    assert tls.broken("mx[127.0.0.1]:25") is None
