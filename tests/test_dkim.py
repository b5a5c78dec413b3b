"""DKIM signing through `relay serve`, checked as a receiver checks it: dkimpy's verifier
reads the public keys from TXT records of the tests' DNS server, over the wire."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import dkim
import dns.message
import dns.query
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from relay.dkim.keygen import keygen, zone_record
from tests.dnsserver import DnsServer
from tests.relayproc import PASSWORD, RelayProcess, make_message
from tests.support import route, scrape, wait_until

SIGNATURES = "relay_dkim_signatures_total"


def publish(dns_server: DnsServer, record: str) -> None:
    """Serve a zone-file line `NAME IN TXT "…" "…"` as `relay dkim keygen` prints it."""
    name, _, strings = record.partition(" IN TXT ")
    dns_server.add(name, "TXT", strings)


def make_key(
    tmp_path: Path, dns_server: DnsServer, domain: str, selector: str, algorithm: str = "rsa"
) -> str:
    """A key file for the config, its record published; returns the file's path."""
    key = keygen(domain, selector, algorithm, None, str(tmp_path / f"{selector}.{domain}.pem"))  # type: ignore[arg-type]
    publish(dns_server, zone_record(key))
    return key.path


def txt_lookup(dns_server: DnsServer):  # type: ignore[no-untyped-def]
    """dkimpy's dnsfunc: the TXT record's strings joined, asked of the tests' server."""

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        query = dns.message.make_query(name.decode(), "TXT")
        answer = dns.query.udp(query, "127.0.0.1", timeout=timeout, port=dns_server.port)
        for rrset in answer.answer:
            for rdata in rrset:
                return b"".join(rdata.strings)
        return None

    return lookup


def signatures(data: bytes) -> list[dict[bytes, bytes]]:
    """The tags of each DKIM-Signature field, top to bottom."""
    parsed = dkim.DKIM(data)
    return [
        dkim.util.parse_tag_value(value)
        for name, value in parsed.headers
        if name.lower() == b"dkim-signature"
    ]


def verifies(data: bytes, dns_server: DnsServer, index: int) -> bool:
    """Signature `index` verifies (dkimpy returns False or raises when it does not)."""
    try:
        return bool(dkim.DKIM(data).verify(idx=index, dnsfunc=txt_lookup(dns_server)))
    except dkim.DKIMException:
        return False


def dkim_config(*keys: tuple[str, str, str]) -> dict[str, object]:
    return {
        "dkim": {"keys": [{"domain": d, "selector": s, "key": k} for d, s, k in keys]},
    }


@pytest.mark.parametrize("algorithms", [("rsa",), ("ed25519",), ("rsa", "ed25519")])
def test_delivered_mail_verifies_and_a_changed_body_does_not(
    relay_factory, dns_server, mx_farm, tmp_path, algorithms
):
    route(dns_server, "example.test", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    keys = [
        (
            "example.org",
            f"sel-{algorithm}",
            make_key(tmp_path, dns_server, "example.org", f"sel-{algorithm}", algorithm),
        )
        for algorithm in algorithms
    ]
    relay = relay_factory(**dkim_config(*keys))
    # A line over 998 octets is broken at acceptance: the signature must cover the
    # broken line, the bytes that travel.
    body = "Hello.\r\n" + "x" * 2500 + "\r\nBye.\r\n"
    relay.send("app@example.org", ["bob@example.test"], make_message("Signed", body))
    [received] = mx.wait_messages(1)
    data = received.data
    assert max(map(len, data.split(b"\r\n"))) <= 998, "the long line was not broken"

    tags = signatures(data)
    assert [t[b"a"] for t in tags] == [
        {"rsa": b"rsa-sha256", "ed25519": b"ed25519-sha256"}[a] for a in algorithms
    ]
    assert data.startswith(b"DKIM-Signature:"), "signed on top, over the trace headers"
    for index, tag in enumerate(tags):
        assert tag[b"d"] == b"example.org"
        assert tag[b"s"] == f"sel-{algorithms[index]}".encode()
        assert tag[b"c"] == b"relaxed/relaxed"
        signed = [h.strip().lower() for h in tag[b"h"].split(b":")]
        # RFC 6376 §5.4.1 fields present, plus From, Subject, To once more (oversigned)
        present = [b"from", b"to", b"subject", b"date"]
        assert sorted(signed) == sorted([*present, b"from", b"subject", b"to"])
        assert b"received" not in signed and b"message-id" not in signed
        assert verifies(data, dns_server, index), f"signature {index} does not verify"

    changed = data.replace(b"Bye.", b"Bye!")
    assert changed != data
    added_from = b"From: <ceo@example.org>\r\n" + data  # what oversigning stops
    for index in range(len(tags)):
        assert not verifies(changed, dns_server, index)
        assert not verifies(added_from, dns_server, index)

    metrics = scrape(relay)[SIGNATURES]
    assert metrics[(("domain", "example.org"), ("result", "signed"))] == 1


def test_a_large_message_signed_off_the_event_loop_verifies(
    relay_factory, dns_server, mx_farm, tmp_path
):
    route(dns_server, "example.test", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    key = make_key(tmp_path, dns_server, "example.org", "big")
    relay = relay_factory(**dkim_config(("example.org", "big", key)))
    line = "0123456789" * 7 + "  \r\n"  # trailing blanks: relaxed body canonicalisation at work
    body = line * (3 * 1024 * 1024 // len(line))  # past SIGN_INLINE (1 MiB): a worker thread
    relay.send("app@example.org", ["bob@example.test"], make_message("Big", body))
    [received] = mx.wait_messages(1)
    assert len(received.data) > 3_000_000
    assert verifies(received.data, dns_server, 0)
    assert not verifies(
        received.data[:-200] + received.data[-200:].replace(b"9", b"8"), dns_server, 0
    )


def test_the_from_domain_picks_the_key_and_a_subdomain_uses_its_parents(
    relay_factory, dns_server, mx_farm, tmp_path
):
    route(dns_server, "example.test", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    relay = relay_factory(
        **dkim_config(
            ("example.org", "main", make_key(tmp_path, dns_server, "example.org", "main")),
            (
                "shop.example.org",
                "shop",
                make_key(tmp_path, dns_server, "shop.example.org", "shop", "ed25519"),
            ),
        )
    )
    senders = ["news@a.news.example.org", "sales@SHOP.example.org", "someone@elsewhere.test"]
    with relay.client() as smtp:
        for index, sender in enumerate(senders):
            smtp.sendmail(
                "app@example.org", ["bob@example.test"], make_message(f"m{index}", sender=sender)
            )
    received = sorted(mx.wait_messages(3), key=lambda m: re.search(rb"Subject: (m\d)", m.data)[1])
    parent, own, unsigned = (r.data for r in received)

    [tag] = signatures(parent)
    assert (tag[b"d"], tag[b"s"]) == (b"example.org", b"main")
    assert verifies(parent, dns_server, 0)
    [tag] = signatures(own)
    assert (tag[b"d"], tag[b"s"]) == (b"shop.example.org", b"shop")
    assert verifies(own, dns_server, 0)
    assert signatures(unsigned) == [], "no key covers elsewhere.test"

    metrics = scrape(relay)[SIGNATURES]
    assert metrics[(("domain", "example.org"), ("result", "signed"))] == 1
    assert metrics[(("domain", "shop.example.org"), ("result", "signed"))] == 1
    assert not any(dict(labels)["domain"] == "elsewhere.test" for labels in metrics)


def test_an_account_with_dkim_false_sends_unsigned(
    relay_factory, dns_server, mx_farm, tmp_path, password_hash
):
    route(dns_server, "example.test", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    account = {"password": password_hash, "senders": ["*@example.org"]}
    relay = relay_factory(
        accounts=[{"name": "app", **account}, {"name": "quiet", "dkim": False, **account}],
        **dkim_config(("example.org", "s1", make_key(tmp_path, dns_server, "example.org", "s1"))),
    )
    for user in ("app", "quiet"):
        with relay.client(auth=False) as smtp:
            smtp.login(user, PASSWORD)
            smtp.sendmail("app@example.org", ["bob@example.test"], make_message(f"from {user}"))
    by_subject = {
        re.search(rb"Subject: from (\w+)", m.data)[1]: m.data for m in mx.wait_messages(2)
    }
    assert len(signatures(by_subject[b"app"])) == 1
    assert signatures(by_subject[b"quiet"]) == []
    assert scrape(relay)[SIGNATURES] == {
        (("domain", "example.org"), ("result", "signed")): 1,
        (("domain", "example.org"), ("result", "failed")): 0,  # a series from the start
    }


def listener_pid(relay: RelayProcess) -> int:
    """The listener process: the daemon's only child."""
    assert relay.proc is not None
    children = Path(f"/proc/{relay.proc.pid}/task/{relay.proc.pid}/children").read_text().split()
    [pid] = children
    return int(pid)


def test_a_key_gone_at_run_time_answers_451_and_keeps_nothing(
    relay_factory, dns_server, mx_farm, tmp_path
):
    route(dns_server, "example.test", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    path = make_key(tmp_path, dns_server, "example.org", "s1")
    relay = relay_factory(**dkim_config(("example.org", "s1", path)))
    relay.send("app@example.org", ["bob@example.test"], make_message("before"))
    mx.wait_messages(1)
    assert wait_until(lambda: relay.spool_files() == []), relay.spool_files()

    saved = Path(path).read_bytes()
    os.unlink(path)
    # The listener process reads the keys when it starts (and at each reload): a new one,
    # started after the first died, finds the file gone.
    os.kill(listener_pid(relay), signal.SIGKILL)
    relay.wait_log("starting another")
    with relay.client() as smtp:
        smtp.mail("app@example.org")
        smtp.rcpt("bob@example.test")
        code, reply = smtp.data(make_message("during"))
    assert (code, reply[:5]) == (451, b"4.3.0"), (code, reply)
    assert relay.spool_files() == [], "a refused message left something in the spool"
    log = relay.wait_log("DKIM signing for example.org failed")
    assert f"dkim.keys[0].key: cannot read {path}" in log
    assert scrape(relay)[SIGNATURES][(("domain", "example.org"), ("result", "failed"))] == 1

    # The client was told to try again: once the key is back (and reloaded), it succeeds.
    Path(path).write_bytes(saved)
    relay.proc.send_signal(signal.SIGHUP)
    relay.wait_log("DKIM keys: example.org s1 rsa")
    relay.send("app@example.org", ["bob@example.test"], make_message("during"))
    assert wait_until(lambda: len(mx.messages) == 2)
    assert verifies(mx.messages[1].data, dns_server, 0)
    assert b"Subject: during" in mx.messages[1].data


def test_keys_reload_with_the_config(relay_factory, dns_server, mx_farm, tmp_path):
    route(dns_server, "example.test", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    relay = relay_factory(
        **dkim_config(("example.org", "old", make_key(tmp_path, dns_server, "example.org", "old")))
    )
    relay.send("app@example.org", ["bob@example.test"], make_message("one"))
    new = make_key(tmp_path, dns_server, "example.org", "new", "ed25519")
    relay.config["dkim"]["keys"] = [{"domain": "example.org", "selector": "new", "key": new}]
    relay.config_path.write_text(yaml.safe_dump(relay.config))
    relay.proc.send_signal(signal.SIGHUP)
    relay.wait_log("DKIM keys: example.org new ed25519")
    relay.send("app@example.org", ["bob@example.test"], make_message("two"))
    first, second = mx.wait_messages(2)
    assert [t[b"s"] for t in signatures(first.data)] == [b"old"]
    assert [t[b"s"] for t in signatures(second.data)] == [b"new"]
    assert verifies(second.data, dns_server, 0)


def test_a_reload_with_an_unusable_key_is_refused_and_the_old_key_signs(
    relay_factory, dns_server, mx_farm, tmp_path
):
    route(dns_server, "example.test", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    relay = relay_factory(
        **dkim_config(("example.org", "old", make_key(tmp_path, dns_server, "example.org", "old")))
    )
    broken = tmp_path / "broken.pem"
    _garbage(broken)
    relay.config["dkim"]["keys"] = [{"domain": "example.org", "selector": "x", "key": str(broken)}]
    relay.config_path.write_text(yaml.safe_dump(relay.config))
    status, answer = relay.api("POST", "/api/reload", {})
    assert status == 422
    assert any("dkim.keys[0].key" in e for e in answer["errors"])
    relay.send("app@example.org", ["bob@example.test"], make_message("after"))
    [received] = mx.wait_messages(1)
    assert [t[b"s"] for t in signatures(received.data)] == [b"old"]
    assert verifies(received.data, dns_server, 0)


def run_relay(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_keygen_writes_0600_and_prints_a_record_that_verifies(
    relay_factory, dns_server, mx_farm, tmp_path, algorithm
):
    done = run_relay(
        "dkim",
        "keygen",
        "--domain",
        "Example.org",
        "--selector",
        "k1",
        "--algorithm",
        algorithm,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    path = tmp_path / "k1.example.org.pem"  # the default name, in the working directory
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    [record] = done.stdout.splitlines()
    match = re.fullmatch(r'k1\._domainkey\.example\.org\. IN TXT ((?:"[^"]*" ?)+)', record)
    assert match, record
    strings = re.findall(r'"([^"]*)"', match[1])
    assert all(len(s) <= 255 for s in strings)
    assert "".join(strings).startswith(f"v=DKIM1; k={algorithm}; p=")
    if algorithm == "rsa":
        assert len(strings) == 2, "a 2048-bit key's record takes two strings"

    again = run_relay(
        "dkim",
        "keygen",
        "--domain",
        "example.org",
        "--selector",
        "k1",
        "--algorithm",
        algorithm,
        cwd=tmp_path,
    )
    assert again.returncode == 1 and "exists" in again.stderr
    assert path.read_bytes() != b"" and stat.S_IMODE(path.stat().st_mode) == 0o600

    publish(dns_server, record)
    route(dns_server, "example.test", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    relay = relay_factory(**dkim_config(("example.org", "k1", str(path))))
    relay.send("app@example.org", ["bob@example.test"], make_message("keygen"))
    [received] = mx.wait_messages(1)
    assert verifies(received.data, dns_server, 0)
    assert not verifies(received.data.replace(b"Hello.", b"Hello!"), dns_server, 0)


def _garbage(path: Path) -> None:
    path.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")


def _encrypted(path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )


def _ec(path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.mark.parametrize(
    ("write", "sentence"),
    [
        (_garbage, "is not a PEM private key"),
        (_encrypted, "is encrypted"),
        (_ec, "is an ECDSA key; DKIM signs with RSA or Ed25519"),
        (None, "cannot read"),
    ],
)
def test_check_config_and_serve_refuse_a_bad_key_naming_its_path(
    relay_factory, dns_server, tmp_path, write, sentence
):
    good = make_key(tmp_path, dns_server, "example.org", "good")
    bad = tmp_path / "bad.pem"
    if write is not None:
        write(bad)
    relay = relay_factory(
        start=False,
        **dkim_config(("example.org", "good", good), ("example.net", "bad", str(bad))),
    )
    done = run_relay("check-config", str(relay.config_path))
    assert done.returncode == 1
    assert f"dkim.keys[1].key: {'cannot read ' if write is None else ''}{bad}" in done.stderr
    assert sentence in done.stderr
    assert "dkim.keys[0]" not in done.stderr
    with pytest.raises(RuntimeError, match=re.escape("dkim.keys[1].key: ")):
        relay.start()

    # Without the bad entry: valid, and the keys it loaded are listed.
    relay.config["dkim"]["keys"] = relay.config["dkim"]["keys"][:1]
    relay.config_path.write_text(yaml.safe_dump(relay.config))
    done = run_relay("check-config", str(relay.config_path))
    assert done.returncode == 0, done.stderr
    assert f"  example.org: selector=good algorithm=rsa 2048 bits {good}" in done.stdout


def test_two_keys_of_one_kind_for_a_domain_are_refused(relay_factory, dns_server, tmp_path):
    relay = relay_factory(
        start=False,
        **dkim_config(
            ("example.org", "a", make_key(tmp_path, dns_server, "example.org", "a")),
            ("example.org", "b", make_key(tmp_path, dns_server, "example.org", "b")),
            ("example.org", "a", make_key(tmp_path, dns_server, "example.org", "c", "ed25519")),
        ),
    )
    done = run_relay("check-config", str(relay.config_path))
    assert done.returncode == 1
    assert "dkim.keys[1]: a second rsa key for example.org (dkim.keys[0] is one)" in done.stderr
    assert "dkim.keys[2].selector: a for example.org is also dkim.keys[0]'s" in done.stderr
