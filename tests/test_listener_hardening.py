"""The listener against abuse it used to let through, each over a real socket to `relay serve`.

AUTH on a listener that offers none; implicit-TLS handshakes outside the connection
caps; parallel password guesses slipping past the lockout, per IP and per account;
ENVID and ORCPT smuggling control characters.
"""

from __future__ import annotations

import asyncio
import base64
import smtplib
import socket
import ssl
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from prometheus_client.parser import text_string_to_metric_families

from relay.listener.abuse import AUTH_WINDOW, KNOWN_GOOD_FOR, LocalAuthFailures
from tests.relayproc import PASSWORD, free_port, make_message


def unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def plain_blob(login: str, password: str) -> str:
    return base64.b64encode(f"\0{login}\0{password}".encode()).decode()


def metric(relay, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{relay.admin_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} not exported")


# AUTH where the listener offers none


def test_a_listener_without_auth_refuses_auth_commands(relay_factory):
    port = free_port()
    relay = relay_factory(
        listeners=[
            {"name": "submission", "address": "127.0.0.1", "port": free_port()},
            {
                "name": "internal",
                "address": "127.0.0.1",
                "port": port,
                "tls": "starttls",
                "auth": "none",
                "trusted_networks": ["127.0.0.2/32"],
            },
        ]
    )
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as smtp:
        smtp.ehlo("outsider.test")
        code, reply = smtp.docmd("AUTH", f"PLAIN {plain_blob('app', PASSWORD)}")
        assert (code, reply[:5]) == (503, b"5.5.1")  # not 538: there is no AUTH to encrypt
        smtp.starttls(context=unverified())
        smtp.ehlo("outsider.test")
        assert "auth" not in smtp.esmtp_features
        for command in (f"PLAIN {plain_blob('app', PASSWORD)}", "LOGIN", "PLAIN"):
            code, reply = smtp.docmd("AUTH", command)
            assert (code, reply[:5]) == (503, b"5.5.1"), (command, reply)
        code, reply = smtp.mail("app@example.org")
        assert (code, reply[:5]) == (554, b"5.7.1")  # still an outsider
    assert relay.spool_files() == []
    assert relay.proc.poll() is None


# Implicit TLS and the connection caps


def tls_greeting(port: int, source: str) -> bytes:
    """The first bytes of an implicit-TLS session, or b"" when it is refused."""
    with socket.create_connection(("127.0.0.1", port), 10, (source, 0)) as raw:
        try:
            with unverified().wrap_socket(raw, server_hostname="relay.test") as tls:
                return tls.recv(200)
        except (ssl.SSLError, OSError):
            return b""


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_implicit_tls_handshakes_count_toward_the_connection_caps(relay_factory):
    port = free_port()
    relay = relay_factory(
        listeners=[
            {"name": "submission", "address": "127.0.0.1", "port": free_port()},
            {"name": "smtps", "address": "127.0.0.1", "port": port, "tls": "implicit"},
        ],
        limits={"max_connections_per_ip": 5, "idle_timeout": "3s"},
    )
    assert tls_greeting(port, "127.0.0.7").startswith(b"220")  # the listener works
    opened = time.monotonic()
    # Eight connections that never send a ClientHello: five take the address's slots.
    stalled = [
        socket.create_connection(("127.0.0.1", port), 10, ("127.0.0.5", 0)) for _ in range(8)
    ]
    try:
        # Accepted in order, after the eight: the address has no slot left.
        assert not tls_greeting(port, "127.0.0.5").startswith(b"220")
        assert tls_greeting(port, "127.0.0.6").startswith(b"220")  # another address is served
        # The stalled handshakes end at the idle timeout, not asyncio's 60 s.
        for sock in stalled:
            assert closed_by_server(sock, timeout=20)
        assert time.monotonic() - opened < 15
    finally:
        for sock in stalled:
            sock.close()
    relay.wait_log("TLS handshake with 127.0.0.5 failed")
    deadline = time.monotonic() + 10
    while not tls_greeting(port, "127.0.0.5").startswith(b"220"):  # slots free as seen
        assert time.monotonic() < deadline, "the stalled handshakes' slots were never freed"
        time.sleep(0.1)


# AUTH failures: counted before the check, per IP and per account


def parallel_logins(port: int, attempts: list[tuple[str, str]]) -> list[int]:
    """Each (client IP, password) on its own session; every AUTH sent at the same moment."""
    ready = threading.Barrier(len(attempts), timeout=60)

    def login(source: str, password: str) -> int:
        with smtplib.SMTP("127.0.0.1", port, timeout=60, source_address=(source, 0)) as smtp:
            smtp.ehlo("guesser.test")
            smtp.starttls(context=unverified())
            smtp.ehlo("guesser.test")
            ready.wait()
            return smtp.docmd("AUTH", f"PLAIN {plain_blob('app', password)}")[0]

    with ThreadPoolExecutor(len(attempts)) as pool:
        return list(pool.map(lambda attempt: login(*attempt), attempts))


def test_parallel_guesses_from_one_address_stop_at_the_lockout(relay_factory):
    relay = relay_factory()
    codes = parallel_logins(relay.port, [("127.0.0.1", f"guess-{i}") for i in range(20)])
    assert codes.count(535) == 5 and codes.count(454) == 15, codes
    assert relay.log().count("AUTH failed from 127.0.0.1") == 5  # five checks, no more
    assert parallel_logins(relay.port, [("127.0.0.1", PASSWORD)]) == [454]  # locked for now


def test_parallel_guesses_from_many_addresses_stop_at_the_account_lockout(relay_factory):
    relay = relay_factory()
    # The application's own address logs in before the attack, on several sessions at
    # once: checks counted in advance must not turn away the right password. A lockout
    # of its account name must not shut it out later either.
    assert parallel_logins(relay.port, [("127.0.0.2", PASSWORD)] * 12) == [235] * 12
    guessers = [(f"127.0.1.{i}", "guess") for i in range(1, 26)]  # one guess each
    codes = parallel_logins(relay.port, guessers)
    assert codes.count(535) == 20 and codes.count(454) == 5, codes
    assert parallel_logins(relay.port, [("127.0.2.1", PASSWORD)]) == [454]  # a newcomer
    assert parallel_logins(relay.port, [("127.0.0.2", PASSWORD)]) == [235]


def test_lockouts_end_with_their_window():
    now = [1000.0]
    failures = LocalAuthFailures(clock=lambda: now[0])

    async def scenario() -> None:
        assert await failures.attempt("192.0.2.1", "app")
        await failures.passed("192.0.2.1", "app")  # the application's own address
        for i in range(20):  # four guesses from each of five addresses
            ip = f"198.51.100.{i % 5}"
            assert await failures.attempt(ip, "APP")  # one name, whatever its case
            await failures.failed(ip, "APP")
        assert not await failures.attempt("198.51.100.9", "app")  # the name is locked
        assert await failures.attempt("192.0.2.1", "app")  # but not for its own address
        await failures.passed("192.0.2.1", "app")
        now[0] += AUTH_WINDOW + 1
        assert await failures.attempt("198.51.100.9", "app")
        await failures.failed("198.51.100.9", "app")
        now[0] += KNOWN_GOOD_FOR - AUTH_WINDOW  # the last good login is a day old
        for i in range(20):
            assert await failures.attempt(f"203.0.113.{i}", "app")
            await failures.failed(f"203.0.113.{i}", "app")
        assert not await failures.attempt("192.0.2.1", "app")

    asyncio.run(scenario())


def test_each_refused_auth_is_counted_in_the_metric(relay_factory):
    relay = relay_factory()
    assert metric(relay, "relay_auth_failures_total") == 0
    codes = parallel_logins(relay.port, [("127.0.0.4", f"guess-{i}") for i in range(7)])
    assert sorted(codes) == [454, 454, 535, 535, 535, 535, 535]
    deadline = time.monotonic() + 10  # reported by the listener process, a moment later
    while metric(relay, "relay_auth_failures_total") != 7:
        assert time.monotonic() < deadline, metric(relay, "relay_auth_failures_total")
        time.sleep(0.1)


# Envelope parameters that decode to control characters


def test_envid_and_orcpt_may_not_decode_to_control_characters(relay_factory, dns_server, mx_farm):
    dns_server.add("example.test", "A", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    relay = relay_factory()
    with relay.client() as smtp:
        for envid in ("a+0Db", "a+0Ab", "a+00b", "a+7Fb", "a+1Bb", "a+85b"):
            code, reply = smtp.docmd("MAIL", f"FROM:<app@example.org> ENVID={envid}")
            assert (code, reply[:5]) == (501, b"5.5.4"), (envid, reply)
        assert smtp.docmd("MAIL", "FROM:<app@example.org> ENVID=a+2Bb")[0] == 250
        for orcpt in ("rfc822;x+0D+0AMAIL@example.test", "rfc822;x+00@example.test"):
            code, reply = smtp.docmd("RCPT", f"TO:<x@example.test> ORCPT={orcpt}")
            assert (code, reply[:5]) == (501, b"5.5.4"), (orcpt, reply)
        code, _ = smtp.docmd("RCPT", "TO:<x@example.test> ORCPT=rfc822;x+2By@example.test")
        assert code == 250
        assert smtp.data(make_message("params"))[0] == 250
    [message] = mx.wait_messages(1)
    assert message.rcpt_tos == ["x@example.test"]
