"""A delivery lane: one provider (or one default-routed domain) and its connections.

Each worker owns at most one connection, and a lane runs at most
`shaper.max_connections()` workers, so the connection limit holds by construction. A
worker carries up to `max_messages_per_connection` transactions on its connection,
keeps it for `idle_connection_timeout` waiting for more work, then QUITs. Ready
batches wait in one queue per class; the highest-priority class whose rate allows
goes first, so transactional mail takes the next free slot before bulk.

A lane pauses as a whole, with no connection attempt while paused, when a rule
suspends the provider or when no MX host can be reached (then with exponential
backoff). It reopens with one connection and widens on success (slow start). Waiting
mail stays queued through a pause: that is not a failed attempt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

from relay.config.model import Config, Rule
from relay.delivery.classify import classify
from relay.delivery.client import Connection
from relay.delivery.context import LaneContext
from relay.delivery.outcomes import Attempt
from relay.errors import (
    DestinationUnreachable,
    DnsPermanentError,
    DnsTemporaryError,
    PermanentDeliveryError,
    SpoolError,
    TransientDeliveryError,
)
from relay.reply import Reply, Verdict
from relay.routing.models import Batch, Where
from relay.routing.retry import backoff, expired
from relay.routing.router import Destination
from relay.shaping.shaper import Shaper

log = logging.getLogger("relay.delivery")


class Lane:
    def __init__(
        self, destination: Destination, context: LaneContext, on_idle: Callable[[Lane], None]
    ) -> None:
        self._ctx = context
        self._on_idle = on_idle
        self.reconfigure(destination)
        self._connections: set[int] = set()
        self._ready: dict[str, deque[Batch]] = {}
        self._order: list[str] = []
        self.pending = 0
        self._workers: set[asyncio.Task[None]] = set()
        self._idle = 0
        self._wakeup = asyncio.Event()
        self._interrupt = asyncio.Event()  # set by pause and shutdown: rate waits end early
        self._paused_until = 0.0
        self.suspended: str | None = None  # the reason, while a rule or an admin suspends
        self._failures = 0
        self._resume: asyncio.TimerHandle | None = None
        self._sweeps: set[asyncio.Task[None]] = set()
        restored = context.suspensions.get(self.key)
        if restored is not None:
            self.suspend(restored.until - time.time(), restored.reason, persist=False)

    @property
    def _config(self) -> Config:
        return self._ctx.config

    def reconfigure(self, destination: Destination) -> None:
        """Take new shaping and rules (config reload); rates and throttles start afresh."""
        self.destination = destination
        self.shaping = destination.shaping
        self.shaper = Shaper(self.shaping, self._ctx.config.classes)
        self._rules = self.shaping.rules + self._ctx.config.rules

    @property
    def key(self) -> str:
        return self.destination.lane_key

    @property
    def paused(self) -> bool:
        return self._paused_until > time.monotonic()

    @property
    def _halted(self) -> bool:
        """No new transaction may start: paused, or shutting down."""
        return self.paused or self._ctx.stopping

    @property
    def busy(self) -> bool:
        """A paused lane stays registered: forgetting it would forget its backoff."""
        return bool(self.pending or self._workers or self._sweeps or self.paused)

    # queueing

    def push(self, batch: Batch) -> None:
        queue = self._ready.get(batch.class_name)
        if queue is None:
            queue = self._ready[batch.class_name] = deque()
            classes = self._config.classes
            self._order = sorted(
                self._ready, key=lambda name: -(classes[name].priority if name in classes else 0)
            )
        queue.append(batch)
        self.pending += 1
        self._ctx.stats.move(batch.message, batch.recipients, Where.LANE)
        self._kick()

    def _unshift(self, batch: Batch) -> None:
        """Put a taken batch back at the head of its queue (it was not attempted)."""
        self._ready[batch.class_name].appendleft(batch)
        self.pending += 1
        self.shaper.refund_message(batch.class_name)
        self._ctx.stats.move(batch.message, batch.recipients, Where.LANE)

    def _take(self) -> tuple[Batch | None, float | None]:
        """The next batch its rates allow, or how long until one is allowed."""
        if not self.pending:
            return None, None
        wait = self.shaper.provider_delay()
        if wait > 0:
            return None, wait
        soonest: float | None = None
        for name in self._order:
            queue = self._ready[name]
            if not queue:
                continue
            class_wait = self.shaper.class_delay(name)
            if class_wait > 0:
                soonest = class_wait if soonest is None else min(soonest, class_wait)
                continue
            while queue:
                batch = queue.popleft()
                self.pending -= 1
                # an admin may have held, deleted or flushed some recipients meanwhile
                batch.recipients = [r for r in batch.recipients if r.where is Where.LANE]
                if batch.recipients:
                    self.shaper.take_message(name)
                    self._ctx.stats.move(batch.message, batch.recipients, Where.FLIGHT)
                    return batch, None
        return None, soonest

    def _admit_recipients(self, batch: Batch) -> Batch | None:
        """Hold back recipients whose mailbox rate is spent: they wait, never dropped."""
        if self.shaping.recipient_rate is None:
            return batch
        allowed, held = [], []
        for recipient in batch.recipients:
            wait = self.shaper.mailbox_delay(recipient.address)
            if wait > 0:
                recipient.next_attempt = time.time() + wait
                held.append(recipient)
            else:
                self.shaper.take_mailbox(recipient.address)
                allowed.append(recipient)
        if held:
            self._ctx.requeue(batch.message, held)
        if not allowed:
            self.shaper.refund_message(batch.class_name)
            return None
        batch.recipients = allowed
        return batch

    # workers

    @property
    def workers(self) -> list[asyncio.Task[None]]:
        return list(self._workers)

    def wake(self) -> None:
        """Idle and rate-waiting workers re-check their conditions (shutdown, pause)."""
        self._wakeup.set()
        self._interrupt.set()

    async def _sleep(self, seconds: float) -> None:
        """Wait for a rate slot; a pause or shutdown cuts the wait short."""
        try:
            await asyncio.wait_for(self._interrupt.wait(), seconds)
        except TimeoutError:
            pass

    def _kick(self) -> None:
        if self.paused or not self.pending or self._ctx.stopping:
            return
        if self._idle:
            self._wakeup.set()
        elif len(self._workers) < self.shaper.max_connections():
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

    async def _worker(self) -> None:
        connection: Connection | None = None
        try:
            while not self._halted:
                if len(self._workers) > self.shaper.max_connections():
                    # throttled or ramping: this worker is surplus; leave the set now so
                    # that only as many workers leave as there are too many
                    current = asyncio.current_task()
                    if current is not None:
                        self._workers.discard(current)
                    break
                batch, wait = self._take()
                if batch is None:
                    if wait is not None:
                        await self._sleep(wait)  # a rate allows the next one then
                        continue
                    if connection is None or not await self._wait_for_work():
                        break
                    continue
                admitted = self._admit_recipients(batch)
                if admitted is not None:
                    connection = await self._deliver(admitted, connection)
        finally:
            if connection is not None:
                await asyncio.shield(self._close(connection))

    async def _close(self, connection: Connection) -> None:
        if id(connection) in self._connections:
            self._connections.discard(id(connection))
            self._ctx.metrics.connections.labels(self.destination.provider).dec()
        await connection.close()

    async def _wait_for_work(self) -> bool:
        deadline = time.monotonic() + self._config.delivery.idle_connection_timeout
        self._idle += 1
        try:
            while not self.pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.paused or self._ctx.stopping:
                    return False
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    return False
            return not self.paused and not self._ctx.stopping
        finally:
            self._idle -= 1

    def _destination_key(self, batch: Batch) -> str:
        if self.shaping.route is not None:
            host, port = self.shaping.route
            return f"[{host}]:{port}"
        return batch.domain

    async def _open(self, batch: Batch) -> Connection | None:
        """A new connection for `batch`, or None when the batch was settled or put back."""
        # Sleep until the computed slot, then re-check: another worker may have taken it,
        # and check-then-take with no await in between is atomic on the event loop.
        while (wait := self.shaper.connection_delay()) > 0 and not self._halted:
            await self._sleep(wait)
        if self._halted:
            self._unshift(batch)
            return None
        self.shaper.take_connection()
        try:
            connection = await self._ctx.connector.open(batch.domain, self.shaping, self._rules)
        except DnsPermanentError as exc:
            await self._settle(batch, exc.reply, Verdict.BOUNCED, None)
            return None
        except (DestinationUnreachable, DnsTemporaryError) as exc:
            await self._settle(batch, exc.reply, Verdict.DEFERRED, None)
            self._destination_failed(exc.reply)
            return None
        except (TransientDeliveryError, PermanentDeliveryError) as exc:
            # The greeting or EHLO reply matched a rule: the provider spoke for itself.
            verdict = classify(exc.reply, self._rules)
            self._count_replies([exc.reply])
            await self._settle(batch, exc.reply, verdict.verdict, None)
            self._apply(verdict.rule, exc.reply)
            return None
        self._failures = 0
        self._connections.add(id(connection))
        self._ctx.metrics.connections.labels(self.destination.provider).inc()
        return connection

    def _count_replies(self, replies: list[Reply]) -> None:
        counter = self._ctx.metrics.replies
        seen: set[int] = set()
        for reply in replies:
            if reply.remote and id(reply) not in seen:
                seen.add(id(reply))
                counter.labels(self.destination.provider, str(reply.code)).inc()

    async def _deliver(self, batch: Batch, connection: Connection | None) -> Connection | None:
        if connection is not None and (
            not connection.usable
            or connection.destination != self._destination_key(batch)
            or connection.transactions >= self.shaping.max_messages_per_connection
        ):
            await self._close(connection)
            connection = None
        if connection is None:
            connection = await self._open(batch)
            if connection is None:
                return None
        try:
            message = await self._ctx.spool.load_message(
                batch.message.id, batch.message.body_offset, batch.message.envelope.size
            )
        except SpoolError as exc:
            log.error("id=%s cannot be read from the spool: %s", batch.message.id, exc)
            await self._settle(
                batch, Reply.local(451, "4.3.0", "spool read error"), Verdict.DEFERRED, None
            )
            return connection
        fallback: Reply | None = None
        try:
            replies = await connection.send(batch.message.envelope, batch.recipients, message)
        except TransientDeliveryError as exc:
            replies, fallback = {}, exc.reply
            connection.smtp.close()
        attempts: list[Attempt] = []
        fired: dict[int, tuple[Rule, Reply]] = {}
        for recipient in batch.recipients:
            reply = (
                replies.get(recipient.index)
                or fallback
                or Reply.local(
                    451, "4.4.2", f"{connection.description} closed the session before RCPT"
                )
            )
            verdict = classify(reply, self._rules)
            attempts.append(Attempt(recipient, reply, verdict.verdict))
            if verdict.rule is not None:
                fired.setdefault(id(verdict.rule), (verdict.rule, reply))
        self._count_replies(list(replies.values()))
        await self._ctx.outcomes.settle(
            batch, attempts, connection.description, self.destination.provider
        )
        for rule, reply in fired.values():
            self._apply(rule, reply)
        if any(a.verdict is Verdict.DELIVERED for a in attempts) and self.shaper.succeeded():
            self._kick()
        if not connection.usable or self.paused:
            await self._close(connection)
            return None
        return connection

    async def _settle(
        self, batch: Batch, reply: Reply, verdict: Verdict, relay: str | None
    ) -> None:
        attempts = [Attempt(r, reply, verdict) for r in batch.recipients]
        await self._ctx.outcomes.settle(batch, attempts, relay, self.destination.provider)

    # pauses: suspensions, throttles, unreachable destinations

    def _apply(self, rule: Rule | None, reply: Reply) -> None:
        if rule is None:
            return
        if rule.action == "suspend" and rule.duration:
            self.suspend(rule.duration, str(reply))
        elif rule.action == "throttle":
            self.shaper.throttle(rule)
            log.warning(
                "provider=%s throttled for %.0fs (rate=%s max_connections=%s): %s",
                self.destination.provider,
                rule.duration or 0,
                rule.rate or "-",
                rule.max_connections or "-",
                reply,
            )

    def suspend(self, duration: float, reason: str, persist: bool = True) -> None:
        """No new transaction for `duration`; in-flight ones finish, waiting mail stays."""
        if duration <= 0:
            return
        if persist:
            self._ctx.suspensions.set(self.key, time.time() + duration, reason)
        self.suspended = reason
        log.warning(
            "provider=%s lane=%s suspended for %.0fs%s: %s",
            self.destination.provider,
            self.key,
            duration,
            "" if persist else " (restored)",
            reason,
        )
        self._pause(duration)

    def resume(self) -> None:
        """End a pause now (its timer, or an admin); reopen slowly."""
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        self._paused_until = 0.0
        self._interrupt.clear()
        if self.suspended is not None:
            self.suspended = None
            self._ctx.suspensions.clear(self.key)
            log.info("provider=%s lane=%s resumed", self.destination.provider, self.key)
        self.shaper.restart_slowly()
        self._sweep_expired(Reply.local(451, "4.4.1", "destination was unavailable"))
        if self.pending:
            self._kick()
        elif not self.busy:
            self._on_idle(self)

    def _pause(self, duration: float) -> None:
        until = time.monotonic() + duration
        if until <= self._paused_until:
            return
        self._paused_until = until
        if self._resume is not None:
            self._resume.cancel()
        self._resume = asyncio.get_running_loop().call_later(duration, self._resume_due)
        self.wake()  # idle and waiting workers notice and close their connections

    def _resume_due(self) -> None:
        self._resume = None
        if self.paused:  # extended meanwhile
            self._resume = asyncio.get_running_loop().call_later(
                self._paused_until - time.monotonic(), self._resume_due
            )
            return
        self.resume()

    def _destination_failed(self, reply: Reply) -> None:
        """Back off the whole lane; expire what waited too long while it was down."""
        self._failures += 1
        delay = backoff(self._config.retry, self._failures)
        log.warning(
            "provider=%s destination=%s unreachable, queue deferred for %.0fs: %s",
            self.destination.provider,
            self.key,
            delay,
            reply,
        )
        self._pause(delay)
        self._sweep_expired(reply)

    def _sweep_expired(self, reply: Reply) -> None:
        """Settle batches past retry.lifetime (at pause edges only: O(n) once per pause)."""
        now = time.time()
        stale = []
        for queue in self._ready.values():
            keep: deque[Batch] = deque()
            for batch in queue:
                if expired(self._config.retry, batch.message.envelope.received_at, now):
                    batch.recipients = [r for r in batch.recipients if r.where is Where.LANE]
                    self._ctx.stats.move(batch.message, batch.recipients, Where.FLIGHT)
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

    def _sweep_done(self, task: asyncio.Task[None]) -> None:
        self._sweeps.discard(task)
        if not self.busy:
            self._on_idle(self)

    async def _expire(self, batches: list[Batch], reply: Reply) -> None:
        for batch in batches:
            if batch.recipients:
                await self._settle(batch, reply, Verdict.DEFERRED, None)

    async def stop(self) -> None:
        """Cancel workers; outcome writes are shielded and finish."""
        if self._resume is not None:
            self._resume.cancel()
        tasks = list(self._workers | self._sweeps)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
