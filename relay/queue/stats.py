"""Exact queue figures, kept up to date at every move instead of counted at scrape time.

Every change of a recipient's place goes through `move`, which keeps two things:
recipient counts by (queue, provider, class, place), and, per (provider, class), which
messages have recipients waiting, with a heap ordered by arrival to answer "how old is
the oldest" in amortised O(log n).

It also keeps `backlog`: recipients queued anywhere but NOWHERE by (provider or site,
class), what admission control compares with `classes.<name>.max_queued` (SPEC §12).

A recipient's destination may change only while it is NOWHERE (the manager moves it
there before re-routing), so its old count is always found under the key it was added
with. A recipient being routed for the first time has no queue yet: it is counted under
`default`, and in no backlog; one routed again keeps its previous destination meanwhile.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable

from relay.queue.models import QueuedMessage, Recipient, Where
from relay.routing.router import DEFAULT_PROVIDER

_WAITING = (Where.ROUTING, Where.SCHEDULED, Where.READY)  # held mail waits on purpose

CountKey = tuple[str, str, str, Where]  # queue key, provider, class, place


class QueueStats:
    def __init__(self) -> None:
        self.counts: Counter[CountKey] = Counter()
        self.backlog: Counter[tuple[str, str]] = Counter()  # (Destination.backlog_key, class)
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
                queue, provider = destination.queue.key, destination.queue.provider
                if (old is Where.NOWHERE) != (to is Where.NOWHERE):
                    backlog = (destination.backlog_key, class_name)
                    self.backlog[backlog] += 1 if old is Where.NOWHERE else -1
                    if self.backlog[backlog] <= 0:
                        del self.backlog[backlog]
            else:
                queue, provider = "", DEFAULT_PROVIDER
            if old is not Where.NOWHERE:
                key = (queue, provider, class_name, old)
                self.counts[key] -= 1
                if self.counts[key] <= 0:
                    del self.counts[key]
            if to is not Where.NOWHERE:
                self.counts[(queue, provider, class_name, to)] += 1
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
                heap = self._oldest[queue]
                heapq.heappush(heap, (message.envelope.received_at, message.id))
                if len(heap) > 2 * len(members) + 1024:
                    # Entries leave lazily, from the top only: one message waiting for
                    # days would pin every later one behind it. Rebuild from members.
                    heap[:] = [
                        entry for entry in heap if entry[1] in members or entry[1] == message.id
                    ]
                    heapq.heapify(heap)
            members[message.id] = count
        else:
            members.pop(message.id, None)

    def oldest_ages(self, now: float) -> dict[tuple[str, str], float]:
        """Age of the oldest waiting message per (provider, class)."""
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

    def total(self) -> int:
        return sum(self.counts.values())
