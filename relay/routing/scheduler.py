"""When each recipient is due: now (to its lane) or later (a heap by due time).

Waking is event-driven: the timer sleeps until the earliest due time or until an
earlier one is added. Recipients due together for one message and one domain are
grouped so they travel in one transaction.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections import defaultdict
from collections.abc import Callable

from relay.routing.models import QueuedMessage, Recipient
from relay.routing.router import Destination, Router

log = logging.getLogger("relay.routing")

Enqueue = Callable[[Destination, QueuedMessage, list[Recipient]], None]


class Scheduler:
    def __init__(self, router: Router, enqueue: Enqueue) -> None:
        self._router = router
        self._enqueue = enqueue
        self._heap: list[tuple[float, int, QueuedMessage, Recipient]] = []
        self._seq = itertools.count()
        self._changed = asyncio.Event()
        self._routing: set[asyncio.Task[None]] = set()

    @property
    def deferred(self) -> int:
        return len(self._heap)

    def submit(self, message: QueuedMessage) -> None:
        """Queue every unfinished recipient of a new or recovered message."""
        self.defer(message, [r for r in message.recipients if not r.status.is_final])

    def defer(self, message: QueuedMessage, recipients: list[Recipient]) -> None:
        now = time.time()
        due = []
        for recipient in recipients:
            if recipient.next_attempt <= now:
                due.append(recipient)
            else:
                if not self._heap or recipient.next_attempt < self._heap[0][0]:
                    self._changed.set()
                heapq.heappush(self._heap, (recipient.next_attempt, next(self._seq),
                                            message, recipient))
        if due:
            self._dispatch(message, due)

    def _dispatch(self, message: QueuedMessage, recipients: list[Recipient]) -> None:
        by_domain: dict[str, list[Recipient]] = defaultdict(list)
        for recipient in recipients:
            by_domain[recipient.domain].append(recipient)
        for domain, group in by_domain.items():
            destination = self._router.cached(domain)
            if destination is not None:
                self._enqueue(destination, message, group)
            else:
                task = asyncio.create_task(self._route(domain, message, group))
                self._routing.add(task)
                task.add_done_callback(self._routing.discard)

    async def _route(self, domain: str, message: QueuedMessage, group: list[Recipient]) -> None:
        self._enqueue(await self._router.route(domain), message, group)

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
                _, _, message, recipient = heapq.heappop(self._heap)
                due.setdefault(message.id, (message, []))[1].append(recipient)
            for message, recipients in due.values():
                self._dispatch(message, recipients)
