"""Reading delivery logs: each line is a delivery attempt, another entry, or malformed.

The delivery line (queue/outcomes.py) carries its facts as JSON keys next to `message`:
`event: "delivery"`, `provider`, `reply` (what the server said, even when the recipient
then expired), `remote`, `verdict` and `status`. Logs written before those keys existed
are read from the message text, whose fields may be added to but keep their order.
"""

from __future__ import annotations

import errno
import gzip
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO

from relay.reply import Reply, Verdict

# A delivery line is a few hundred bytes (a folded reply is at most a few KiB); a longer
# one is not ours, and reading it whole could take any amount of memory.
MAX_LINE = 64 * 1024

_TEXT_LINE = re.compile(
    r"^id=\S+ to=<[^>]*> provider=(?P<provider>\S+) .*?"
    r"status=(?P<status>delivered|deferred|bounced|expired) \((?P<reply>.*)\)$"
)
# An expired recipient's line shows relay's own expiry reply; the server's is inside it.
_EXPIRED = re.compile(r"^\d{3} \S+ delivery time expired \(last reply: (?P<reply>.*)\)$")
# What a lane logs when a rule paused or narrowed a provider (delivery/pause.py, lane.py).
_SUSPENDED = re.compile(r"^provider=(?P<provider>\S+) queue=\S+ suspended for \d+s: ")
_THROTTLED = re.compile(r"^provider=(?P<provider>\S+) throttled for \d+s ")
_VERDICTS = {v.value: v for v in Verdict}


@dataclass(frozen=True, slots=True)
class Recorded:
    """One delivery attempt as the log tells it."""

    provider: str
    reply: Reply
    then: Verdict  # what the reply was judged then (an expired recipient's was deferred)
    at: float | None  # seconds since the epoch; None when the line has no usable time


@dataclass(frozen=True, slots=True)
class Other:
    """A log entry that is not a delivery attempt; `kind` and `provider` when it says
    that a rule suspended or throttled a provider then."""

    kind: str | None = None  # "suspend" or "throttle"
    provider: str = ""


def parse_reply(text: str, remote: bool = True) -> Reply | None:
    """A reply as the log writes it, "550 5.5.0 text", back into a value."""
    code, _, rest = text.partition(" ")
    if len(code) != 3 or not code.isdigit() or code[0] not in "245":
        return None
    reply = Reply.parse(int(code), rest)
    return reply if remote else Reply.local(reply.code, reply.enhanced, reply.text)


def read_line(line: str) -> Recorded | Other | None:
    """One log line: a delivery attempt, another entry, or None when it is malformed."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict):
        return None
    at = _time(entry)
    if entry.get("event") == "delivery":
        return _structured(entry, at)
    message = entry.get("message")
    if not isinstance(message, str):
        return Other()
    match = _TEXT_LINE.match(message)
    if match is not None:
        return _from_text(match, at)
    for kind, pattern in (("suspend", _SUSPENDED), ("throttle", _THROTTLED)):
        paused = pattern.match(message)
        if paused is not None:
            return Other(kind, paused["provider"])
    return Other()


def _time(entry: dict[str, Any]) -> float | None:
    value = entry.get("time")
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def _then(verdict: object, status: object) -> Verdict | None:
    if isinstance(verdict, str) and verdict in _VERDICTS:
        return _VERDICTS[verdict]
    if status == "expired":  # only a deferred recipient expires
        return Verdict.DEFERRED
    return _VERDICTS.get(status) if isinstance(status, str) else None


def _structured(entry: dict[str, Any], at: float | None) -> Recorded | None:
    provider, text, remote = entry.get("provider"), entry.get("reply"), entry.get("remote", True)
    if not isinstance(provider, str) or not provider or not isinstance(text, str):
        return None
    if not isinstance(remote, bool):
        return None
    reply = parse_reply(text, remote)
    then = _then(entry.get("verdict"), entry.get("status"))
    if reply is None or then is None:
        return None
    return Recorded(provider, reply, then, at)


def _from_text(match: re.Match[str], at: float | None) -> Recorded | None:
    text, status = match["reply"], match["status"]
    if status == "expired":
        inner = _EXPIRED.match(text)
        if inner is None:
            return None
        text = inner["reply"]
    reply = parse_reply(text)
    then = _then(None, status)
    if reply is None or then is None:
        return None
    return Recorded(match["provider"], reply, then, at)


def lines(path: str) -> Iterator[str | None]:
    """Each line of the file; None for one longer than MAX_LINE, whose rest is skipped
    unread. Raises OSError when the file cannot be read to its end."""
    handle = _open(path)
    try:
        # Every step reads at least one character: both loops end with the file.
        chunks = iter(lambda: handle.readline(MAX_LINE), "")
        for line in chunks:
            if len(line) < MAX_LINE or line.endswith("\n"):
                yield line
                continue
            for rest in chunks:  # the same iterator: the long line's remainder is consumed
                if rest.endswith("\n"):
                    break
            yield None
    except EOFError as exc:  # a gzip file cut short, as one being written by logrotate
        raise OSError(errno.EIO, "compressed file ends early", path) from exc
    finally:
        if handle is not sys.stdin:
            handle.close()


def _open(path: str) -> TextIO:
    # Rotated logs are often gzipped (logrotate's `compress`). Stray bytes are replaced,
    # never fatal: a line they spoil is counted as malformed.
    if path == "-":
        return sys.stdin
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")
