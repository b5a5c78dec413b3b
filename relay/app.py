"""Wires the parts together and owns their tasks: startup → serve → shutdown.

listener → spool → queue manager (router, schedule, ready queues per queue and site,
after-attempt step → DSNs → spool) ⇄ dispatcher/lanes (connections, transactions),
with the admin listener (metrics, API) beside them. The listener runs in a process of
its own (relay.listener.supervisor) and reports each message it has made durable; the
rest runs here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any

from aiohttp import web

from relay.admin.http import start_admin
from relay.admin.service import QueueService
from relay.admin.status import StatusPage
from relay.clock import SYSTEM_CLOCK, Clock
from relay.cluster.node import ClusterNode
from relay.cluster.takeover import Takeover
from relay.config import load_config
from relay.config.checks import example_password_exposed
from relay.config.model import Config
from relay.delivery.connector import Connector
from relay.delivery.context import LaneContext
from relay.delivery.dispatcher import Dispatcher
from relay.delivery.handoff import Handoff
from relay.dkim import load_keys
from relay.dns.resolver import Resolver
from relay.errors import ConfigError, RelayError
from relay.guard import AccountGuard
from relay.history import History, events
from relay.history.events import Arrival
from relay.listener.supervisor import ListenerProcess
from relay.metrics import Metrics, StateCollector
from relay.notify import Notifier
from relay.queue.admission import Admission
from relay.queue.adoption import adopt
from relay.queue.manager import QueueManager
from relay.queue.models import QueuedMessage
from relay.routing.router import Router
from relay.shaping.suspensions import Suspensions
from relay.spool.records import Envelope
from relay.spool.store import Spool
from relay.tasks import spawn
from relay.tls import listener_context

log = logging.getLogger("relay")

DEFAULT_GRACE = 30.0


class Relay:
    def __init__(
        self, config: Config, clock: Clock = SYSTEM_CLOCK, notifier: Notifier | None = None
    ) -> None:
        self.config = config
        self._clock = clock
        self.notifier = notifier or Notifier(None)  # systemd's, from the CLI; None: silent
        self.metrics = Metrics()
        self.spool = Spool(config.spool_path)
        self.resolver = Resolver(config.dns)
        self.router = Router(config, self.resolver, clock)
        self.history = History(config.spool_path, self.spool.events_path, clock)
        self.guard = AccountGuard(config, config.spool_path, self.metrics.guard_tripped, clock)
        self.queue = QueueManager(
            config,
            self.spool,
            self.router,
            self.metrics,
            clock,
            recorder=self.history.writer,
            accounts=self.guard,
        )
        self.admission = Admission(config, self.router, self.queue.stats, self.metrics)
        self.suspensions = Suspensions(config.spool_path)
        self.connector = Connector(config, self.resolver)
        context = LaneContext(
            config,
            self.connector,
            self.queue,
            self._load,
            self.suspensions,
            self.metrics,
            clock,
        )
        self.cluster: ClusterNode | None = None
        if config.cluster is not None:
            port = config.listeners[0].port if config.listeners else 0
            self.cluster = ClusterNode(
                config.cluster, f"{config.hostname}:{port}", self.metrics, clock
            )
            context.slots = self.cluster.leases
            context.buckets = self.cluster.buckets
            context.mailboxes = self.cluster.mailboxes
            context.announcer = self.cluster.lanes
            context.clustered = True
            self.guard.announcer = self.cluster.guards
        self.takeover: Takeover | None = None
        self.fenced = False  # another node adopted this spool while this one ran
        if self.cluster is not None and config.cluster and config.cluster.shared_spool:
            self.takeover = Takeover(
                config.cluster,
                self.cluster.nodes,
                self.cluster.locks,
                lambda directory, proceed: adopt(directory, self.spool, self.queue, proceed),
                self._fenced,
            )
            context.may_deliver = self.takeover.may_deliver
        self.dispatcher = Dispatcher(context)
        self.handoff = Handoff(self.queue, self.connector, self._load)  # relay queue transfer
        self.listeners: ListenerProcess | None = None
        self._engines: list[asyncio.Task[Any]] = []  # the schedule and the dispatcher
        self._tasks: set[asyncio.Task[Any]] = set()
        self.recovery_failure: str | None = None
        self.admin: web.AppRunner | None = None
        self.metrics.watch(
            StateCollector(
                self.queue.stats,
                lambda: list(self.dispatcher.lanes.values()),
                lambda: [p.name for p in self.config.providers],
                lambda: list(self.config.classes),
                lambda: (self.spool.messages, self.spool.bytes, self.spool.quarantined),
                lambda: len(self.router),
                lambda: list(self.config.egress),
                lambda: self.router.provider_queues(),
            )
        )
        for name in [p.name for p in config.providers] + ["default"]:
            for egress in config.egress:
                self.metrics.connections.labels(name, egress)  # a series from the start, at 0
        for domain in {key.domain for key in config.dkim.keys}:
            for result in ("signed", "failed"):
                self.metrics.dkim_signatures.labels(domain, result)

    async def _load(self, message: QueuedMessage) -> bytes:
        return await self.spool.load_message(message.id, message.body_offset, message.envelope.size)

    # what the listener process reports (ListenerEvents)

    def accepted(self, envelope: Envelope, body_offset: int, arrival: Arrival) -> None:
        self.metrics.received.labels(envelope.account, envelope.class_name).inc()
        self.history.writer.record(envelope.id, events.received(envelope, arrival))
        if self.queue.registry.get(envelope.id) is None:
            self.spool.note_stored(body_offset + envelope.size)
            self.guard.received(envelope.account, len(envelope.recipients))  # may trip it
            self.queue.submit(QueuedMessage(envelope, body_offset))

    def rejected(self, reason: str) -> None:
        self.metrics.rejected.labels(reason).inc()

    def auth_failed(self) -> None:
        self.metrics.auth_failures.inc()

    def dkim_signed(self, domain: str, result: str) -> None:
        self.metrics.dkim_signatures.labels(domain, result).inc()

    # startup

    def _recover_in_background(self, stale_before: float, what: str) -> None:
        async def run() -> None:
            started = time.monotonic()
            try:
                messages, recipients = await self.queue.recover(self.spool.recover(stale_before))
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

        spawn(run(), self._tasks, "recovery")

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
        self.history.open()
        spawn(
            self.history.prune_forever(lambda: self.config.history.retain),
            self._tasks,
            "history prune",
        )
        listener_context(self.config)  # a bad certificate stops the start here
        # What this node saved is read before it hears the cluster's events (a release
        # heard first must not be undone by the trip read after it).
        for key, suspension in self.suspensions.load().items():
            log.info(
                "lane %s stays suspended for %.0fs: %s",
                key,
                suspension.until - time.time(),
                suspension.reason,
            )
            queue = self.router.queue(key)
            if queue is not None:  # created now: paused before any mail routes
                self.dispatcher.lane(self.queue.ready_queue(queue))
        for account, trip in self.guard.load():  # before recovery: its mail is held as queued
            log.warning("account %s stays tripped by the account guard: %s", account, trip.reason)
        if self.cluster is not None:
            await self.cluster.start(self.dispatcher, self.guard.apply_shared)
        if self.takeover is not None:
            await self.takeover.claim()  # before this spool's mail is queued or taken
        service = QueueService(
            self.queue,
            self.dispatcher,
            lambda: self.router,
            self.spool,
            self.history,
            self.handoff,
        )
        # up first: /readyz says what is missing
        self.admin = await start_admin(
            admin=lambda: self.config.admin,
            service=service,
            readiness=self.readiness_problems,
            reload=self.reload,
            registry=self.metrics.registry,
            cluster=self.cluster.status if self.cluster is not None else None,
            spool_path=self.config.spool_path,
            account_guard=self.guard,
            status=StatusPage(
                config=lambda: self.config,
                lanes=lambda: list(self.dispatcher.lanes.values()),
                registry=self.metrics.registry,
                deferrals=self.queue.deferrals,
                show=service.show,
                clock=self._clock,
            ),
        )
        log.info(
            "admin API and metrics on http://%s:%d/",
            self.config.admin.address,
            self.config.admin.port,
        )
        self.listeners = ListenerProcess(self.config, self, self._listener_lost, self.admission)
        spawn(self.guard.enforce(self.queue, self.listeners), self._tasks, "account guard")
        if self.cluster is not None:
            spawn(self.cluster.nodes.tell(self.listeners), self._tasks, "live nodes")
        self._recover_in_background(started, "recovered")
        if self.takeover is not None:
            spawn(self.takeover.watch_forever(), self._tasks, "takeover")
        await self.listeners.start()

    def _fenced(self, why: str) -> None:
        """Another node adopted this spool while this one ran (it was thought dead): no
        new transaction from here, drain and exit; at the next start `claim` waits."""
        log.critical("cluster: %s; stopping delivery and shutting down", why)
        self.fenced = True
        self.dispatcher.drain()
        os.kill(os.getpid(), signal.SIGTERM)

    def readiness_problems(self) -> list[str]:
        problems = []
        for task in self._engines:
            if task.done():  # logged when it ended (spawn): no mail moves without it
                problems.append(f"the queue's {task.get_name()} stopped; see the log")
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
        self.notifier.reloading()
        problems: list[str] = ["reload did not finish"]
        try:
            problems = await self._reload()
            return problems
        finally:
            self.notifier.ready("serving" if not problems else "serving; the last reload failed")

    async def _reload(self) -> list[str]:
        path = self.config.source
        try:
            config = await asyncio.to_thread(load_config, path)
            listener_context(config)
        except ConfigError as exc:
            return self._reload_failed(exc.problems)
        except RelayError as exc:
            return self._reload_failed([str(exc)])
        exposed = example_password_exposed(config)
        if exposed is not None:
            return self._reload_failed([exposed])
        # A broken DKIM key refuses the reload here, where the old keys can stay, rather
        # than in the listener process, where every message for that domain would get 451.
        keys = await asyncio.to_thread(load_keys, config.dkim)
        if keys.problems:
            return self._reload_failed(list(keys.problems))
        if config.spool_path != self.config.spool_path:
            log.warning("spool.path changed: it takes effect at the next restart")
        if config.cluster != self.config.cluster:
            log.warning("cluster changed: it takes effect at the next restart")
        self.config = config
        if config.dns != self.resolver.config:
            self.resolver = Resolver(config.dns)
        self.router = Router(config, self.resolver, self._clock)
        self.queue.reconfigure(config, self.router)
        self.admission.reconfigure(config, self.router)
        self.connector.reconfigure(config, self.resolver)
        self.dispatcher.context.config = config
        for lane in list(self.dispatcher.lanes.values()):
            queue = self.router.queue(lane.key)
            if queue is not None:
                lane.reconfigure(queue)
            else:
                log.warning(
                    "provider %s is gone from the config; its queued mail drains "
                    "under its old limits",
                    lane.queue.provider,
                )
        self.guard.reconfigure(config)
        if self.listeners is not None:
            self.listeners.reconfigure(config)
            self.listeners.refuse(self.guard.refused())  # an account's action may have changed
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
        await self.handoff.stop()  # a transfer's message in hand goes back to the queue
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
        # Retrieve what they ended with: an exception of a cancelled gather must not be
        # reported later as "never retrieved".
        await asyncio.gather(finished, hurry, return_exceptions=True)
        if self.listeners is not None:
            await self.listeners.close()
        for task in list(self._tasks):
            task.cancel()
        await self.dispatcher.stop()
        if self.cluster is not None:
            await self.cluster.stop()  # after the last connection gave its lease back
        await self.queue.stop()  # outcome writes still in flight finish
        await self.guard.close()  # after the last outcomes were counted
        if self.admin is not None:
            await self.admin.cleanup()
        log.info("stopped; %d messages remain in the spool", self.spool.messages)

    async def run(
        self, stop: asyncio.Event, urgent: asyncio.Event | None = None, grace: float = DEFAULT_GRACE
    ) -> None:
        background: set[asyncio.Task[Any]] = set()
        self._engines = [
            spawn(self.queue.run(), background, "schedule"),
            spawn(self.dispatcher.run(self.queue.opened), background, "dispatcher"),
        ]
        try:
            await self.start()
            self.notifier.ready()
            await stop.wait()
            self.notifier.stopping()
            await self.stop(grace, urgent or asyncio.Event())
        finally:
            for task in list(background):
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self.history.close()  # after the queue's last outcome writes
