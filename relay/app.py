"""Wires the parts together and owns their tasks: startup → serve → shutdown.

listener → spool → scheduler/router → dispatcher/lanes → outcomes (→ DSNs → spool),
with the admin listener (metrics, API) beside them. The listener runs in a process of
its own (relay.listener.supervisor) and reports each message it has made durable; the
rest runs here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from aiohttp import web

from relay.admin.http import start_admin
from relay.config import load_config
from relay.config.model import Config
from relay.delivery.client import Connector
from relay.delivery.context import LaneContext
from relay.delivery.dispatcher import Dispatcher
from relay.delivery.outcomes import Outcomes
from relay.dns.resolver import Resolver
from relay.errors import ConfigError, RelayError
from relay.listener.supervisor import ListenerProcess
from relay.metrics import Metrics, StateCollector
from relay.routing.models import QueuedMessage, Recipient
from relay.routing.registry import Registry
from relay.routing.router import Router
from relay.routing.scheduler import Scheduler
from relay.routing.stats import QueueStats
from relay.shaping.suspensions import Suspensions
from relay.spool.records import Envelope, RecipientStatus
from relay.spool.store import Recovered, Spool
from relay.tls import listener_context

log = logging.getLogger("relay")

DEFAULT_GRACE = 30.0


class Relay:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.spool = Spool(config.spool_path)
        self.registry = Registry()
        self.stats = QueueStats()
        self.resolver = Resolver(config.dns)
        self.router = Router(config, self.resolver)
        self.outcomes = Outcomes(
            config, self.spool, self._requeue, self._inject, self.registry, self.stats, self.metrics
        )
        self.suspensions = Suspensions(config.spool_path)
        self.connector = Connector(config, self.resolver)
        self.dispatcher = Dispatcher(
            LaneContext(
                config,
                self.connector,
                self.outcomes,
                self.spool,
                self.suspensions,
                self._requeue,
                self.stats,
                self.metrics,
            )
        )
        self.scheduler = Scheduler(self.router, self.dispatcher.enqueue, self.registry, self.stats)
        self.listeners: ListenerProcess | None = None
        self._recoveries: set[asyncio.Task[None]] = set()
        self.recovery_failure: str | None = None
        self.admin: web.AppRunner | None = None
        self.metrics.watch(
            StateCollector(
                self.stats,
                lambda: list(self.dispatcher.lanes.values()),
                lambda: [p.name for p in self.config.providers],
                lambda: list(self.config.classes),
                lambda: (self.spool.messages, self.spool.bytes, self.spool.quarantined),
            )
        )
        for name in [p.name for p in config.providers] + ["default"]:
            self.metrics.connections.labels(name)  # a series from the start, at 0

    def _requeue(self, message: QueuedMessage, recipients: list[Recipient]) -> None:
        self.scheduler.defer(message, recipients)

    async def _inject(self, envelope: Envelope, data: bytes) -> None:
        """Queue mail relay writes itself (DSNs): durable first, like any other."""
        offset = await self.spool.store(envelope, data)
        self._queue_new(QueuedMessage(envelope, offset))

    def _queue_new(self, message: QueuedMessage) -> None:
        """A recovery scan may have found the file first: it is queued once."""
        if self.registry.get(message.id) is None:
            self.scheduler.submit(message)

    # what the listener process reports (ListenerEvents)

    def accepted(self, envelope: Envelope, body_offset: int) -> None:
        self.metrics.received.labels(envelope.account, envelope.class_name).inc()
        if self.registry.get(envelope.id) is None:
            self.spool.note_stored(body_offset + envelope.size)
            self.scheduler.submit(QueuedMessage(envelope, body_offset))

    def rejected(self, reason: str) -> None:
        self.metrics.rejected.labels(reason).inc()

    # startup

    async def recover(self, stale_before: float) -> tuple[int, int]:
        """Queue what the spool holds and nobody has queued yet.

        Runs while the listener process takes new mail (reported ones are in the
        registry already) and while due mail is delivered: it yields to the event loop
        every few hundred messages.
        """
        messages = recipients = 0
        for count, recovered in enumerate(self.spool.recover(stale_before), 1):
            # Between reading the file and this check nothing else may run: a message
            # delivered and removed meanwhile would be queued a second time.
            if self.registry.get(recovered.envelope.id) is not None:
                continue
            message = _restore(recovered)
            self.spool.note_stored(recovered.size)
            if message.done:
                await self.spool.remove(message.id)
                continue
            messages += 1
            recipients += sum(1 for r in message.recipients if not r.status.is_final)
            self.scheduler.submit(message)
            if count % 256 == 0:
                await asyncio.sleep(0)
        return messages, recipients

    def _recover_in_background(self, stale_before: float, what: str) -> None:
        async def run() -> None:
            started = time.monotonic()
            try:
                messages, recipients = await self.recover(stale_before)
            except (RelayError, OSError) as exc:
                # Part of the spool is not queued: loud in the log and in /readyz.
                self.recovery_failure = f"spool recovery failed: {exc}"
                log.error("%s; queued mail may wait until the next start", self.recovery_failure)
                return
            log.info(
                "spool %s: %s %d messages, %d recipients to deliver (%.1fs)",
                self.spool.path,
                what,
                messages,
                recipients,
                time.monotonic() - started,
            )

        task = asyncio.create_task(run(), name="recovery")
        self._recoveries.add(task)
        task.add_done_callback(self._recoveries.discard)

    def _listener_lost(self, when: float) -> None:
        """A listener process died: adopt what it stored but could not report."""
        self._recover_in_background(when, "adopted from the lost listener process")

    async def start(self) -> None:
        """Everything that can fail with a clear message fails here, before serving.

        The listener process starts before the spool is read: with a million queued
        recipients it takes mail at once, while recovery queues the old mail.
        """
        started = time.time()
        self.spool.open()
        listener_context(self.config)  # a bad certificate stops the start here
        for key, suspension in self.suspensions.load().items():
            log.info(
                "lane %s stays suspended for %.0fs: %s",
                key,
                suspension.until - time.time(),
                suspension.reason,
            )
            destination = self.router.destination_for_key(key)
            if destination is not None:  # created now: paused before any mail routes
                self.dispatcher.lane(destination)
        self.admin = await start_admin(self)  # up first: /readyz says what is missing
        log.info(
            "admin API and metrics on http://%s:%d/",
            self.config.admin.address,
            self.config.admin.port,
        )
        self.listeners = ListenerProcess(self.config, self, self._listener_lost)
        self._recover_in_background(started, "recovered")
        await self.listeners.start()

    def readiness_problems(self) -> list[str]:
        problems = []
        if self.listeners is not None and self.listeners.draining:
            problems.append("shutting down")
        elif self.listeners is None or not self.listeners.serving:
            problems.append("listeners are not serving")
        if self.recovery_failure is not None:
            problems.append(self.recovery_failure)
        probe = os.path.join(self.spool.path, f".tmp-ready-{os.getpid()}")
        try:
            with open(probe, "wb") as handle:
                handle.write(b"ok")
            os.unlink(probe)
        except OSError as exc:
            problems.append(f"spool not writable: {exc.strerror}")
        return problems

    # reload

    async def reload(self) -> list[str]:
        """Re-read the YAML. Invalid: keep running as before and say why."""
        path = self.config.source
        try:
            config = await asyncio.to_thread(load_config, path)
            listener_context(config)
        except ConfigError as exc:
            return self._reload_failed(exc.problems)
        except RelayError as exc:
            return self._reload_failed([str(exc)])
        if config.spool_path != self.config.spool_path:
            log.warning("spool.path changed: it takes effect at the next restart")
        self.config = config
        if config.dns != self.resolver.config:
            self.resolver = Resolver(config.dns)
        self.router = Router(config, self.resolver)
        self.scheduler.reroute(self.router)
        self.connector.reconfigure(config, self.resolver)
        self.outcomes.config = config
        self.dispatcher.context.config = config
        for lane in list(self.dispatcher.lanes.values()):
            destination = self.router.destination_for_key(lane.key)
            if destination is not None:
                lane.reconfigure(destination)
            else:
                log.warning(
                    "provider %s is gone from the config; its queued mail drains "
                    "under its old limits",
                    lane.destination.provider,
                )
        if self.listeners is not None:
            self.listeners.reconfigure(config)
        self.metrics.reload_success.set(1)
        log.info("configuration reloaded from %s", path)
        return []

    def _reload_failed(self, problems: list[str]) -> list[str]:
        self.metrics.reload_success.set(0)
        log.error("reload failed, the running configuration stays: %s", "; ".join(problems))
        return problems

    # shutdown

    async def stop(self, grace: float, urgent: asyncio.Event) -> None:
        """Stop accepting; let sessions and transactions in flight finish within `grace`
        (or until `urgent`); what is left stays in the spool for the next start."""
        log.info("shutting down: new sessions refused, in-flight work gets %.0fs", grace)
        deadline = time.monotonic() + grace
        if self.listeners is not None:
            self.listeners.drain(grace)
        self.dispatcher.drain()
        idle = [self.dispatcher.wait_idle()]
        if self.listeners is not None:
            idle.append(self.listeners.wait_idle())
        finished: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*idle))
        hurry: asyncio.Future[Any] = asyncio.ensure_future(urgent.wait())
        await asyncio.wait(
            [finished, hurry],
            timeout=max(0.0, deadline - time.monotonic()),
            return_when=asyncio.FIRST_COMPLETED,
        )
        if urgent.is_set():
            log.warning("second signal: stopping now; acknowledged mail is on disk")
        finished.cancel()
        hurry.cancel()
        if self.listeners is not None:
            await self.listeners.close()
        for task in self._recoveries:
            task.cancel()
        await self.dispatcher.stop()
        if self.admin is not None:
            await self.admin.cleanup()
        log.info("stopped; %d messages remain in the spool", self.spool.messages)

    async def run(
        self, stop: asyncio.Event, urgent: asyncio.Event | None = None, grace: float = DEFAULT_GRACE
    ) -> None:
        scheduler = asyncio.create_task(self.scheduler.run(), name="scheduler")
        try:
            await self.start()
            await stop.wait()
            await self.stop(grace, urgent or asyncio.Event())
        finally:
            scheduler.cancel()
            await asyncio.gather(scheduler, return_exceptions=True)


def _restore(recovered: Recovered) -> QueuedMessage:
    message = QueuedMessage(recovered.envelope, recovered.body_offset)
    message.held = recovered.held
    for record in recovered.records:
        for index in record.indices:
            if 0 <= index < len(message.recipients):
                recipient = message.recipients[index]
                recipient.status = record.status
                recipient.attempts = record.attempts
                recipient.next_attempt = record.next_attempt
                recipient.last_reply = record.reply
                recipient.warned = recipient.warned or record.warned
    for recipient in message.recipients:
        if recipient.status is RecipientStatus.DEFERRED and recipient.next_attempt <= 0:
            recipient.status = RecipientStatus.PENDING
    return message
