"""Deferred recipients by due time: a heap, and a timer that sleeps until the earliest.

Heap entries are never removed in place: an entry whose recipient has moved on
(flushed, held, deleted, rescheduled) is recognised as stale and skipped when it comes
due. `pop_due` is pure bookkeeping on the injected clock, so the manager's scheduling is
unit-tested without sleeping; only `wait` touches the event loop.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable

from relay.clock import Clock
from relay.queue.models import QueuedMessage, Recipient, Where

Due = list[tuple[QueuedMessage, list[Recipient]]]


class Schedule:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, QueuedMessage, Recipient]] = []
        self._seq = itertools.count()
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, message: QueuedMessage, recipient: Recipient) -> None:
        """Recipient due at its `next_attempt`; the caller has moved it to SCHEDULED."""
        when = recipient.next_attempt
        if not self._heap or when < self._heap[0][0]:
            self._changed.set()
        heapq.heappush(self._heap, (when, next(self._seq), message, recipient))

    def pop_due(self) -> Due:
        """Every scheduled recipient due by now, grouped by message."""
        now = self._clock.time()
        due: dict[str, tuple[QueuedMessage, list[Recipient]]] = {}
        seen: set[int] = set()
        while self._heap and self._heap[0][0] <= now:
            when, _, message, recipient = heapq.heappop(self._heap)
            if recipient.where is not Where.SCHEDULED or recipient.next_attempt != when:
                continue  # stale: flushed, held, deleted or rescheduled since
            # Scheduled again for the same time (held and released while its site backed
            # off): one entry only, or it would be sent twice in one transaction.
            if id(recipient) in seen:
                continue
            seen.add(id(recipient))
            due.setdefault(message.id, (message, []))[1].append(recipient)
        return list(due.values())

    def select(self, accept: Callable[[QueuedMessage, Recipient], bool]) -> Due:
        """Scheduled recipients that `accept` picks (flush), grouped by message."""
        found: dict[str, tuple[QueuedMessage, list[Recipient]]] = {}
        seen: set[int] = set()
        for when, _, message, recipient in self._heap:
            if (
                recipient.where is Where.SCHEDULED
                and recipient.next_attempt == when
                and id(recipient) not in seen
                and accept(message, recipient)
            ):
                seen.add(id(recipient))
                found.setdefault(message.id, (message, []))[1].append(recipient)
        return list(found.values())

    async def wait(self) -> None:
        """Until the earliest entry is due, or an earlier one was added."""
        self._changed.clear()
        if not self._heap:
            await self._changed.wait()
            return
        delay = self._heap[0][0] - self._clock.time()
        if delay > 0:
            try:
                await asyncio.wait_for(self._changed.wait(), delay)
            except TimeoutError:
                pass
