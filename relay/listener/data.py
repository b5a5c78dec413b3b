"""The DATA phase: read the message in large chunks, end only on <CRLF>.<CRLF>.

Reading line by line costs a Python-level iteration per line; we read 64 KiB at a time
and let bytes.find do the scanning. SMTP smuggling (CVE-2023-51764 family) is closed
the way Postfix ≥ 3.9 closes it (smtpd_forbid_bare_newline = normalize): only
<CR><LF>.<CR><LF> ends the data, and a bare LF inside it is normalised to CRLF, so a
"<LF>.<CR><LF>" from a client is content here and cannot become a terminator at the
next hop.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass

_END = b"\r\n.\r\n"
_BARE_LF = re.compile(rb"(?<!\r)\n")
CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class DataResult:
    content: bytes  # un-dot-stuffed, CRLF line endings; empty when too large
    too_large: bool
    received: int  # bytes the client sent, for logs


def _unread(reader: asyncio.StreamReader, data: bytes) -> None:
    """Give back bytes read past the terminator: a pipelining client's next command.

    StreamReader has no public push-back; aiosmtpd itself clears `_buffer` after
    STARTTLS (RFC 3207 §4.2), and we rely on the same attribute here.
    """
    if data:
        reader._buffer[0:0] = data  # type: ignore[attr-defined]


async def read_data(
    reader: asyncio.StreamReader, limit: int, on_progress: Callable[[], None]
) -> DataResult:
    """Read up to the end-of-data marker. Raises ConnectionResetError on EOF.

    Past `limit` the bytes are counted and dropped, never buffered (RFC 5321 §4.5.3.1.7
    has the server answer 552 once the client finishes).
    """
    pieces: list[bytes] = []
    stored = received = 0
    too_large = False
    tail = b"\r\n"  # the DATA command's own CRLF: lets ".\r\n" first end an empty message
    virtual = 2  # leading bytes of `tail` that are not message content
    while True:
        chunk = await reader.read(CHUNK)
        if not chunk:
            raise ConnectionResetError("connection closed during DATA")
        on_progress()
        window = tail + chunk
        end = window.find(_END)
        if end >= 0:
            last = window[virtual : end + 2] if end + 2 > virtual else b""
            _unread(reader, window[end + len(_END) :])
            received += len(last)
            if not too_large and stored + len(last) <= limit:
                pieces.append(last)
            else:
                too_large = True
            break
        # Hold back the last 4 bytes: the marker may straddle this chunk and the next.
        keep_from = max(0, len(window) - (len(_END) - 1))
        if keep_from > virtual:
            part = window[virtual:keep_from]
            received += len(part)
            if not too_large and stored + len(part) <= limit:
                pieces.append(part)
                stored += len(part)
            else:
                too_large = True
                pieces.clear()
        virtual = max(0, virtual - keep_from)
        tail = window[keep_from:]
    if too_large:
        return DataResult(b"", True, received)
    raw = b"".join(pieces)
    if raw.count(b"\n") != raw.count(b"\r\n"):
        raw = _BARE_LF.sub(b"\r\n", raw)
    # Transparency (RFC 5321 §4.5.2): drop the first dot of any line that starts with one.
    if raw.startswith(b"."):
        raw = raw[1:]
    if b"\n." in raw:
        raw = raw.replace(b"\n.", b"\n")
    return DataResult(raw, False, received)
