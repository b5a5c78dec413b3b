"""The last deferrals, for the status page: a small ring in memory, newest last.

The after-attempt step appends each recipient it defers. The ring is bounded (a burst of
300,000 deferrals keeps only the last `size`) and lost at restart: the timeline and the
delivery log are the records; this is only what an operator glances at first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from relay.clock import Clock
from relay.queue.models import QueuedMessage, Recipient

RECENT = 50  # SPEC §12: "the last 50 deferrals"


@dataclass(frozen=True, slots=True)
class Deferral:
    time: float  # wall clock
    message_id: str
    recipient: str
    provider: str
    reply: str


class RecentDeferrals:
    def __init__(self, clock: Clock, size: int = RECENT) -> None:
        self._clock = clock
        self._ring: deque[Deferral] = deque(maxlen=size)

    def record(
        self, message: QueuedMessage, recipients: Iterable[Recipient], provider: str
    ) -> None:
        now = self._clock.time()
        for recipient in recipients:
            self._ring.append(
                Deferral(now, message.id, recipient.address, provider, recipient.last_reply)
            )

    def latest(self) -> list[Deferral]:
        """Newest first."""
        return list(reversed(self._ring))
