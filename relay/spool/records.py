"""What the spool stores, as typed values, and its versioned on-disk encoding.

A message file is immutable once renamed into place:

    RELAY-SPOOL 1\\n
    <length of the envelope JSON>\\n
    <envelope JSON>\\n
    <message bytes, CRLF line endings, as received plus our trace headers>

Recipient progress goes to a separate append-only log (`<id>.st`), one JSON object a
line, so the body is written once however many recipients and attempts there are. A
torn last line (crash mid-append) is ignored: the outcome it would have recorded is
repeated, which is the at-least-once the SPEC allows for deliveries in flight. Status 5
(`transferred`) came after the first release: a release without it skips such a line,
and delivers those recipients itself (again, at least once, never lost).

A message's timeline (relay/history) goes to a third file beside it, `<id>.ev`, once the
message has waited a few seconds (one delivered at once never gets one): one JSON object
a line, `{"time": <wall clock>, "event": <kind>, ...}`, appended, never rewritten; the
kinds and their keys are listed in relay/history/events.py. Unlike the envelope and the
progress log it is not fsync'd: it is a record for people, never read to decide what to
deliver: a crash may cost the events of its last few seconds (until then they wait in
the writer's memory) and a power cut its last lines (or leave a torn one, skipped when
read), never a message. Recovery removes a timeline whose message is gone, like a progress log.
When the message leaves the queue, its timeline is read into the history database
(`<spool>/history.sqlite`) and the file removed.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

from relay.errors import SpoolCorrupt

MAGIC = b"RELAY-SPOOL "
VERSION = 1


class RecipientStatus(enum.IntEnum):
    PENDING = 0
    DELIVERED = 1
    BOUNCED = 2
    EXPIRED = 3
    DEFERRED = 4  # pending, with a next attempt in the future
    TRANSFERRED = 5  # handed to a peer relay (`relay queue transfer`), which took it with 250

    @property
    def is_final(self) -> bool:
        return self in _FINAL


_FINAL = frozenset(
    (
        RecipientStatus.DELIVERED,
        RecipientStatus.BOUNCED,
        RecipientStatus.EXPIRED,
        RecipientStatus.TRANSFERRED,
    )
)


@dataclass(frozen=True, slots=True)
class EnvelopeRecipient:
    address: str
    notify: str | None = None  # RFC 3461 NOTIFY as given, e.g. "FAILURE,DELAY" or "NEVER"
    orcpt: str | None = None  # RFC 3461 ORCPT as given, e.g. "rfc822;user@example.org"


@dataclass(frozen=True, slots=True)
class Envelope:
    id: str
    sender: str  # "" for DSNs (null reverse path)
    recipients: tuple[EnvelopeRecipient, ...]
    received_at: float
    size: int  # bytes of the stored message
    class_name: str
    account: str
    envid: str | None = None
    ret: str | None = None  # "FULL" or "HDRS"
    smtputf8: bool = False

    def encode(self) -> bytes:
        data = {
            "id": self.id,
            "sender": self.sender,
            "recipients": [[r.address, r.notify, r.orcpt] for r in self.recipients],
            "received_at": self.received_at,
            "size": self.size,
            "class_name": self.class_name,
            "account": self.account,
            "envid": self.envid,
            "ret": self.ret,
            "smtputf8": self.smtputf8,
        }  # every field, by name: decode() passes them back to the constructor
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Envelope:
        try:
            data = json.loads(raw)
            data["recipients"] = tuple(EnvelopeRecipient(*item) for item in data["recipients"])
            return cls(**data)
        except (ValueError, TypeError, KeyError) as exc:
            raise SpoolCorrupt(f"bad envelope: {exc}") from exc


@dataclass(frozen=True, slots=True)
class StateRecord:
    """Progress of some recipients (by index) after one attempt."""

    indices: tuple[int, ...]
    status: RecipientStatus
    attempts: int
    next_attempt: float
    reply: str
    warned: bool = False  # a delay DSN (retry.warn_after) was sent for these

    def encode(self) -> bytes:
        fields: list[object] = [
            list(self.indices),
            int(self.status),
            self.attempts,
            round(self.next_attempt, 3),
            self.reply,
        ]
        if self.warned:
            fields.append(1)
        return json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"

    @classmethod
    def decode_log(cls, raw: bytes) -> list[StateRecord]:
        records = []
        for line in raw.split(b"\n"):
            if not line:
                continue
            try:
                indices, status, attempts, next_attempt, reply, *rest = json.loads(line)
                records.append(
                    cls(
                        tuple(indices),
                        RecipientStatus(status),
                        attempts,
                        next_attempt,
                        reply,
                        bool(rest and rest[0]),
                    )
                )
            except (ValueError, TypeError):
                continue  # torn write at a crash: that outcome is simply repeated
        return records


def encode_header(envelope: Envelope) -> bytes:
    payload = envelope.encode()
    return b"%s%d\n%d\n%s\n" % (MAGIC, VERSION, len(payload), payload)


def decode_header(head: bytes) -> tuple[Envelope, int] | int:
    """Parse the header from the file's first bytes → (envelope, body offset).

    Returns the number of bytes needed instead when `head` is too short.
    """
    first, sep, rest = head.partition(b"\n")
    if not sep:
        return len(head) + 4096
    if not first.startswith(MAGIC):
        raise SpoolCorrupt("not a relay spool file")
    version = first[len(MAGIC) :]
    if not version.isdigit() or int(version) > VERSION:
        raise SpoolCorrupt(f"spool format version {version!r} is newer than this relay")
    length_line, sep, rest = rest.partition(b"\n")
    if not sep:
        return len(head) + 4096
    if not length_line.isdigit():
        raise SpoolCorrupt("bad envelope length")
    length = int(length_line)
    offset = len(first) + 1 + len(length_line) + 1
    if len(head) < offset + length + 1:
        return offset + length + 1
    envelope = Envelope.decode(head[offset : offset + length])
    if head[offset + length : offset + length + 1] != b"\n":
        raise SpoolCorrupt("envelope not terminated")
    return envelope, offset + length + 1
