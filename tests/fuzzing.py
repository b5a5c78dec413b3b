"""The listener fuzz harness, shared by the test suite (short) and fuzz/listener.py (long).

Inputs are sequences mixing valid SMTP commands, protocol fragments and raw junk, so the
fuzzer reaches every stage (greeting, EHLO, AUTH, MAIL, RCPT, DATA) rather than being
refused at the first byte. Each input is sent on a fresh connection to a real listener;
after it, a normal client must still complete a session.
"""

from __future__ import annotations

import base64
import contextlib
import socket

from hypothesis import strategies as st

COMMANDS = [
    b"EHLO fuzz.test\r\n",
    b"HELO fuzz.test\r\n",
    b"MAIL FROM:<app@example.org>\r\n",
    b"MAIL FROM:<app@example.org> SIZE=100 BODY=8BITMIME SMTPUTF8\r\n",
    b"MAIL FROM:<app@example.org> RET=HDRS ENVID=a+2Bb\r\n",
    b"MAIL FROM:<>\r\n",
    b"RCPT TO:<a@example.test>\r\n",
    b"RCPT TO:<b@example.test> NOTIFY=FAILURE,DELAY\r\n",
    b"RCPT TO:<c@example.test> ORCPT=rfc822;c@example.test\r\n",
    b"DATA\r\n",
    b"Subject: fuzz\r\n\r\nbody\r\n",
    b".\r\n",
    b"\r\n.\r\n",
    b"..\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"VRFY a\r\n",
    b"EXPN b\r\n",
    b"HELP\r\n",
    b"STARTTLS\r\n",
    b"AUTH PLAIN " + base64.b64encode(b"\0app\0wrong") + b"\r\n",
    b"AUTH LOGIN\r\n",
    b"AUTH PLAIN\r\n",
    b"*\r\n",
    b"BDAT 5 LAST\r\n",
    b"QUIT\r\n",
]
FRAGMENTS = [
    b"\r",
    b"\n",
    b"\r\n",
    b".",
    b"\x00",
    b"<",
    b">",
    b":",
    b"@",
    b" ",
    b"=",
    b"\xff",
    b"\xc3\xa9",
    b"MAIL",
    b"RCPT",
    b"FROM:",
    b"TO:",
    b"%",
    b'"',
    b"\\",
]

chunks = st.one_of(
    st.sampled_from(COMMANDS),
    st.sampled_from(FRAGMENTS),
    st.binary(max_size=64),
    st.builds(lambda n, c: c * n, st.integers(1, 3000), st.sampled_from([b"A", b"\n", b"."])),
)
inputs = st.lists(chunks, min_size=1, max_size=25).map(b"".join)


def send(port: int, data: bytes, timeout: float = 2.0) -> bytes:
    """Deliver one input; collect whatever the server says until it goes quiet or closes."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        sock.settimeout(timeout)
        with contextlib.suppress(OSError):
            while len(received) < 1 << 20:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
    return received


def healthy(port: int) -> bool:
    """A normal client still gets through a session."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        reader = sock.makefile("rb")

        def reply() -> bytes:
            while True:
                line = reader.readline()
                if line[3:4] != b"-":
                    return line

        if not reply().startswith(b"220"):
            return False
        for command, expect in (
            (b"EHLO ok.test\r\n", b"250"),
            (b"NOOP\r\n", b"250"),
            (b"QUIT\r\n", b"221"),
        ):
            sock.sendall(command)
            if not reply().startswith(expect):
                return False
    return True
