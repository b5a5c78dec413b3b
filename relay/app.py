"""Wires the parts together and owns their tasks: startup → serve → shutdown.

listener → spool → scheduler/router → dispatcher/lanes → outcomes (→ DSNs → spool).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

from relay.config.model import Config
from relay.delivery.client import Connector
from relay.delivery.dispatcher import Dispatcher
from relay.delivery.outcomes import Outcomes
from relay.dns.resolver import Resolver
from relay.listener.server import start_listeners
from relay.routing.models import QueuedMessage, Recipient
from relay.routing.router import Router
from relay.routing.scheduler import Scheduler
from relay.shaping.suspensions import Suspensions
from relay.spool.records import Envelope, RecipientStatus
from relay.spool.store import Recovered, Spool
from relay.tls import server_context

log = logging.getLogger("relay")


class Relay:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.spool = Spool(config.spool_path)
        resolver = Resolver(config.dns)
        self.router = Router(config, resolver)
        self.outcomes = Outcomes(config, self.spool, self._requeue, self._inject)
        self.suspensions = Suspensions(config.spool_path)
        self.dispatcher = Dispatcher(config, Connector(config, resolver), self.outcomes,
                                     self.spool, self.suspensions, self._requeue)
        self.scheduler = Scheduler(self.router, self.dispatcher.enqueue)
        self.servers: list[asyncio.Server] = []

    def _requeue(self, message: QueuedMessage, recipients: list[Recipient]) -> None:
        self.scheduler.defer(message, recipients)

    async def _inject(self, envelope: Envelope, data: bytes) -> None:
        """Queue mail relay writes itself (DSNs): durable first, like any other."""
        offset = await self.spool.store(envelope, data)
        self.scheduler.submit(QueuedMessage(envelope, offset))

    def prepare(self) -> ssl.SSLContext | None:
        """Everything that can fail with a clear message, before any socket is opened."""
        self.spool.open()
        if any(listener.tls != "none" for listener in self.config.listeners):
            return server_context(self.config.tls, self.spool.path, self.config.hostname)
        return None

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

    def _restore_lane(self, key: str) -> None:
        """Create a suspended provider's lane now, so it is paused before any mail routes."""
        provider = next((p for p in self.config.providers if p.name == key), None)
        if provider is not None:
            destination = self.router.destination_for(provider)
        elif key.startswith("default:"):
            destination = self.router.destination_for(None, key.partition(":")[2])
        else:
            return  # a provider no longer in the config
        self.dispatcher.lane(destination)

    async def run(self, stop: asyncio.Event) -> None:
        tls_context = self.prepare()
        started = time.monotonic()
        for key, suspension in self.suspensions.load().items():
            log.info("lane %s stays suspended for %.0fs: %s", key,
                     suspension.until - time.time(), suspension.reason)
            self._restore_lane(key)
        messages, recipients = await self.recover()
        log.info("spool %s: recovered %d messages, %d recipients to deliver (%.1fs)",
                 self.spool.path, messages, recipients, time.monotonic() - started)
        self.servers = await start_listeners(self.config, self.spool, tls_context,
                                             self.scheduler.submit)
        scheduler = asyncio.create_task(self.scheduler.run(), name="scheduler")
        for listener in self.config.listeners:
            log.info("listening on %s:%d (%s, tls=%s, auth=%s)", listener.address,
                     listener.port, listener.name, listener.tls, listener.auth)
        try:
            await stop.wait()
        finally:
            log.info("shutting down: no new sessions; queued mail stays in the spool")
            for server in self.servers:
                server.close()
            scheduler.cancel()
            await self.dispatcher.stop()
            await asyncio.gather(scheduler, return_exceptions=True)
            for server in self.servers:
                await server.wait_closed()


def _restore(recovered: Recovered) -> QueuedMessage:
    message = QueuedMessage(recovered.envelope, recovered.body_offset)
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
