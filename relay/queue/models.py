"""The in-memory queue: messages as their envelope plus per-recipient progress.

Bodies stay on disk; a queued message costs its envelope and a few slots per
recipient.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from relay.reply import Reply, Verdict
from relay.routing.router import Destination
from relay.spool.records import Envelope, EnvelopeRecipient, RecipientStatus


class Where(enum.IntEnum):
    """Where a recipient waits; QueueStats counts by it, and every queued recipient is in
    exactly one place but NOWHERE (SPEC §8: the states add up)."""

    NOWHERE = 0  # not queued: final or deleted
    ROUTING = 1  # due now, its MX lookup in progress
    SCHEDULED = 2  # due later (deferred), in the schedule
    READY = 3  # in its queue's ready list
    ACTIVE = 4  # in a delivery attempt now
    HELD = 5  # its message is on hold


class Recipient:
    """Progress of one recipient of one message."""

    __slots__ = (
        "attempts",
        "destination",
        "index",
        "last_reply",
        "next_attempt",
        "spec",
        "status",
        "warned",
        "where",
    )

    def __init__(self, index: int, spec: EnvelopeRecipient) -> None:
        self.where = Where.NOWHERE
        self.destination: Destination | None = None
        self.index = index
        self.spec = spec
        self.status = RecipientStatus.PENDING
        self.attempts = 0
        self.next_attempt = 0.0
        self.last_reply = ""
        self.warned = False

    @property
    def address(self) -> str:
        return self.spec.address

    @property
    def domain(self) -> str:
        return self.spec.address.rpartition("@")[2].lower()


class QueuedMessage:
    __slots__ = ("body_offset", "deleted", "envelope", "held", "hold_reason", "recipients")

    def __init__(self, envelope: Envelope, body_offset: int) -> None:
        self.envelope = envelope
        self.body_offset = body_offset
        self.recipients = [Recipient(i, spec) for i, spec in enumerate(envelope.recipients)]
        self.held = False  # on hold: nothing is attempted
        self.hold_reason = ""  # while held: "admin" (relay queue hold) or "guard" (relay/guard)
        self.deleted = False  # an admin deleted it: outcomes in flight are ignored

    @property
    def id(self) -> str:
        return self.envelope.id

    @property
    def done(self) -> bool:
        return all(r.status.is_final for r in self.recipients)


@dataclass(slots=True)
class Batch:
    """Recipients of one message and one domain: what one SMTP transaction carries."""

    message: QueuedMessage
    recipients: list[Recipient]
    destination: Destination
    domain: str
    class_name: str = field(default="")
    taken_at: float = 0.0  # when a lane took it (wall clock): the attempt's duration

    def __post_init__(self) -> None:
        if not self.class_name:
            self.class_name = self.message.envelope.class_name


@dataclass(frozen=True, slots=True)
class Hop:
    """The session an attempt went over (or was refused), as the log line and a
    `relayed` DSN need it."""

    policy: str  # TLS policy that applied: none, opportunistic, required, verify, mta-sts, dane
    tls: str | None  # the TLS version ("TLSv1.3"); None: plaintext, or no session
    dsn: bool = True  # the next hop offered the DSN extension (RFC 3461)


@dataclass(frozen=True, slots=True)
class Attempt:
    recipient: Recipient
    reply: Reply
    verdict: Verdict
    hop: Hop | None = None  # None: no session was involved (DNS, site unreachable, admin)


class AccountWatch(Protocol):
    """The account guard as the queue sees it (relay/guard): the mail of an account it
    holds is held from its arrival, and each recipient's final remote outcome is told."""

    def holds(self, account: str) -> str | None:
        """Why `account`'s mail is held now; None: it is not."""
        ...

    def finished(self, account: str, received_at: float, bounced: bool) -> None: ...


class NoWatch:
    """No account guard (unit tests of the queue alone)."""

    def holds(self, account: str) -> str | None:
        return None

    def finished(self, account: str, received_at: float, bounced: bool) -> None:
        pass


NO_WATCH = NoWatch()
