"""Exact queue figures, kept up to date at every move instead of counted at scrape time.

Every change of a recipient's place (scheduled, lane, in flight, held, gone) goes through
`move`, which keeps two things: recipient counts by (lane, provider, class, place), and,
per (provider, class), which messages have recipients waiting, with a heap ordered by
arrival to answer "how old is the oldest" in amortised O(log n).
"""

from __future__ import annotations

import heapq
import time
from collections import Counter, defaultdict
from collections.abc import Iterable

from relay.routing.models import QueuedMessage, Recipient, Where

_WAITING = (Where.SCHEDULED, Where.LANE)  # held mail waits on purpose: not "aging"

CountKey = tuple[str, str, str, Where]  # lane key, provider, class, place


class QueueStats:
    def __init__(self) -> None:
        self.counts: Counter[CountKey] = Counter()
        self._members: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
        self._oldest: dict[tuple[str, str], list[tuple[float, str]]] = defaultdict(list)

    def move(self, message: QueuedMessage, recipients: Iterable[Recipient], to: Where) -> None:
        class_name = message.envelope.class_name
        for recipient in recipients:
            old = recipient.where
            if old is to:
                continue
            destination = recipient.destination
            if destination is not None:
                lane, provider = destination.lane_key, destination.provider
                if old is not Where.NOWHERE:
                    key = (lane, provider, class_name, old)
                    self.counts[key] -= 1
                    if self.counts[key] <= 0:
                        del self.counts[key]
                if to is not Where.NOWHERE:
                    self.counts[(lane, provider, class_name, to)] += 1
                was, now = old in _WAITING, to in _WAITING
                if was != now:
                    self._membership(message, provider, class_name, 1 if now else -1)
            recipient.where = to

    def _membership(
        self, message: QueuedMessage, provider: str, class_name: str, delta: int
    ) -> None:
        queue = (provider, class_name)
        members = self._members[queue]
        count = members.get(message.id, 0) + delta
        if count > 0:
            if message.id not in members:
                heapq.heappush(self._oldest[queue], (message.envelope.received_at, message.id))
            members[message.id] = count
        else:
            members.pop(message.id, None)

    def oldest_ages(self, now: float | None = None) -> dict[tuple[str, str], float]:
        """Age of the oldest waiting message per (provider, class)."""
        now = time.time() if now is None else now
        ages = {}
        for queue, heap in list(self._oldest.items()):
            members = self._members[queue]
            while heap and heap[0][1] not in members:
                heapq.heappop(heap)
            if heap:
                ages[queue] = max(0.0, now - heap[0][0])
            else:
                del self._oldest[queue]
                self._members.pop(queue, None)
        return ages
