"""A hostile world: open-relay probes, abusive accounts and clients, malformed input.

After every hostile case a normal client must still be served.
"""

from __future__ import annotations

import base64
import contextlib
import smtplib
import socket
import time

import pytest

from tests.relayproc import PASSWORD, free_port, make_message
from tests.support import scrape


def greet(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    assert sock.recv(512).startswith(b"220"), "no greeting"
    return sock


def exchange(sock: socket.socket, data: bytes, timeout: float = 10) -> bytes:
    """Send, then read replies until one is complete (its last line has a space)."""
    sock.sendall(data)
    sock.settimeout(timeout)
    buffer = b""
    deadline = time.monotonic() + timeout
    while len(buffer) < 1 << 20:
        assert time.monotonic() < deadline, f"no complete reply within {timeout}s: {buffer!r}"
        chunk = sock.recv(65536)
        if not chunk:
            return buffer
        buffer += chunk
        lines = buffer.split(b"\r\n")
        if len(lines) > 1 and len(lines[-2]) > 3 and lines[-2][3:4] == b" " and lines[-1] == b"":
            return buffer
    raise AssertionError(f"a reply of more than 1 MiB: {buffer[:200]!r}")


def still_serves(relay) -> None:
    """A normal authenticated client submits a message."""
    with relay.client() as smtp:
        smtp.mail("app@example.org")
        smtp.rcpt("check@example.test")
        code, _ = smtp.data(make_message("still alive"))
        assert code == 250


RELAY_TEST_FORMS = [  # what public open-relay testers try, victim at victim.test
    "<victim@victim.test>",
    "<victim%victim.test@relay.test>",
    '<"victim@victim.test">',
    '<"victim@victim.test"@relay.test>',
    "<victim@victim.test@relay.test>",
    "<@relay.test:victim@victim.test>",
    "<victim.test!victim@relay.test>",
    "<victim%victim.test@[127.0.0.1]>",
    "<victim@[127.0.0.1]>",
    "victim@victim.test",
]


@pytest.mark.parametrize("sender", ["<tester@relaytest.test>", "<>", "<victim@victim.test>"])
def test_unauthenticated_clients_cannot_relay_anything(relay_factory, sender):
    relay = relay_factory()
    sock = greet(relay.port)
    exchange(sock, b"EHLO relaytester.test\r\n")
    for form in RELAY_TEST_FORMS:
        reply = exchange(sock, f"MAIL FROM:{sender}\r\n".encode())
        assert reply.startswith(b"530 5.7.0"), (sender, reply)
        reply = exchange(sock, f"RCPT TO:{form}\r\n".encode())
        assert reply[:3] in (b"503", b"530"), (form, reply)
        assert exchange(sock, b"DATA\r\n")[:3] in (b"503", b"530")
        exchange(sock, b"RSET\r\n")
    sock.close()
    assert relay.spool_files() == []


def test_trusted_networks_are_exact(relay_factory, dns_server, mx_farm):
    dns_server.add("example.test", "A", "127.0.0.2")
    mx_farm.server("127.0.0.2")
    port = free_port()
    relay_factory(
        listeners=[
            {
                "name": "local",
                "address": "127.0.0.1",
                "port": port,
                "tls": "none",
                "auth": "none",
                "trusted_networks": ["127.0.0.2/32"],
            }
        ]
    )
    outsider = greet(port, "127.0.0.1")
    exchange(outsider, b"EHLO outsider.test\r\n")
    assert exchange(outsider, b"MAIL FROM:<app@example.org>\r\n").startswith(b"554 5.7.1")
    outsider.close()
    with smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.2", 0), timeout=10) as smtp:
        smtp.ehlo("insider.test")
        assert "auth" not in smtp.esmtp_features  # auth: none offers no AUTH
        assert smtp.sendmail("app@example.org", ["bob@example.test"], make_message("ok")) == {}


def test_odd_addresses_from_an_authenticated_client_stay_where_they_say(
    relay_factory, dns_server, mx_farm
):
    dns_server.add("example.test", "A", "127.0.0.2")
    dns_server.add("victim.test", "A", "127.0.0.3")
    target, victim = mx_farm.server("127.0.0.2"), mx_farm.server("127.0.0.3")
    relay = relay_factory()
    with relay.client() as smtp:
        smtp.mail("app@example.org")
        accepted = [
            "<user%victim.test@example.test>",
            '<"user@victim.test"@example.test>',
            "<victim.test!user@example.test>",
        ]
        for form in accepted:
            assert smtp.docmd(f"RCPT TO:{form}")[0] == 250, form
        for form in [
            "<@victim.test:user@example.test>",
            "<user@victim.test@example.test>",
            "<user@victim.test",
            "<user>",
            "<@>",
        ]:
            assert smtp.docmd(f"RCPT TO:{form}")[0] == 501, form
        assert smtp.data(make_message("odd"))[0] == 250
    [message] = target.wait_messages(1)
    assert sorted(message.rcpt_tos) == sorted(
        [
            "user%victim.test@example.test",
            '"user@victim.test"@example.test',
            "victim.test!user@example.test",
        ]
    )
    relay.stop()
    assert victim.messages == [] and victim.connections == 0


def test_account_rate_refuses_at_mail_and_accepts_nothing(relay_factory, password_hash):
    relay = relay_factory(
        accounts=[
            {"name": "app", "password": password_hash, "senders": ["*@example.org"], "rate": "3/h"}
        ]
    )
    with relay.client() as smtp:
        for i in range(3):
            smtp.sendmail("app@example.org", ["x@example.test"], make_message(f"r{i}"))
        code, reply = smtp.mail("app@example.org")
        assert (code, reply[:5]) == (450, b"4.7.1") and b"over its sending rate" in reply
        assert smtp.rcpt("x@example.test")[0] == 503  # nothing half-accepted
    metrics = scrape(relay)
    assert (
        metrics["relay_messages_received_total"][(("account", "app"), ("class", "transactional"))]
        == 3
    )
    assert metrics["relay_messages_rejected_total"][(("reason", "rate"),)] == 1


def test_sender_domain_must_be_routable(relay_factory, dns_server, password_hash):
    dns_server.servfail("flaky.org")
    dns_server.mx("nullmx.org", (0, "."))
    relay = relay_factory(accounts=[{"name": "app", "password": password_hash, "senders": ["*"]}])
    with relay.client() as smtp:
        code, reply = smtp.mail("someone@no-such-domain.org")
        assert (code, reply[:5]) == (550, b"5.1.8")
        smtp.rset()
        assert smtp.mail("someone@nullmx.org")[0] == 550
        smtp.rset()
        code, reply = smtp.mail("someone@flaky.org")
        assert (code, reply[:5]) == (451, b"4.1.8")
        smtp.rset()
        assert smtp.mail("app@example.org")[0] == 250


def test_auth_failures_are_throttled_then_refused(relay_factory):
    relay = relay_factory()

    def try_login(password: str, source: str = "127.0.0.1") -> tuple[int, float]:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30, source_address=(source, 0)) as smtp:
            smtp.ehlo("guesser.test")
            smtp.starttls(context=__import__("ssl")._create_unverified_context())
            smtp.ehlo("guesser.test")
            blob = base64.b64encode(f"\0app\0{password}".encode()).decode()
            started = time.monotonic()
            code, _ = smtp.docmd("AUTH", f"PLAIN {blob}")
            return code, time.monotonic() - started

    delays = []
    for guess in range(5):
        code, took = try_login(f"guess-{guess}")
        assert code == 535
        delays.append(took)
    assert delays[4] >= 3.5 and delays[4] > delays[2] > delays[0]  # growing
    code, _ = try_login(PASSWORD)  # even the right password: locked for now
    assert code == 454
    unknown_code, _ = try_login(PASSWORD, source="127.0.0.2")
    assert unknown_code == 235  # another client is not punished
    assert relay.log().count("AUTH failed from 127.0.0.1") == 5


def test_no_account_enumeration(relay_factory, password_hash):
    relay = relay_factory()
    replies = []
    for login in ("app", "no-such-account"):
        with relay.client(auth=False) as smtp:
            try:
                smtp.login(login, "wrong")
            except smtplib.SMTPAuthenticationError as exc:
                replies.append((exc.smtp_code, exc.smtp_error))
    assert replies[0] == replies[1] == (535, b"5.7.8 Authentication credentials invalid")


def test_connection_limits_per_ip_and_in_total(relay_factory):
    relay = relay_factory(limits={"max_connections": 6, "max_connections_per_ip": 3})
    held = [greet(relay.port) for _ in range(3)]
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as extra:
        assert extra.recv(200).startswith(b"421 4.7.0")
    held += [greet(relay.port, "127.0.0.2") for _ in range(3)]
    with socket.create_connection(
        ("127.0.0.1", relay.port), timeout=10, source_address=("127.0.0.3", 0)
    ) as extra:
        assert extra.recv(200).startswith(b"421 4.7.0")
    for sock in held:
        sock.close()
    relay.wait_log("too many connections")
    deadline = time.monotonic() + 10
    while True:  # the slots free as the daemon sees the closes
        try:
            still_serves(relay)
            break
        except (smtplib.SMTPException, AssertionError):
            assert time.monotonic() < deadline
            time.sleep(0.1)


@pytest.fixture
def open_relay_for_junk(relay_factory, dns_server, mx_farm):
    """A trusted plain listener, so junk reaches every stage up to DATA, plus the usual one."""
    dns_server.add("example.test", "A", "127.0.0.2")
    mx_farm.server("127.0.0.2")
    plain = free_port()
    relay = relay_factory(
        listeners=[
            {"name": "submission", "address": "127.0.0.1", "port": free_port(), "tls": "starttls"},
            {
                "name": "local",
                "address": "127.0.0.1",
                "port": plain,
                "tls": "none",
                "auth": "none",
                "trusted_networks": ["127.0.0.0/8"],
            },
        ],
        limits={"max_message_size": "64KiB", "max_recipients": 100, "idle_timeout": "2s"},
    )
    relay.plain_port = plain
    return relay


def session(relay) -> socket.socket:
    sock = greet(relay.plain_port)
    assert exchange(sock, b"EHLO junk.test\r\n").startswith(b"250")
    return sock


def begin_data(relay, recipient: str) -> socket.socket:
    """A session that has reached DATA (354) with one recipient."""
    sock = session(relay)
    assert exchange(sock, b"MAIL FROM:<app@example.org>\r\n").startswith(b"250")
    assert exchange(sock, f"RCPT TO:<{recipient}>\r\n".encode()).startswith(b"250")
    assert exchange(sock, b"DATA\r\n").startswith(b"354")
    return sock


def test_overlong_command_lines(open_relay_for_junk):
    relay = open_relay_for_junk
    sock = session(relay)
    assert exchange(sock, b"NOOP " + b"x" * 2000 + b"\r\n").startswith(b"500")
    assert exchange(sock, b"MAIL FROM:<" + b"a" * 200_000 + b"@example.org>\r\n").startswith(b"500")
    assert exchange(sock, b"NOOP\r\n").startswith(b"250")
    sock.close()
    still_serves(relay)


@pytest.mark.parametrize(
    "junk",
    [
        b"MA\x00IL FROM:<a@example.org>\r\n",
        b"\xff\xfe\xfd\r\n",
        b"\x00\x00\x00\r\n",
        b"MAIL FROM:<caf\xc3@example.org>\r\n",
        b"MAIL FROM:<caf\xe9@example.org> SMTPUTF8\r\n",
        b"RCPT TO:<b@example.test>\r\n",
        b"DATA\r\n",
        b"BDAT 10 LAST\r\n",
        b"\r\n",
        b"MAIL FROM:<a@example.org> SIZE=abc\r\n",
        b"MAIL FROM:<a@example.org> NOSUCH=1\r\n",
    ],
)
def test_junk_gets_a_clear_reply(open_relay_for_junk, junk):
    relay = open_relay_for_junk
    sock = session(relay)
    reply = exchange(sock, junk)
    assert reply[:1] in (b"4", b"5"), reply
    assert exchange(sock, b"NOOP\r\n").startswith(b"250")
    sock.close()
    still_serves(relay)


def test_ten_thousand_recipients(open_relay_for_junk):
    relay = open_relay_for_junk
    sock = session(relay)
    assert exchange(sock, b"MAIL FROM:<app@example.org>\r\n").startswith(b"250")
    burst = b"".join(b"RCPT TO:<u%d@example.test>\r\n" % i for i in range(10_000))
    sock.sendall(burst)
    replies = b""
    sock.settimeout(30)
    deadline = time.monotonic() + 30
    while replies.count(b"\r\n") < 10_000 and time.monotonic() < deadline:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break  # closed early: the count below says how far it got
        replies += chunk
    codes = [line[:3] for line in replies.split(b"\r\n") if line]
    assert codes.count(b"250") == 100 and codes.count(b"452") == 9_900
    assert exchange(sock, b"RSET\r\n").startswith(b"250")
    sock.close()
    still_serves(relay)


def test_oversized_data_is_refused_without_buffering(open_relay_for_junk):
    relay = open_relay_for_junk
    sock = begin_data(relay, "big@example.test")
    line = b"y" * 998 + b"\r\n"
    for _ in range(2000):  # 2 MB into a 64 KiB limit
        sock.sendall(line)
    reply = exchange(sock, b".\r\n", timeout=30)
    assert reply.startswith(b"552 5.3.4")
    assert exchange(sock, b"NOOP\r\n").startswith(b"250")
    sock.close()
    assert relay.spool_files() == []
    still_serves(relay)


def test_bare_lf_is_normalised_before_relaying(open_relay_for_junk, mx_farm):
    relay = open_relay_for_junk
    mx = mx_farm.servers["127.0.0.2"]
    sock = begin_data(relay, "lf@example.test")
    reply = exchange(sock, b"Subject: lf\n\nline one\nline two\n.\nMAIL FROM:<evil@x>\r\n\r\n.\r\n")
    assert reply.startswith(b"250")
    sock.close()
    [message] = mx.wait_messages(1)
    assert message.rcpt_tos == ["lf@example.test"]  # no smuggled second message
    assert b"\n" not in message.data.replace(b"\r\n", b"")
    assert b"MAIL FROM:<evil@x>" in message.data  # content, never a command


def test_client_vanishing_mid_data_stores_nothing(open_relay_for_junk):
    relay = open_relay_for_junk
    sock = begin_data(relay, "cut@example.test")
    sock.sendall(b"Subject: cut\r\n\r\nhalf a message")
    sock.close()
    still_serves(relay)
    relay.stop()
    assert [f for f in relay.spool_files() if "cut" in f] == []
    assert "Traceback" not in relay.log()


def test_slow_drip_client_is_cut_off(open_relay_for_junk):
    relay = open_relay_for_junk
    sock = session(relay)
    started = time.monotonic()
    with contextlib.suppress(OSError):
        for char in b"NOOP and on and on and on":  # one byte a second, never a full line
            sock.sendall(bytes([char]))
            time.sleep(0.5)
            if time.monotonic() - started > 8:
                break
    sock.settimeout(5)
    try:
        closed = sock.recv(100) == b""
    except ConnectionResetError:
        closed = True
    except TimeoutError:
        closed = False
    assert closed, "a client dripping one byte at a time was never cut off"
    assert time.monotonic() - started < 12
    sock.close()
    still_serves(relay)


def test_flood_of_idle_connections(open_relay_for_junk):
    relay = open_relay_for_junk
    flood = []
    for _i in range(60):  # beyond the 50 per IP
        try:
            flood.append(
                socket.create_connection(
                    ("127.0.0.1", relay.plain_port), timeout=5, source_address=("127.0.0.4", 0)
                )
            )
        except OSError:
            break
    first = [s.recv(100)[:3] for s in flood]
    assert first.count(b"220") == 50 and first.count(b"421") == 10
    still_serves(relay)  # another IP is served meanwhile
    # the idle ones are cut off after idle_timeout (2 s here)
    started = time.monotonic()
    flood[0].settimeout(15)
    assert flood[0].recv(100) == b""  # closed by the server
    assert time.monotonic() - started < 10
    for sock in flood:
        sock.close()


def test_overlong_header_line(open_relay_for_junk):
    relay = open_relay_for_junk
    sock = begin_data(relay, "long@example.test")
    reply = exchange(
        sock,
        b"Subject: " + b"w" * 50_000 + b"\r\nX-Other: " + b"z" * 9_000 + b"\r\n\r\nbody\r\n.\r\n",
    )
    assert reply.startswith(b"250")  # within max_message_size: accepted as sent
    assert exchange(sock, b"NOOP\r\n").startswith(b"250")
    sock.close()
    still_serves(relay)
