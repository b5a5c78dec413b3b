"""Headers the submission server adds (RFC 6409 §8, RFC 5321 §4.4) and reads (class)."""

from __future__ import annotations

import re
import time
from email.utils import formatdate

_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.MULTILINE)
_PRECEDENCE = re.compile(
    rb"^precedence[ \t]*:[ \t]*(bulk|list|junk)\b", re.IGNORECASE | re.MULTILINE
)


# How far into a message its header section is looked for. Without a blank line the
# whole message would count as header and be scanned by the regexes below in one step of
# the event loop (~400 ms for 24 MiB); a MiB of header fields is far beyond real mail.
HEADER_SCAN = 1024 * 1024


def header_block(message: bytes) -> bytes:
    """The header section through its last CRLF (RFC 5322 §2.1), within HEADER_SCAN."""
    if message.startswith(b"\r\n"):
        return b""  # an empty header section: the body starts at once
    end = message.find(b"\r\n\r\n", 0, HEADER_SCAN)
    if end >= 0:
        return message[: end + 2]
    if len(message) <= HEADER_SCAN:
        return message
    last = message.rfind(b"\r\n", 0, HEADER_SCAN)
    return message[: last + 2] if last >= 0 else b""


def field_names(headers: bytes) -> set[str]:
    return {name.decode("ascii", "replace").lower() for name in _FIELD.findall(headers)}


def detect(headers: bytes, names: set[str]) -> set[str]:
    """Which class detectors the headers trigger."""
    found = set()
    if "list-id" in names:
        found.add("list-id")
    if "list-unsubscribe" in names:
        found.add("list-unsubscribe")
    if _PRECEDENCE.search(headers):
        found.add("precedence-bulk")
    return found


def trace_headers(
    *,
    message_id: str,
    hostname: str,
    helo: str,
    peer_ip: str,
    tls: bool,
    authenticated: bool,
    esmtp: bool,
    recipients: list[str],
    names: set[str],
    now: float | None = None,
) -> bytes:
    """Received, plus Message-ID and Date when the client left them out."""
    now = time.time() if now is None else now
    protocol = (
        ("ESMTP" if esmtp else "SMTP") + ("S" if tls else "") + ("A" if authenticated else "")
    )
    helo = re.sub(r"[^\x21-\x7e]", "?", helo)[:255] or "unknown"
    lines = [
        f"Received: from {helo} (unknown [{peer_ip}])\r\n"
        f"\tby {hostname} (relay) with {protocol} id {message_id}"
        + (f"\r\n\tfor <{recipients[0]}>" if len(recipients) == 1 else "")
        + f"; {formatdate(now, localtime=True)}\r\n"
    ]
    if "message-id" not in names:
        lines.append(f"Message-ID: <{message_id}@{hostname}>\r\n")
    if "date" not in names:
        lines.append(f"Date: {formatdate(now, localtime=True)}\r\n")
    return "".join(lines).encode("utf-8", "replace")
