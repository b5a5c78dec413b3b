"""Wires the parts together and owns their tasks: startup → serve → shutdown.

listener → spool → scheduler/router → dispatcher/lanes → outcomes (→ DSNs → spool),
with the admin listener (metrics, API) beside them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
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
from relay.listener.server import Listeners
from relay.metrics import Metrics, StateCollector
from relay.routing.models import QueuedMessage, Recipient
from relay.routing.registry import Registry
from relay.routing.router import Router
from relay.routing.scheduler import Scheduler
from relay.routing.stats import QueueStats
from relay.shaping.suspensions import Suspensions
from relay.spool.records import Envelope, RecipientStatus
from relay.spool.store import Recovered, Spool
from relay.tls import server_context

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
        self.outcomes = Outcomes(config, self.spool, self._requeue, self._inject,
                                 self.registry, self.stats, self.metrics)
        self.suspensions = Suspensions(config.spool_path)
        self.connector = Connector(config, self.resolver)
        self.dispatcher = Dispatcher(LaneContext(
            config, self.connector, self.outcomes, self.spool, self.suspensions,
            self._requeue, self.stats, self.metrics))
        self.scheduler = Scheduler(self.router, self.dispatcher.enqueue, self.registry,
                                   self.stats)
        self.listeners: Listeners | None = None
        self.admin: web.AppRunner | None = None
        self.metrics.watch(StateCollector(
            self.stats, lambda: list(self.dispatcher.lanes.values()),
            lambda: [p.name for p in self.config.providers], lambda: list(self.config.classes),
            lambda: (self.spool.messages, self.spool.bytes, self.spool.quarantined)))
        for name in [p.name for p in config.providers] + ["default"]:
            self.metrics.connections.labels(name)   # a series from the start, at 0

    def _requeue(self, message: QueuedMessage, recipients: list[Recipient]) -> None:
        self.scheduler.defer(message, recipients)

    async def _inject(self, envelope: Envelope, data: bytes) -> None:
        """Queue mail relay writes itself (DSNs): durable first, like any other."""
        offset = await self.spool.store(envelope, data)
        self.scheduler.submit(QueuedMessage(envelope, offset))

    def _tls(self, config: Config) -> ssl.SSLContext | None:
        if any(listener.tls != "none" for listener in config.listeners):
            return server_context(config.tls, config.spool_path, config.hostname)
        return None

    # startup

    async def recover(self) -> tuple[int, int]:
        messages = recipients = 0
        for recovered in self.spool.recover():
            message = _restore(recovered)
            if message.done:
                await self.spool.remove(message.id)
                continue
            messages += 1
            recipients += sum(1 for r in message.recipients if not r.status.is_final)
            self.scheduler.submit(message)
        return messages, recipients

    async def start(self) -> None:
        """Everything that can fail with a clear message fails here, before serving."""
        self.spool.open()
        tls_context = self._tls(self.config)
        started = time.monotonic()
        for key, suspension in self.suspensions.load().items():
            log.info("lane %s stays suspended for %.0fs: %s", key,
                     suspension.until - time.time(), suspension.reason)
            destination = self.router.destination_for_key(key)
            if destination is not None:   # created now: paused before any mail routes
                self.dispatcher.lane(destination)
        messages, recipients = await self.recover()
        log.info("spool %s: recovered %d messages, %d recipients to deliver (%.1fs)",
                 self.spool.path, messages, recipients, time.monotonic() - started)
        self.listeners = Listeners(self.config, self.spool, tls_context, self.scheduler.submit,
                                   self.metrics, self.resolver)
        await self.listeners.start()
        self.admin = await start_admin(self)
        log.info("admin API and metrics on http://%s:%d/", self.config.admin.address,
                 self.config.admin.port)

    def readiness_problems(self) -> list[str]:
        problems = []
        if self.listeners is None or not all(s.is_serving() for s in self.listeners.servers):
            problems.append("listeners are not serving")
        if self.listeners is not None and self.listeners.gate.draining:
            problems.append("shutting down")
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
            tls_context = self._tls(config)
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
                log.warning("provider %s is gone from the config; its queued mail drains "
                            "under its old limits", lane.destination.provider)
        if self.listeners is not None:
            self.listeners.reconfigure(config, tls_context, self.resolver)
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
            self.listeners.drain()
        self.dispatcher.drain()
        idle = [self.dispatcher.wait_idle()]
        if self.listeners is not None:
            idle.append(self.listeners.wait_idle())
        finished: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*idle))
        hurry: asyncio.Future[Any] = asyncio.ensure_future(urgent.wait())
        await asyncio.wait([finished, hurry], timeout=max(0.0, deadline - time.monotonic()),
                           return_when=asyncio.FIRST_COMPLETED)
        if urgent.is_set():
            log.warning("second signal: stopping now; acknowledged mail is on disk")
        finished.cancel()
        hurry.cancel()
        if self.listeners is not None:
            await self.listeners.close()
        await self.dispatcher.stop()
        if self.admin is not None:
            await self.admin.cleanup()
        log.info("stopped; %d messages remain in the spool", self.spool.messages)

    async def run(self, stop: asyncio.Event, urgent: asyncio.Event | None = None,
                  grace: float = DEFAULT_GRACE) -> None:
        await self.start()
        scheduler = asyncio.create_task(self.scheduler.run(), name="scheduler")
        try:
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
