"""The in-memory queue: messages as their envelope plus per-recipient progress.

Bodies stay on disk; a queued message costs its envelope and a few slots per
recipient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relay.spool.records import Envelope, EnvelopeRecipient, RecipientStatus


class Recipient:
    """Progress of one recipient of one message."""

    __slots__ = ("attempts", "index", "last_reply", "next_attempt", "spec", "status", "warned")

    def __init__(self, index: int, spec: EnvelopeRecipient) -> None:
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
    __slots__ = ("body_offset", "envelope", "in_flight", "recipients")

    def __init__(self, envelope: Envelope, body_offset: int) -> None:
        self.envelope = envelope
        self.body_offset = body_offset
        self.recipients = [Recipient(i, spec) for i, spec in enumerate(envelope.recipients)]
        self.in_flight = 0  # recipients handed to a lane and not yet settled

    @property
    def id(self) -> str:
        return self.envelope.id

    @property
    def done(self) -> bool:
        return all(r.status.is_final for r in self.recipients)


@dataclass(slots=True)
class Batch:
    """Recipients of one message, one domain: what one SMTP transaction carries."""

    message: QueuedMessage
    recipients: list[Recipient]
    domain: str
    lane_key: str
    class_name: str = field(default="")

    def __post_init__(self) -> None:
        if not self.class_name:
            self.class_name = self.message.envelope.class_name
