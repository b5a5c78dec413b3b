"""A delivery lane: one provider (or one default-routed domain) and its connections.

Each worker owns at most one connection, and a lane runs at most `max_connections`
workers, so the limit holds by construction. A worker carries up to
`max_messages_per_connection` transactions on its connection, keeps it for
`idle_connection_timeout` waiting for more work, then QUITs. Ready batches wait in one
queue per class; the highest-priority class is served first.

When no MX host of the destination can be reached, the lane pauses as a whole
(queue-level backoff) rather than failing message after message against a dead host.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

from relay.config.model import Config
from relay.delivery.classify import classify
from relay.delivery.client import Connection, Connector
from relay.delivery.outcomes import Attempt, Outcomes
from relay.errors import (
    DestinationUnreachable,
    DnsPermanentError,
    DnsTemporaryError,
    SpoolError,
    TransientDeliveryError,
)
from relay.reply import Reply, Verdict
from relay.routing.models import Batch
from relay.routing.retry import backoff, expired
from relay.routing.router import Destination
from relay.spool.store import Spool

log = logging.getLogger("relay.delivery")


class Lane:
    def __init__(self, destination: Destination, config: Config, connector: Connector,
                 outcomes: Outcomes, spool: Spool, on_idle: Callable[[Lane], None]) -> None:
        self.destination = destination
        self.shaping = destination.shaping
        self._config = config
        self._connector = connector
        self._outcomes = outcomes
        self._spool = spool
        self._on_idle = on_idle
        self._rules = self.shaping.rules + config.rules
        self._ready: dict[str, deque[Batch]] = {}
        self._order: list[str] = []
        self.pending = 0
        self._workers: set[asyncio.Task[None]] = set()
        self._idle = 0
        self._wakeup = asyncio.Event()
        self._paused_until = 0.0
        self._failures = 0
        self._resume: asyncio.TimerHandle | None = None
        self._sweeps: set[asyncio.Task[None]] = set()

    @property
    def key(self) -> str:
        return self.destination.lane_key

    @property
    def busy(self) -> bool:
        """A paused lane stays registered: forgetting it would forget its backoff."""
        return bool(self.pending or self._workers or self._sweeps
                    or self._paused_until > time.monotonic())

    def push(self, batch: Batch) -> None:
        queue = self._ready.get(batch.class_name)
        if queue is None:
            queue = self._ready[batch.class_name] = deque()
            classes = self._config.classes
            self._order = sorted(self._ready, key=lambda name: -(
                classes[name].priority if name in classes else 0))
        queue.append(batch)
        self.pending += 1
        self._kick()

    def _kick(self) -> None:
        if self._paused_until > time.monotonic() or not self.pending:
            return
        if self._idle:
            self._wakeup.set()
        elif len(self._workers) < self.shaping.max_connections:
            task = asyncio.create_task(self._worker(), name=f"lane {self.key}")
            self._workers.add(task)
            task.add_done_callback(self._worker_done)

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        self._workers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("lane %s: worker failed", self.key, exc_info=task.exception())
        if self.pending:
            self._kick()
        elif not self.busy:
            self._on_idle(self)

    def _take(self) -> Batch | None:
        for name in self._order:
            queue = self._ready[name]
            if queue:
                self.pending -= 1
                return queue.popleft()
        return None

    async def _worker(self) -> None:
        connection: Connection | None = None
        try:
            while self._paused_until <= time.monotonic():
                batch = self._take()
                if batch is None:
                    if connection is None or not await self._wait_for_work():
                        break
                    continue
                connection = await self._deliver(batch, connection)
        finally:
            if connection is not None:
                await asyncio.shield(connection.close())

    async def _wait_for_work(self) -> bool:
        deadline = time.monotonic() + self._config.delivery.idle_connection_timeout
        self._idle += 1
        try:
            while not self.pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    return False
            return True
        finally:
            self._idle -= 1

    def _destination_key(self, batch: Batch) -> str:
        if self.shaping.route is not None:
            host, port = self.shaping.route
            return f"[{host}]:{port}"
        return batch.domain

    async def _deliver(self, batch: Batch, connection: Connection | None) -> Connection | None:
        if connection is not None and (
                not connection.usable or connection.destination != self._destination_key(batch)
                or connection.transactions >= self.shaping.max_messages_per_connection):
            await connection.close()
            connection = None
        if connection is None:
            try:
                connection = await self._connector.open(batch.domain, self.shaping)
            except DnsPermanentError as exc:
                await self._settle(batch, exc.reply, Verdict.BOUNCED, None)
                return None
            except (DestinationUnreachable, DnsTemporaryError) as exc:
                await self._settle(batch, exc.reply, Verdict.DEFERRED, None)
                self._destination_failed(exc.reply)
                return None
            self._failures = 0
        try:
            message = await self._spool.load_message(batch.message.id,
                                                     batch.message.body_offset)
        except SpoolError as exc:
            log.error("id=%s cannot be read from the spool: %s", batch.message.id, exc)
            await self._settle(batch, Reply.local(451, "4.3.0", "spool read error"),
                               Verdict.DEFERRED, None)
            return connection
        fallback: Reply | None = None
        try:
            replies = await connection.send(batch.message.envelope, batch.recipients, message)
        except TransientDeliveryError as exc:
            replies, fallback = {}, exc.reply
            connection.smtp.close()
        attempts = []
        for recipient in batch.recipients:
            reply = replies.get(recipient.index) or fallback or Reply.local(
                451, "4.4.2", f"{connection.description} closed the session before RCPT")
            attempts.append(Attempt(recipient, reply, classify(reply, self._rules).verdict))
        await self._outcomes.settle(batch, attempts, connection.description,
                                    self.destination.provider)
        if not connection.usable:
            await connection.close()
            return None
        return connection

    async def _settle(self, batch: Batch, reply: Reply, verdict: Verdict,
                      relay: str | None) -> None:
        attempts = [Attempt(r, reply, verdict) for r in batch.recipients]
        await self._outcomes.settle(batch, attempts, relay, self.destination.provider)

    def _destination_failed(self, reply: Reply) -> None:
        """Back off the whole lane; expire what waited too long while it was down."""
        self._failures += 1
        delay = backoff(self._config.retry, self._failures)
        self._paused_until = time.monotonic() + delay
        log.warning("provider=%s destination=%s unreachable, queue deferred for %.0fs: %s",
                    self.destination.provider, self.key, delay, reply)
        if self._resume is not None:
            self._resume.cancel()
        self._resume = asyncio.get_running_loop().call_later(delay, self._resumed)
        now = time.time()
        stale = []
        for queue in self._ready.values():
            keep: deque[Batch] = deque()
            for batch in queue:
                if expired(self._config.retry, batch.message.envelope.received_at, now):
                    stale.append(batch)
                else:
                    keep.append(batch)
            queue.clear()
            queue.extend(keep)
        self.pending -= len(stale)
        if stale:
            task = asyncio.create_task(self._expire(stale, reply))
            self._sweeps.add(task)
            task.add_done_callback(self._sweep_done)

    def _resumed(self) -> None:
        self._resume = None
        if self.pending:
            self._kick()
        elif not self.busy:
            self._on_idle(self)

    def _sweep_done(self, task: asyncio.Task[None]) -> None:
        self._sweeps.discard(task)
        if not self.busy:
            self._on_idle(self)

    async def _expire(self, batches: list[Batch], reply: Reply) -> None:
        for batch in batches:
            await self._settle(batch, reply, Verdict.DEFERRED, None)

    async def stop(self) -> None:
        """Cancel workers; outcome writes are shielded and finish."""
        if self._resume is not None:
            self._resume.cancel()
        tasks = list(self._workers | self._sweeps)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
