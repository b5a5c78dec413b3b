"""Headers the submission server adds (RFC 6409 §8, RFC 5321 §4.4) and reads (class)."""

from __future__ import annotations

import re
import time
from email.utils import formatdate

_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.MULTILINE)
_PRECEDENCE = re.compile(
    rb"^precedence[ \t]*:[ \t]*(bulk|list|junk)\b", re.IGNORECASE | re.MULTILINE
)


def header_block(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 2]


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
