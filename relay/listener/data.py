"""The DATA phase: read the message in large chunks, end only on <CRLF>.<CRLF>.

Reading line by line costs a Python-level iteration per line; we read 64 KiB at a time
and let bytes.find do the scanning. SMTP smuggling (CVE-2023-51764 family) is closed
the way Postfix ≥ 3.9 closes it (smtpd_forbid_bare_newline = normalize): only
<CR><LF>.<CR><LF> ends the data, and a bare LF inside it is normalised to CRLF, so a
"<LF>.<CR><LF>" from a client is content here and cannot become a terminator at the
next hop. A bare CR is normalised the same way: some servers end a line on it, so
"<CR>.<CR><LF>" must not reach them either.

Everything is done a chunk at a time, as the bytes arrive (`_Content`): a whole-body
pass would hold the event loop for seconds, and a regex substitution on a body of bare
LFs builds one object per match (24 MiB of LF took 2.2 GB and 7 s of CPU). Memory is
the stored message twice at most (the pieces and their join), whatever the line endings.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

_END = b"\r\n.\r\n"
CHUNK = 64 * 1024
# RFC 5322 §2.1.1 and RFC 5321 §4.5.3.1.6: 998 octets a line, plus CRLF. The dot added for
# transparency at the next hop is not counted (RFC 5321 §4.5.3.1.6 says so).
MAX_LINE = 998
# Postfix's smtp_line_length_limit breaks a longer line with CRLF and a SPACE, in headers
# and body alike (smtp_text_out): in a header the rest stays a continuation of the same
# field (RFC 5322 §2.2.3 folding); in base64 bodies the space is ignored by decoders.
_FOLD = b"\r\n "
# Joining more than this goes to a worker thread: bytes.join copies without the GIL,
# and a 48 MiB join takes ~20 ms that the event loop would otherwise stand still for.
_JOIN_INLINE = 1024 * 1024


@dataclass(frozen=True, slots=True)
class DataResult:
    content: bytes  # un-dot-stuffed, CRLF line endings, no line over 998; empty when too large
    too_large: bool
    received: int  # bytes the client sent, for logs


def _unread(reader: asyncio.StreamReader, data: bytes) -> None:
    """Give back bytes read past the terminator: a pipelining client's next command.

    StreamReader has no public push-back; aiosmtpd itself clears `_buffer` after
    STARTTLS (RFC 3207 §4.2), and we rely on the same attribute here.
    """
    if data:
        reader._buffer[0:0] = data  # type: ignore[attr-defined]


class _Content:
    """The client's bytes (terminator excluded) → the bytes we store, piece by piece.

    Three stages, each carrying a little state across chunk boundaries: line endings
    (a trailing CR waits for the next chunk: it may be half of a CRLF), transparency
    (whether the next byte starts a line), line length (octets in the current line).
    The size counted against the limit is that of the normalised, un-stuffed message,
    before lines are broken: what Postfix's smtpd counts (a line's length + 2).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.too_large = False
        self._pieces: list[bytes] = []
        self._stored = 0
        self._cr = False
        self._line_start = True
        self._column = 0

    def feed(self, data: bytes) -> None:
        if self.too_large or not data:
            return
        data = self._unstuff(self._line_endings(data))
        self.size += len(data)
        if self.size > self.limit:
            # RFC 5321 §4.5.3.1.7: refused once the client finishes; counted, never kept.
            self.too_large = True
            self._pieces.clear()
            return
        data = self._break_long_lines(data)
        if data:
            self._pieces.append(data)
            self._stored += len(data)

    async def result(self) -> bytes:
        if self._cr:  # a CR held back at the very end: a line end like any other bare CR
            self.feed(b"\n")  # (read_data's content always ends in CRLF; kept for exactness)
        if self.too_large:
            return b""
        pieces, self._pieces = self._pieces, []
        if self._stored <= _JOIN_INLINE:
            return b"".join(pieces)
        return await asyncio.to_thread(b"".join, pieces)

    def _line_endings(self, data: bytes) -> bytes:
        """Bare LF and bare CR → CRLF, with bytes.replace: C loops, no object per line."""
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._cr = True
        crlf = data.count(b"\r\n")
        if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        return data

    def _unstuff(self, data: bytes) -> bytes:
        """Transparency (RFC 5321 §4.5.2): drop the first dot of any line that starts with
        one. Runs after normalisation, so a line that a bare LF or CR began counts too."""
        if not data:
            return data
        ends_line = data.endswith(b"\n")
        if self._line_start and data.startswith(b"."):
            data = data[1:]
        if b"\n." in data:
            data = data.replace(b"\n.", b"\n")
        self._line_start = ends_line
        return data

    def _break_long_lines(self, data: bytes) -> bytes:
        """Break lines over MAX_LINE octets after the 998th octet, with _FOLD.

        `data` has CRLF endings only and never ends in CR, so every CR starts a line
        ending. A window of MAX_LINE + 1 octets from a line's start holds a CR unless
        that line is too long; jumping to the last CR in the window keeps this to a few
        bytes.rfind calls per chunk whatever the line lengths.
        """
        length = len(data)
        out: list[bytes] = []
        start = -self._column  # where the current line began, in data's coordinates
        done = 0  # data[:done] is in `out`
        while start + MAX_LINE + 1 <= length:
            cr = data.rfind(b"\r", max(start, 0), start + MAX_LINE + 1)
            if cr >= 0:
                start = cr + 2
                continue
            cut = start + MAX_LINE
            out += (data[done:cut], _FOLD)
            done = cut
            start = cut - 1  # the continuation line begins with the fold's SPACE
        last_cr = data.rfind(b"\r", max(start, 0))
        self._column = length - (last_cr + 2 if last_cr >= 0 else start)
        if not out:
            return data
        out.append(data[done:])
        return b"".join(out)


async def read_data(
    reader: asyncio.StreamReader, limit: int, on_progress: Callable[[], None]
) -> DataResult:
    """Read up to the end-of-data marker. Raises ConnectionResetError on EOF.

    Past `limit` the bytes are counted and dropped, never buffered (RFC 5321 §4.5.3.1.7
    has the server answer 552 once the client finishes).
    """
    content = _Content(limit)
    received = 0
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
            content.feed(last)
            break
        # Hold back the last 4 bytes: the marker may straddle this chunk and the next.
        keep_from = max(0, len(window) - (len(_END) - 1))
        if keep_from > virtual:
            part = window[virtual:keep_from]
            received += len(part)
            content.feed(part)
        virtual = max(0, virtual - keep_from)
        tail = window[keep_from:]
    if content.too_large:
        return DataResult(b"", True, received)
    return DataResult(await content.result(), False, received)
