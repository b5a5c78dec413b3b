"""A delivery lane: the workers and connections of one queue (a provider, or a site).

Each worker holds one connection slot from the moment it starts until its socket is
closed (QUIT answered or timed out, the server's close seen), and a lane runs at most
`shaper.max_connections()` workers, so the destination never sees more than
`max_connections` of ours, even for a millisecond (SPEC §5).

A worker first connects to a site, then takes work for the host it reached: a
connection still waiting for its greeting holds no mail that another open connection
could carry now. It carries up to `max_messages_per_connection` transactions, for any
domain that host serves, waits `idle_connection_timeout` for more, then QUITs.

Before each transaction the batch's TLS requirement (DANE, its domain's MTA-STS policy,
the provider's `tls`: tls_policy.py) is judged against the session at hand. A session
that does not meet it carries nothing for that domain: the worker closes it and opens
one for the domain itself, to the hosts that can meet it; when none can, the batch is
deferred with `4.7.5`, and so are that domain's next batches for `retry.initial`.

A lane pauses as a whole only when a rule or an admin suspends its provider (pause.py);
an unreachable site backs off alone (the queue manager keeps that). After a suspension
the lane reopens with one connection and widens on success (slow start).

In a cluster (SPEC §9) a worker also holds a slot lease from the context's `slots`
before it connects, released once its socket is gone; a lease the cluster could not
renew ends its connection after the transaction in hand. Suspensions, resumptions and
throttles are announced to the other nodes, and theirs arrive through the dispatcher.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

from relay.config.model import Config, Rule
from relay.config.units import parse_rate
from relay.delivery.classify import classify, throttle_kind
from relay.delivery.client import Connection
from relay.delivery.connector import tls_refusal
from relay.delivery.context import LaneContext
from relay.delivery.pause import Pause
from relay.delivery.tls_policy import Decision, PolicyName
from relay.delivery.transaction import egress_trace, transact
from relay.errors import (
    DeliveryError,
    DestinationUnreachable,
    DnsPermanentError,
    DnsTemporaryError,
    PermanentDeliveryError,
    SpoolError,
    TransientDeliveryError,
)
from relay.queue.models import Attempt, Batch, Hop, Where
from relay.queue.ready import ReadyQueue
from relay.reply import Reply, Verdict
from relay.routing.router import Queue, Site
from relay.shaping.adaptive import CLEAN_STEP, Adaptive
from relay.shaping.lanestate import LaneEvent
from relay.shaping.shaper import Limit, Shaper
from relay.tasks import spawn

log = logging.getLogger("relay.delivery")

# How often a worker asks again for a slot the cluster's other nodes hold all of: a
# lease comes back when its connection closes on another node (or expires), which this
# node cannot be told of more cheaply than by asking. Jittered so nodes do not ask in step.
SLOT_RETRY = 0.2


class Lane:
    def __init__(
        self, ready: ReadyQueue, context: LaneContext, on_idle: Callable[[Lane], None]
    ) -> None:
        self._ctx = context
        self._on_idle = on_idle
        self.ready = ready
        self._adaptive: Adaptive | None = None  # kept across reloads
        self._limits_at = 0.0  # wall clock of the last adaptive change, here or shared
        self.reconfigure(ready.queue)
        self._workers: set[asyncio.Task[Any]] = set()
        self._leaving: set[asyncio.Task[Any]] = set()  # surplus: closing, slot still held
        self._idle = 0
        # Domains whose TLS requirement no host could meet lately: until, reply, policy.
        self._refused: dict[str, tuple[float, Reply, PolicyName]] = {}
        self._wakeup = asyncio.Event()
        self._interrupt = asyncio.Event()  # set by pause and shutdown: rate waits end early
        self._pause = Pause(
            self.key, self.queue.provider, context.suspensions, context.clock, self._pause_ended
        )
        ready.consumer = self
        restored = context.suspensions.get(self.key)
        if restored is not None:
            self.suspend(restored.until - context.clock.time(), restored.reason, persist=False)

    @property
    def _config(self) -> Config:
        return self._ctx.config

    def reconfigure(self, queue: Queue) -> None:
        """Take new shaping and rules (config reload); rates and throttles start afresh,
        adaptive limits in force stay (within the new limits)."""
        self.queue = queue
        self.ready.queue = queue
        self.shaping = queue.shaping
        self.shaper = Shaper(
            self.shaping,
            self._ctx.config.classes,
            self._ctx.clock.monotonic,
            buckets=self._ctx.buckets(queue.key),
            adaptive=self._adaptive,
            mailboxes=self._ctx.mailboxes(queue.key),
        )
        self._adaptive = self.shaper.adaptive
        self._rules = self.shaping.rules + self._ctx.config.rules

    @property
    def key(self) -> str:
        return self.queue.key

    @property
    def paused(self) -> bool:
        return self._pause.active

    @property
    def suspended(self) -> str | None:
        """The reason, while a rule or an admin suspends the provider."""
        return self._pause.reason

    @property
    def suspended_until(self) -> float | None:
        """Wall-clock end of the suspension in force."""
        return self._pause.until

    @property
    def _halted(self) -> bool:
        """No new transaction may start: paused, shutting down, or fenced off."""
        return self.paused or self._ctx.stopping or not self._ctx.may_deliver()

    @property
    def busy(self) -> bool:
        """A paused, throttled or rate-limited lane stays registered: forgetting it would
        forget its suspension, throttle or rates."""
        return bool(self.ready.pending or self._workers or self.paused or not self.shaper.at_rest())

    @property
    def connections(self) -> int:
        """Connection slots in use: open, opening, or closing."""
        return len(self._workers)

    @property
    def workers(self) -> list[asyncio.Task[Any]]:
        return list(self._workers)

    def limits(self) -> list[Limit]:
        """The limits in force and why (`relay provider show`)."""
        return self.shaper.limits(self._ctx.clock.time())

    # work arrives (ReadyQueue's consumer)

    def wake(self) -> None:
        if self._idle:
            self._wakeup.set()
        self._kick()

    def interrupt(self) -> None:
        """Idle and rate-waiting workers re-check their conditions (shutdown, pause)."""
        self._wakeup.set()
        self._interrupt.set()

    def _kick(self) -> None:
        if self._halted or self.ready.pending <= self._idle:
            return  # nothing to do, or the idle connections will take it
        if len(self._workers) < self.shaper.max_connections():
            spawn(self._worker(), self._workers, f"lane {self.key}").add_done_callback(
                self._worker_done
            )

    def _worker_done(self, task: asyncio.Task[Any]) -> None:
        self._leaving.discard(task)
        if self.ready.pending:
            self._kick()
        elif not self.busy:
            self._on_idle(self)

    def _surplus(self) -> bool:
        """Throttled, ramping or reloaded to fewer connections: this worker leaves. Only
        as many leave as there are too many; their slots stay taken until closed."""
        task = asyncio.current_task()
        if task is None or len(self._workers) - len(self._leaving) <= self.shaper.max_connections():
            return False
        self._leaving.add(task)
        return True

    # workers

    async def _sleep(self, seconds: float) -> None:
        """Wait for a rate slot; a pause or shutdown cuts the wait short."""
        try:
            await asyncio.wait_for(self._interrupt.wait(), seconds)
        except TimeoutError:
            pass

    def _class_open(self, class_name: str) -> bool:
        return self.shaper.class_delay(class_name) <= 0

    def _rate_wait(self) -> float | None:
        """While only rates hold the waiting work back: how long until one allows."""
        waits = [self.shaper.class_delay(name) for name in self.ready.waiting_classes()]
        return min(waits) if waits else None

    def _reusable(self, connection: Connection) -> bool:
        return (
            connection.usable
            and connection.transactions < self.shaping.max_messages_per_connection
            and not (connection.slot is not None and connection.slot.lost)
        )

    async def _worker(self) -> None:
        connection: Connection | None = None
        try:
            while not self._halted and not self._surplus():
                if connection is not None and not self._reusable(connection):
                    await self._close(connection)
                    connection = None
                if connection is None:
                    site = self.ready.next_site(self._class_open)
                    if site is None:
                        wait = self._rate_wait()
                        if wait is None:
                            break
                        await self._sleep(wait)
                        continue
                    connection = await self._connect(site)
                    continue
                wait = self.shaper.provider_delay()
                if wait > 0:
                    await self._sleep(wait)
                    continue
                batch = self.ready.take(connection.site, connection.host, self._class_open)
                if batch is not None:
                    connection = await self._carry(batch, connection)
                    continue
                if self.ready.waiting_elsewhere(connection.site, connection.host, self._class_open):
                    await self._close(connection)  # free the slot for a site with work
                    connection = None
                    continue
                wait = self._rate_wait()
                if wait is not None and wait > 0:
                    await self._sleep(wait)
                    continue
                if connection.slot is not None and await self._ctx.slots.wanted(connection.slot):
                    break  # another node waits for this slot, with work: an idle one lets go
                if not await self._wait_for_work():
                    break
        finally:
            if connection is not None:
                await asyncio.shield(self._close(connection))

    async def _wait_for_work(self) -> bool:
        clock = self._ctx.clock
        deadline = clock.monotonic() + self._config.delivery.idle_connection_timeout
        self._idle += 1
        try:
            while not self.ready.pending:
                remaining = deadline - clock.monotonic()
                if remaining <= 0 or self._halted:
                    return False
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    return False
            return not self._halted
        finally:
            self._idle -= 1

    # connections

    async def _open(self, site: Site, domain: str | None = None) -> Connection | None:
        """A session to `site` (for `domain`'s mail only, when given), or None when the
        lane halted meanwhile. Connector errors pass through."""
        # Sleep until the computed slot, then re-check: another worker may have taken it,
        # and check-then-take with no await in between is atomic on the event loop.
        while (wait := self.shaper.connection_delay()) > 0 and not self._halted:
            await self._sleep(wait)
        slots = self._ctx.slots
        while (slot := await slots.acquire(self.key, self.shaper.max_connections())) is None:
            if self._halted:
                return None
            await self._sleep(SLOT_RETRY * random.uniform(0.5, 1.5))
        if self._halted:
            slots.release(slot)
            return None
        self.shaper.take_connection()
        try:
            connection = await self._ctx.connector.open(
                site, self.shaping, self._rules, domain, self._tally
            )
        except BaseException:
            slots.release(slot)  # no socket is left open (connector.py)
            raise
        connection.slot = slot
        self._ctx.queue.site_reached(site)
        self._ctx.metrics.connections.labels(self.queue.provider, site.source).inc()
        return connection

    def _tally(self, policy: PolicyName, result: str) -> None:
        self._ctx.metrics.tls_policy.labels(self.queue.provider, policy, result).inc()

    async def _connect(self, site: Site) -> Connection | None:
        """A connection to `site`, or None when it failed (and the mail waiting for that
        site was dealt with) or the lane halted meanwhile."""
        queue = self._ctx.queue
        try:
            return await self._open(site)
        except DnsPermanentError as exc:
            await queue.settle_all(self.ready.take_site(site), exc.reply, Verdict.BOUNCED)
            return None
        except (DestinationUnreachable, DnsTemporaryError) as exc:
            if throttle_kind(exc.reply, None):
                self._adapt(exc.reply)
            if not self._crowded(exc.reply, None):
                await queue.site_unreachable(self.ready, site, exc.reply)
            return None
        except (TransientDeliveryError, PermanentDeliveryError) as exc:
            # The greeting or EHLO reply matched a rule: the provider spoke for itself.
            verdict = classify(exc.reply, self._rules)
            self._count_replies([exc.reply], site.source)
            self._apply(verdict.rule, exc.reply)
            if verdict.verdict is Verdict.BOUNCED:
                await queue.settle_all(self.ready.take_site(site), exc.reply, Verdict.BOUNCED)
            elif not self.paused and not self._crowded(exc.reply, verdict.rule):
                await queue.site_unreachable(self.ready, site, exc.reply)
            return None

    def _crowded(self, reply: Reply, rule: Rule | None) -> bool:
        """A connection refused for being one too many, while this lane's others carry
        on: the site is reachable and its mail waits for them. This worker is surplus
        now and leaves; backing the site off would stop the connections that work."""
        return throttle_kind(reply, rule) and self.connections > self.shaper.max_connections()

    async def _close(self, connection: Connection) -> None:
        if connection.released:
            return
        connection.released = True
        try:
            await connection.close()
        finally:
            if connection.slot is not None:
                self._ctx.slots.release(connection.slot)
        self._ctx.metrics.connections.labels(self.queue.provider, connection.site.source).dec()
        # One count per session, under the strongest policy it met (SPEC §8).
        result = "tls" if connection.tls.version else "plaintext"
        self._tally(connection.policy, "failed" if connection.tls_failed else result)

    def _count_replies(self, replies: list[Reply], source: str) -> None:
        counter = self._ctx.metrics.replies
        for reply in replies:
            if reply.remote:
                counter.labels(self.queue.provider, str(reply.code), source).inc()

    # transactions

    async def _carry(self, batch: Batch, connection: Connection) -> Connection | None:
        """`_deliver`, and if it fails with a bug, the batch is not left active forever:
        what is still in hand is deferred, and the session (in an unknown state) closed."""
        try:
            return await self._deliver(batch, connection)
        except Exception:
            log.exception("queue=%s id=%s: delivery failed", self.key, batch.message.id)
            in_hand = [r for r in batch.recipients if r.where is Where.ACTIVE]
            if in_hand:
                reply = Reply.local(451, "4.3.0", "internal error during delivery")
                attempts = [Attempt(r, reply, Verdict.DEFERRED) for r in in_hand]
                await self._ctx.queue.settle(batch, attempts, None)
            await self._close(connection)
            return None

    async def _deliver(self, batch: Batch, connection: Connection) -> Connection | None:
        """Carry one batch; the session to go on with (another one when this one did
        not meet the batch's TLS requirement), or None."""
        queue = self._ctx.queue
        queue.take(batch)
        self.shaper.take_message(batch.class_name)
        if not await self._admit_recipients(batch):
            self.shaper.refund_message(batch.class_name)
            return connection
        try:
            message = await self._ctx.load(batch.message)
        except SpoolError as exc:
            log.error("id=%s cannot be read from the spool: %s", batch.message.id, exc)
            reply = Reply.local(451, "4.3.0", "spool read error")
            attempts = [Attempt(r, reply, Verdict.DEFERRED) for r in batch.recipients]
            await queue.settle(batch, attempts, None)
            return connection
        connector = self._ctx.connector
        decision = await connector.check(batch.domain, connection, self.shaping)
        if decision.problem is not None:
            refused = self._refused.get(batch.domain)
            if refused is not None and refused[0] > self._ctx.clock.monotonic():
                await self._defer(batch, refused[1], refused[2])
                return connection
            found = await self._reopen(batch, connection, decision)
            if found is None:
                return None
            connection = found
            decision = await connector.check(batch.domain, connection, self.shaping)
            if decision.problem is not None:  # the policy changed meanwhile
                await self._defer(batch, tls_refusal(decision.problem), decision.policy)
                return connection
        hop = Hop(decision.policy, connection.tls.version, connection.dsn)
        if self._config.egress_named:
            message = egress_trace(self._config, connection, batch.message.id) + message
        result = await transact(connection, batch, message, self._rules, hop)
        self._count_replies(result.replies, connection.site.source)
        await queue.settle(batch, result.attempts, connection.description)
        for rule, reply in result.fired:
            self._apply(rule, reply)
        throttled = any(throttle_kind(r, rule) for rule, r in result.fired)
        crowded = [r for r in result.replies if throttle_kind(r, None)]
        if crowded and not throttled:  # a throttle rule has adapted already
            self._adapt(crowded[0])
        delivered = any(a.verdict is Verdict.DELIVERED for a in result.attempts)
        if delivered and not (throttled or crowded):
            adaptive = self.shaper.adaptive
            before = (adaptive.connections, adaptive.rate) if adaptive is not None else None
            if self.shaper.succeeded():
                self._kick()
                if adaptive is not None and before != (adaptive.connections, adaptive.rate):
                    self._limits_changed(f"{CLEAN_STEP} transactions without a throttle-kind reply")
        return connection

    async def _reopen(
        self, batch: Batch, connection: Connection, decision: Decision
    ) -> Connection | None:
        """A session for the batch's domain alone, in place of one that cannot carry it
        (one slot, one session: the old one is closed first). None when there is none:
        the batch has been dealt with."""
        log.info(
            "id=%s %s: %s; looking for a session that meets it",
            batch.message.id,
            batch.domain,
            decision.problem,
        )
        await self._close(connection)
        try:
            found = await self._open(batch.destination.site, batch.domain)
        except (DnsPermanentError, DnsTemporaryError, DeliveryError) as exc:
            reply = exc.reply
            if reply.status == "4.7.5":
                now = self._ctx.clock.monotonic()
                self._refused = {d: r for d, r in self._refused.items() if r[0] > now}
                self._refused[batch.domain] = (
                    now + self._config.retry.initial,
                    reply,
                    decision.policy,
                )
            verdict = classify(reply, self._rules)
            self._count_replies([reply], batch.destination.site.source)
            self._apply(verdict.rule, reply)
            self.shaper.refund_message(batch.class_name)  # nothing was sent
            hop = Hop(decision.policy, None)
            attempts = [Attempt(r, reply, verdict.verdict, hop) for r in batch.recipients]
            await self._ctx.queue.settle(batch, attempts, None)
            return None
        if found is None:  # halted: the batch waits, no attempt made
            self.shaper.refund_message(batch.class_name)
            self._ctx.queue.requeue(batch.message, batch.recipients)
        return found

    async def _defer(self, batch: Batch, reply: Reply, policy: PolicyName) -> None:
        """The batch's TLS requirement cannot be met: deferred, nothing sent."""
        self.shaper.refund_message(batch.class_name)
        hop = Hop(policy, None)
        attempts = [Attempt(r, reply, Verdict.DEFERRED, hop) for r in batch.recipients]
        await self._ctx.queue.settle(batch, attempts, None)

    async def _admit_recipients(self, batch: Batch) -> bool:
        """Hold back recipients whose mailbox rate is spent: they wait, never dropped.
        In a cluster the rate is the cluster's (SPEC §9): one round trip to Redis for
        the whole batch, or the local share while Redis is down."""
        if self.shaping.recipient_rate is None:
            return True
        waits = await self.shaper.admit_mailboxes([r.address for r in batch.recipients])
        now = self._ctx.clock.time()
        allowed, held = [], []
        for recipient, wait in zip(batch.recipients, waits, strict=True):
            if wait > 0:
                recipient.next_attempt = now + wait
                held.append(recipient)
            else:
                allowed.append(recipient)
        if held:
            self._ctx.queue.requeue(batch.message, held)
        batch.recipients = allowed
        return bool(allowed)

    # suspensions and throttles (the provider as a whole)

    def _apply(self, rule: Rule | None, reply: Reply) -> None:
        if rule is None:
            return
        if rule.action == "suspend" and rule.duration:
            self.suspend(rule.duration, str(reply))
        elif rule.action == "throttle":
            self.throttle(rule, str(reply))
            self._adapt(reply)

    def _adapt(self, reply: Reply) -> None:
        """A throttle-kind reply: adaptive limits halve (SPEC §12), on every node."""
        # Alone, this lane's open connections are what the receiver saw; in a cluster
        # it saw every node's, within the cluster's limit: that is what halves.
        seen = self.shaper.max_connections() if self._ctx.clustered else self.connections
        if self.shaper.reduce(seen, str(reply), self._ctx.clock.time()):
            self._limits_changed(str(reply))

    def _limits_changed(self, reason: str) -> None:
        adaptive = self.shaper.adaptive
        assert adaptive is not None
        self._limits_at = self._ctx.clock.time()
        log.warning(
            "queue=%s adaptive limits: max_connections %d, rate %s: %s",
            self.key,
            adaptive.connections,
            adaptive.rate or "-",
            reason,
        )
        rate = adaptive.rate.text if adaptive.rate is not None else None
        self._announce("limit", 0, reason, rate, adaptive.connections)

    def assume_limits(self, event: LaneEvent) -> None:
        """Another node's adaptive limits for this lane (SPEC §9): the same here, unless
        this lane changed its own since (the hash is re-read: old news comes again)."""
        if event.at <= self._limits_at:
            return
        self._limits_at = event.at
        try:
            rate = parse_rate(event.rate) if event.rate else None
        except ValueError:
            log.warning("lane %s: adaptive rate %r from another node ignored", self.key, event.rate)
            return
        connections = event.max_connections or self.shaping.max_connections
        reason = f"{event.reason} (from node {event.node})"
        if self.shaper.assume(connections, rate, reason, event.at):
            self._kick()

    def throttle(self, rule: Rule, reason: str, announce: bool = True) -> None:
        self.shaper.throttle(rule, reason)
        if announce:
            self._announce(
                "throttle",
                rule.duration or 0,
                reason,
                rule.rate.text if rule.rate else None,
                rule.max_connections,
            )
        log.warning(
            "provider=%s throttled for %.0fs (rate=%s max_connections=%s): %s",
            self.queue.provider,
            rule.duration or 0,
            rule.rate or "-",
            rule.max_connections or "-",
            reason,
        )

    def _announce(
        self,
        kind: str,
        duration: float,
        reason: str,
        rate: str | None = None,
        max_connections: int | None = None,
    ) -> None:
        """Tell the cluster's other nodes (SPEC §9); nothing to do on a single node."""
        announcer = self._ctx.announcer
        if announcer is None:
            return
        now = self._ctx.clock.time()
        announcer.announce(
            LaneEvent(
                self.key,
                kind,  # type: ignore[arg-type]
                now,
                now + duration if duration else 0.0,
                reason,
                rate,
                max_connections,
            )
        )

    def suspend(
        self, duration: float, reason: str, persist: bool = True, announce: bool = True
    ) -> None:
        """No new transaction for `duration`; in-flight ones finish, waiting mail stays."""
        if self._pause.start(duration, reason, persist):
            if announce and persist:  # a suspension restored from disk is old news
                self._announce("suspend", duration, reason)
            self.interrupt()  # idle and waiting workers notice and close their connections
            self._ctx.queue.suspended(self.ready, f"{self.key}: {reason}")

    def _pause_ended(self) -> None:
        self.resume(announce=False)  # every node's own timer ends its pause

    def resume(self, announce: bool = True) -> None:
        """End a suspension now (its timer, an admin, another node); reopen slowly."""
        if announce and self._pause.reason is not None:
            self._announce("resume", 0, "")
        self._pause.end()
        self._interrupt.clear()
        self.shaper.restart_slowly()
        if self.ready.pending:
            self._kick()
        elif not self.busy:
            self._on_idle(self)

    async def stop(self) -> None:
        """Cancel workers; outcome writes are shielded and finish, sockets are closed."""
        self._pause.cancel()
        tasks = list(self._workers)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
