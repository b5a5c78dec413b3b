"""When each recipient is due: now (to its lane) or later (a heap by due time).

Recipients are routed before they are placed, so every waiting recipient belongs to a
known (provider, class) queue and the queue figures are exact. Waking is event-driven:
the timer sleeps until the earliest due time or until an earlier one is added. Heap
entries are never removed in place: an entry whose recipient has moved on (flushed,
held, deleted, rescheduled) is recognised as stale and skipped when it comes due.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections import defaultdict
from collections.abc import Callable

from relay.routing.models import QueuedMessage, Recipient, Where
from relay.routing.registry import Registry
from relay.routing.router import Destination, Router
from relay.routing.stats import QueueStats

log = logging.getLogger("relay.routing")

Enqueue = Callable[[Destination, QueuedMessage, list[Recipient]], None]


class Scheduler:
    def __init__(
        self, router: Router, enqueue: Enqueue, registry: Registry, stats: QueueStats
    ) -> None:
        self._router = router
        self._enqueue = enqueue
        self.registry = registry
        self.stats = stats
        self._heap: list[tuple[float, int, QueuedMessage, Recipient]] = []
        self._seq = itertools.count()
        self._changed = asyncio.Event()
        self._routing: set[asyncio.Task[None]] = set()

    def reroute(self, router: Router) -> None:
        """Route with a new config from now on; queued recipients keep their queue."""
        self._router = router

    def submit(self, message: QueuedMessage) -> None:
        """Queue every unfinished recipient of a new or recovered message."""
        self.registry.add(message)
        pending = [r for r in message.recipients if not r.status.is_final]
        by_domain: dict[str, list[Recipient]] = defaultdict(list)
        for recipient in pending:
            by_domain[recipient.domain].append(recipient)
        for domain, group in by_domain.items():
            destination = self._router.cached(domain)
            if destination is not None:
                self._route_done(destination, message, group)
            else:
                task = asyncio.create_task(self._route(domain, message, group))
                self._routing.add(task)
                task.add_done_callback(self._routing.discard)

    async def _route(self, domain: str, message: QueuedMessage, group: list[Recipient]) -> None:
        self._route_done(await self._router.route(domain), message, group)

    def _route_done(
        self, destination: Destination, message: QueuedMessage, group: list[Recipient]
    ) -> None:
        for recipient in group:
            recipient.destination = destination
        self.defer(message, group)

    def defer(self, message: QueuedMessage, recipients: list[Recipient]) -> None:
        """Place routed recipients: held, due now (their lane), or later (the heap)."""
        if message.deleted:
            return
        if message.held:
            self.stats.move(message, recipients, Where.HELD)
            return
        now = time.time()
        due, later = [], []
        for recipient in recipients:
            if recipient.next_attempt <= now:
                due.append(recipient)
                continue
            if not self._heap or recipient.next_attempt < self._heap[0][0]:
                self._changed.set()
            heapq.heappush(
                self._heap, (recipient.next_attempt, next(self._seq), message, recipient)
            )
            later.append(recipient)
        self.stats.move(message, later, Where.SCHEDULED)
        if due:
            self._dispatch(message, due)

    def _dispatch(self, message: QueuedMessage, recipients: list[Recipient]) -> None:
        by_lane: dict[str, list[Recipient]] = defaultdict(list)
        for recipient in recipients:
            assert recipient.destination is not None
            by_lane[f"{recipient.destination.lane_key}\0{recipient.domain}"].append(recipient)
        for group in by_lane.values():
            destination = group[0].destination
            assert destination is not None
            self._enqueue(destination, message, group)

    def flush(self, accept: Callable[[QueuedMessage, Recipient], bool]) -> int:
        """Make scheduled recipients due now; returns how many."""
        flushed: dict[str, tuple[QueuedMessage, list[Recipient]]] = {}
        for _, _, message, recipient in self._heap:
            if recipient.where is Where.SCHEDULED and accept(message, recipient):
                flushed.setdefault(message.id, (message, []))[1].append(recipient)
        count = 0
        for message, recipients in flushed.values():
            for recipient in recipients:
                recipient.next_attempt = 0.0
            count += len(recipients)
            self.defer(message, recipients)
        return count

    async def run(self) -> None:
        while True:
            self._changed.clear()
            if not self._heap:
                await self._changed.wait()
                continue
            delay = self._heap[0][0] - time.time()
            if delay > 0:
                try:
                    await asyncio.wait_for(self._changed.wait(), delay)
                except TimeoutError:
                    pass
                continue
            now = time.time()
            due: dict[str, tuple[QueuedMessage, list[Recipient]]] = {}
            while self._heap and self._heap[0][0] <= now:
                when, _, message, recipient = heapq.heappop(self._heap)
                if recipient.where is not Where.SCHEDULED or recipient.next_attempt != when:
                    continue  # stale: flushed, held, deleted or rescheduled since
                due.setdefault(message.id, (message, []))[1].append(recipient)
            for message, recipients in due.values():
                self._dispatch(message, recipients)
