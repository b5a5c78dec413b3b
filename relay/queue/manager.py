"""The queue manager: every queued recipient, where it waits, and what happens after
each attempt (Postfix's qmgr beside its `smtp` delivery agents).

It owns the registry, the schedule of deferred recipients, the exact counts, the ready
queues per queue (provider or site) and class, site backoff, the after-attempt step
(record, backoff, expire, DSN, remove), recovery replay and the admin actions. Delivery
only opens connections, runs transactions and hands attempts back through `settle`.

A new ready queue is announced on `opened`; the delivery side reads it and gives the
queue a lane, so neither side holds a callback into the other.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from relay.clock import SYSTEM_CLOCK, Clock
from relay.config.model import Config
from relay.errors import SpoolError
from relay.history import events
from relay.history.events import NO_RECORDER, Recorder
from relay.metrics import Metrics
from relay.queue.deferrals import RecentDeferrals
from relay.queue.models import (
    NO_WATCH,
    AccountWatch,
    Attempt,
    Batch,
    QueuedMessage,
    Recipient,
    Where,
)
from relay.queue.outcomes import Outcomes, Settled
from relay.queue.ready import ReadyQueue
from relay.queue.registry import Registry
from relay.queue.schedule import Schedule
from relay.queue.sites import SiteBackoff
from relay.queue.stats import QueueStats
from relay.reply import Reply, Verdict
from relay.routing.egress import choose as choose_egress
from relay.routing.router import DEFAULT_PROVIDER, Destination, Queue, Router, Site
from relay.spool.records import RecipientStatus
from relay.spool.store import Recovered, Spool
from relay.tasks import spawn, wait_all

log = logging.getLogger("relay.queue")


class QueueManager:
    def __init__(
        self,
        config: Config,
        spool: Spool,
        router: Router,
        metrics: Metrics,
        clock: Clock = SYSTEM_CLOCK,
        recorder: Recorder = NO_RECORDER,
        accounts: AccountWatch = NO_WATCH,
    ) -> None:
        self.config = config
        self._spool = spool
        self._router = router
        self._clock = clock
        self._events = recorder  # each message's timeline (relay/history)
        self._accounts = accounts  # the account guard (relay/guard)
        self.registry = Registry()
        self.stats = QueueStats()
        self.schedule = Schedule(clock)
        self.sites = SiteBackoff(clock)
        self._outcomes = Outcomes(config, spool, self.stats, metrics, clock, recorder, accounts)
        self.deferrals = RecentDeferrals(clock)  # the status page shows the last ones
        self._ready: dict[str, ReadyQueue] = {}
        self.opened: asyncio.Queue[ReadyQueue] = asyncio.Queue()
        self._routing: set[asyncio.Task[Any]] = set()
        self._settling: set[asyncio.Task[Any]] = set()
        self._marking: set[asyncio.Task[Any]] = set()  # hold markers of the guard's holds
        self._admin = asyncio.Lock()

    def reconfigure(self, config: Config, router: Router) -> None:
        """A reload: new routes and retry settings from now on; queued mail keeps its
        queue until its next attempt is routed again."""
        self.config = config
        self._router = router
        self._outcomes.config = config

    # intake

    def submit(self, message: QueuedMessage) -> None:
        """Queue every unfinished recipient of a new or recovered message, once."""
        if self.registry.get(message.id) is not None:
            return
        self.registry.add(message)
        guarded = self._accounts.holds(message.envelope.account)
        if guarded is not None and not message.held:
            # Held before it is placed: no lane ever sees it.
            self._hold_now(message, "guard", guarded)
            spawn(self._mark(message), self._marking, f"hold {message.id}")
        elif guarded is None and message.held and message.hold_reason == "guard":
            # Its account is not tripped here: released while this message was out of
            # reach (on a node whose spool was adopted since, or behind a crash before
            # its marker was removed). It goes out, as the release said.
            message.held, message.hold_reason = False, ""
            log.info("id=%s: its account is not tripped; the guard's hold is lifted", message.id)
            spawn(self._unmark(message), self._marking, f"unhold {message.id}")
        self._route(message, [r for r in message.recipients if not r.status.is_final])

    async def recover(self, recovered: Iterable[Recovered]) -> tuple[int, int]:
        """Queue what the spool holds and nobody has queued yet; yields to the event loop
        every few hundred messages, so live mail and due deliveries go on meanwhile."""
        messages = recipients = 0
        for count, entry in enumerate(recovered, 1):
            # Between reading the file and this check nothing else may run: a message
            # delivered and removed meanwhile would be queued a second time.
            if self.registry.get(entry.envelope.id) is not None:
                continue
            message = restore(entry)
            self._spool.note_stored(entry.size)
            if message.done:
                await self._spool.remove(message.id)
                # Finished just before a stop: its history may not have been written.
                self._events.finish(message, self._clock.time())
                continue
            messages += 1
            recipients += sum(1 for r in message.recipients if not r.status.is_final)
            self.submit(message)
            if count % 256 == 0:
                await asyncio.sleep(0)
        return messages, recipients

    # placing

    def _route(self, message: QueuedMessage, recipients: list[Recipient]) -> None:
        """Route due recipients again (MX data and the config may have changed since)."""
        by_domain: dict[str, list[Recipient]] = defaultdict(list)
        for recipient in recipients:
            self.stats.move(message, [recipient], Where.NOWHERE)
            by_domain[recipient.domain].append(recipient)
        for domain, group in by_domain.items():
            destination = self._router.cached(domain)
            if destination is not None:
                self._routed(message, group, destination)
                continue
            # A recipient routed again keeps its previous destination during the lookup:
            # it stays in that provider's backlog, which admission control counts.
            self.stats.move(message, group, Where.ROUTING)
            spawn(self._lookup(domain, message, group), self._routing, f"route {domain}")

    async def _lookup(self, domain: str, message: QueuedMessage, group: list[Recipient]) -> None:
        try:
            destination = await self._router.route(domain)
        except Exception:
            # A bug, not a DNS answer (those become routes). The recipients must not be
            # left nowhere: they are looked up again later, and the log says why.
            log.exception("routing %s failed; its recipients are looked up again later", domain)
            still = [r for r in group if r.where is Where.ROUTING]
            for recipient in still:
                recipient.next_attempt = self._clock.time() + self.config.retry.initial
                self.stats.move(message, [recipient], Where.SCHEDULED)
                self.schedule.add(message, recipient)
            return
        # An admin may have held, bounced or deleted some of them during the lookup.
        still = [r for r in group if r.where is Where.ROUTING]
        self.stats.move(message, still, Where.NOWHERE)
        self._routed(message, still, destination)

    def _routed(
        self, message: QueuedMessage, recipients: list[Recipient], destination: Destination
    ) -> None:
        envelope = message.envelope
        source = choose_egress(
            self.config, envelope.account, envelope.class_name, destination.queue.provider
        )
        destination = self._router.for_egress(destination, source.name)
        moved = [r.address for r in recipients if r.destination != destination]
        if moved:  # routed anew: the first time, after a restart, or the route changed
            now = self._clock.time()
            self._events.record(
                message.id, events.routed(now, recipients[0].domain, moved, destination)
            )
        for recipient in recipients:
            recipient.destination = destination
        self.place(message, recipients)

    def place(self, message: QueuedMessage, recipients: list[Recipient]) -> None:
        """Put routed recipients where they wait: held, scheduled, or ready."""
        if message.deleted:
            return
        if message.held:
            self.stats.move(message, recipients, Where.HELD)
            return
        unrouted = [r for r in recipients if r.destination is None]
        if unrouted:  # put back before an MX lookup ever routed them (a DSN not stored)
            self._route(message, unrouted)
            recipients = [r for r in recipients if r.destination is not None]
        now = self._clock.time()
        ready: dict[tuple[str, str], list[Recipient]] = defaultdict(list)
        backing: dict[str, list[str]] = defaultdict(list)  # site → its waiting recipients
        for recipient in recipients:
            destination = recipient.destination
            assert destination is not None, "placed before it was routed"
            backing_off = self.sites.until(destination.site.key)
            if backing_off is not None:
                recipient.next_attempt = max(recipient.next_attempt, backing_off)
                backing[destination.site.key].append(recipient.address)
            if recipient.next_attempt > now:
                self.stats.move(message, [recipient], Where.SCHEDULED)
                self.schedule.add(message, recipient)
            else:
                ready[(destination.queue.key, recipient.domain)].append(recipient)
        for site, addresses in backing.items():
            detail = f"no host of {site} could be reached"
            until = self.sites.until(site)
            self._events.record(
                message.id, events.waiting(now, "site backoff", addresses, until, detail)
            )
        for group in ready.values():
            self._make_ready(message, group)

    def _make_ready(self, message: QueuedMessage, recipients: list[Recipient]) -> None:
        destination = recipients[0].destination
        assert destination is not None
        queue = self.ready_queue(destination.queue)
        suspended = queue.consumer.suspended if queue.consumer is not None else None
        if suspended is not None:  # ready, but its lane sends nothing until resumed
            detail = f"{destination.queue.key}: {suspended}"
            addresses = [r.address for r in recipients]
            self._events.record(
                message.id,
                events.waiting(self._clock.time(), "provider suspended", addresses, None, detail),
            )
        self.stats.move(message, recipients, Where.READY)
        size = destination.queue.shaping.max_recipients_per_message
        for start in range(0, len(recipients), size):
            chunk = recipients[start : start + size]
            queue.push(Batch(message, chunk, destination, chunk[0].domain))

    def suspended(self, ready: ReadyQueue, detail: str) -> None:
        """A lane was suspended with mail ready in it: each message's timeline says why
        it waits (mail made ready later gets the same word in `_make_ready`)."""
        now = self._clock.time()
        waiting: dict[str, list[str]] = defaultdict(list)
        for batch in ready.batches():
            waiting[batch.message.id].extend(r.address for r in batch.recipients)
        for message_id, addresses in waiting.items():
            self._events.record(
                message_id,
                events.waiting(now, "provider suspended", addresses, None, detail),
            )

    def ready_queue(self, queue: Queue) -> ReadyQueue:
        ready = self._ready.get(queue.key)
        if ready is None:
            ready = self._ready[queue.key] = ReadyQueue(queue, self._priority)
            self.opened.put_nowait(ready)
        return ready

    def ready_queues(self) -> list[ReadyQueue]:
        return list(self._ready.values())

    def forget(self, ready: ReadyQueue) -> bool:
        """Drop an empty ready queue whose lane goes idle; False if work came meanwhile."""
        if ready.pending or self._ready.get(ready.key) is not ready:
            return False
        del self._ready[ready.key]
        return True

    def _priority(self, class_name: str) -> int:
        traffic = self.config.classes.get(class_name)
        return traffic.priority if traffic is not None else 0

    def requeue(self, message: QueuedMessage, recipients: list[Recipient]) -> None:
        """Recipients taken for an attempt that did not happen (a mailbox rate was spent):
        they wait for their `next_attempt`, with no attempt counted."""
        now = self._clock.time()
        later = [r for r in recipients if r.next_attempt > now]
        if later:
            self._events.record(
                message.id,
                events.waiting(
                    now,
                    "recipient rate",
                    [r.address for r in later],
                    max(r.next_attempt for r in later),
                    "the mailbox's recipient_rate is spent",
                ),
            )
        self._again(message, recipients)

    def _again(self, message: QueuedMessage, recipients: list[Recipient]) -> None:
        self.stats.move(message, recipients, Where.NOWHERE)
        self.place(message, recipients)

    # after attempts

    def take(self, batch: Batch) -> None:
        """A lane took this batch for a transaction: its recipients are active."""
        batch.taken_at = self._clock.time()
        self.stats.move(batch.message, batch.recipients, Where.ACTIVE)

    async def settle(self, batch: Batch, attempts: list[Attempt], relay: str | None) -> None:
        """Record an attempt and act on it; a cancelled worker cannot lose it, and `stop`
        waits for it."""
        provider = batch.destination.queue.provider
        task = spawn(
            self._settle(batch.message, attempts, relay, provider, batch.taken_at),
            self._settling,
            f"settle {batch.message.id}",
        )
        await asyncio.shield(task)

    async def _settle(
        self,
        message: QueuedMessage,
        attempts: list[Attempt],
        relay: str | None,
        provider: str,
        started: float | None = None,
    ) -> None:
        settled = await self._outcomes.settle(message, attempts, relay, provider, started)
        self.deferrals.record(message, settled.deferred, provider)
        self._after(message, settled)

    def _after(self, message: QueuedMessage, settled: Settled) -> None:
        if settled.removed:
            self.registry.remove(message.id)
        for notice in settled.notices:
            self.submit(notice)
        if settled.deferred:
            self._again(message, settled.deferred)

    async def site_unreachable(self, ready: ReadyQueue, site: Site, reply: Reply) -> None:
        """No host of `site` could be reached: it backs off alone, and the mail waiting
        for it is deferred with that reply (each recipient's attempt is counted)."""
        until = self.sites.until(site.key)
        if until is None:  # one failed round counts once, however many workers met it
            until = self.sites.failed(site.key, self.config.retry)
        batches = ready.take_site(site)
        log.warning(
            "queue=%s site=%s unreachable, deferred for %.0fs (%d transactions waiting): %s",
            ready.key,
            site.key,
            until - self._clock.time(),
            len(batches),
            reply,
        )
        await self.settle_all(batches, reply, Verdict.DEFERRED)

    async def settle_all(self, batches: list[Batch], reply: Reply, verdict: Verdict) -> None:
        """Every batch gets the same outcome (a dead site, a refusing greeting)."""
        for batch in batches:
            self.take(batch)
            await self.settle(batch, [Attempt(r, reply, verdict) for r in batch.recipients], None)

    def site_reached(self, site: Site) -> None:
        self.sites.reached(site.key)

    # the schedule

    async def run(self) -> None:
        """Due recipients leave the schedule for their queue (routed again first)."""
        while True:
            await self.schedule.wait()
            for message, recipients in self.schedule.pop_due():
                self._route(message, recipients)

    # admin actions

    def flush(self, accept: Callable[[QueuedMessage, Recipient], bool], sites: bool = False) -> int:
        """Make scheduled recipients that `accept` picks due now; with `sites`, dead
        sites are tried again too."""
        if sites:
            self.sites.clear()
        count = 0
        for message, recipients in self.schedule.select(accept):
            for recipient in recipients:
                recipient.next_attempt = 0.0
            count += len(recipients)
            self._events.record(message.id, events.admin(self._clock.time(), "flush"))
            self._route(message, recipients)
        return count

    async def hold(self, message: QueuedMessage) -> None:
        # One admin hold or release at a time: interleaved around the marker file's write,
        # a release could run between a hold's flag and its move, and leave mail HELD
        # with nothing to release it.
        async with self._admin:
            if message.held:
                return
            self._hold_now(message, "admin")
            await self._spool.set_held(message.id, True)
        self._events.record(message.id, events.admin(self._clock.time(), "hold"))
        log.info("id=%s held by the administrator", message.id)

    def _hold_now(self, message: QueuedMessage, reason: str, why: str | None = None) -> None:
        """Nothing more is attempted: recipients waiting are HELD (one in an attempt
        now is, once the attempt has settled)."""
        message.held = True
        message.hold_reason = reason
        waiting = [r for r in message.recipients if r.where in _WAITING]
        self.stats.move(message, waiting, Where.HELD)
        if why is not None:
            pending = [r.address for r in message.recipients if not r.status.is_final]
            self._events.record(
                message.id,
                events.waiting(self._clock.time(), "account guard", pending, None, why),
            )

    async def _mark(self, message: QueuedMessage) -> None:
        """The marker of a hold the guard made, so it outlives a restart; under the admin
        lock, so a release that came first is not undone on disk."""
        async with self._admin:
            if message.held and message.hold_reason == "guard" and not message.deleted:
                await self._persist_hold(message)

    async def _unmark(self, message: QueuedMessage) -> None:
        async with self._admin:
            if not message.held and not message.deleted:
                try:
                    await self._spool.set_held(message.id, False)
                except SpoolError as exc:
                    log.error("id=%s hold marker not removed: %s", message.id, exc)

    async def _persist_hold(self, message: QueuedMessage) -> None:
        try:
            await self._spool.set_held(message.id, True, "guard")
        except SpoolError as exc:
            # Held in memory all the same; after a restart the guard, still tripped,
            # holds it again as it is queued.
            log.error("id=%s hold not saved: %s", message.id, exc)

    async def release(self, message: QueuedMessage) -> None:
        async with self._admin:
            if not message.held:
                return
            await self._spool.set_held(message.id, False)
            message.held = False
        self._resume(message)
        self._events.record(message.id, events.admin(self._clock.time(), "release"))
        log.info("id=%s released by the administrator", message.id)

    def _resume(self, message: QueuedMessage) -> None:
        held = [r for r in message.recipients if r.where is Where.HELD]
        for recipient in held:
            recipient.next_attempt = 0.0
        self._route(message, held)

    async def hold_account(self, account: str, reason: str) -> int:
        """The account guard tripped `account`: hold its queued mail (Postfix's
        `postsuper -h` for one sender), with the marker that outlives a restart."""
        async with self._admin:
            found = [
                m
                for m in list(self.registry.messages.values())
                if m.envelope.account == account and not m.held and not m.deleted and not m.done
            ]
            for message in found:  # all at once: no lane takes one while markers are written
                self._hold_now(message, "guard", reason)
            for message in found:
                if message.held and not message.deleted:
                    await self._persist_hold(message)
        log.info("account %s: %d messages held by the account guard", account, len(found))
        return len(found)

    async def release_account(self, account: str) -> int:
        """`relay account release`: the mail the guard held for `account` goes out (what
        an admin held by hand stays held)."""
        released = 0
        async with self._admin:
            found = [
                m
                for m in list(self.registry.messages.values())
                if m.envelope.account == account and m.held and m.hold_reason == "guard"
            ]
            for message in found:
                if message.deleted or not message.held:
                    continue
                try:
                    await self._spool.set_held(message.id, False)
                except SpoolError as exc:
                    log.error("id=%s stays held: %s", message.id, exc)
                    continue
                message.held = False
                self._resume(message)
                self._events.record(message.id, events.admin(self._clock.time(), "release"))
                released += 1
        log.info("account %s: %d messages released from the account guard", account, released)
        return released

    async def delete(self, message: QueuedMessage) -> None:
        """Gone without a DSN (postsuper -d); an attempt in flight is not recorded."""
        message.deleted = True
        self.stats.move(
            message, [r for r in message.recipients if r.where is not Where.ACTIVE], Where.NOWHERE
        )
        await self._spool.remove(message.id)
        self.registry.remove(message.id)
        now = self._clock.time()
        self._events.finish(message, now, "deleted", (events.admin(now, "delete"),))
        log.info("id=%s deleted by the administrator", message.id)

    async def bounce(self, message: QueuedMessage) -> int:
        """Return every waiting recipient to the sender with one DSN.

        The recipients become ACTIVE before the first await: a routing lookup that ends
        meanwhile, or a second bounce, leaves them alone, so nothing is queued again
        against a removed file nor bounced twice.
        """
        waiting = [
            r for r in message.recipients if not r.status.is_final and r.where is not Where.ACTIVE
        ]
        if not waiting:
            return 0
        self.stats.move(message, waiting, Where.ACTIVE)
        self._events.record(message.id, events.admin(self._clock.time(), "bounce"))
        reply = Reply.local(550, "5.0.0", "message returned to sender by the administrator")
        attempts = [Attempt(r, reply, Verdict.BOUNCED) for r in waiting]
        providers = {r.destination.queue.provider for r in waiting if r.destination}
        provider = providers.pop() if len(providers) == 1 else DEFAULT_PROVIDER
        task = spawn(self._settle(message, attempts, None, provider), self._settling, "bounce")
        await asyncio.shield(task)
        log.info("id=%s bounced by the administrator (%d recipients)", message.id, len(waiting))
        return len(waiting)

    # hand-off to a peer (relay/delivery/handoff.py)

    def snapshot(self) -> list[QueuedMessage]:
        """Every queued message now, in arrival order (a list: the registry changes
        while a transfer walks it)."""
        return list(self.registry.messages.values())

    def queued(self, message: QueuedMessage) -> bool:
        """Still in the queue (not finished, deleted, nor moved away meanwhile)."""
        return not message.deleted and self.registry.get(message.id) is message

    def claim(self, message: QueuedMessage, accept: Callable[[Recipient], bool]) -> list[Recipient]:
        """Take the waiting recipients `accept` picks out of delivery, for a transfer to
        a peer: ACTIVE at once, with no await, so no lane, schedule or routing lookup
        sends them meanwhile (as `bounce`). A held message stays put: it is held for a
        reason (an admin, the account guard), which the peer would not know. Recipients
        in a delivery attempt now are not taken: they would go twice."""
        if message.held or message.deleted:
            return []
        taken = [
            r
            for r in message.recipients
            if r.where in _WAITING and not r.status.is_final and accept(r)
        ]
        self.stats.move(message, taken, Where.ACTIVE)
        return taken

    def unclaim(self, message: QueuedMessage, recipients: list[Recipient]) -> None:
        """Recipients claimed and not transferred go back where they wait, their next
        attempt as it was: no attempt was made here."""
        back = _claimed(recipients)
        if back:
            self._again(message, back)

    async def transferred(
        self,
        message: QueuedMessage,
        recipients: list[Recipient],
        peer: str,
        relay: str,
        reply: Reply,
    ) -> None:
        """The peer took these claimed recipients (its 250): final here. They are marked
        before the first await, so a transfer cancelled now cannot put them back in
        delivery; the record is written shielded, and `stop` waits for it."""
        taken = _claimed(recipients)
        for recipient in taken:
            recipient.status = RecipientStatus.TRANSFERRED
            recipient.last_reply = str(reply)
        self.stats.move(message, taken, Where.NOWHERE)
        providers = {r.destination.queue.provider for r in taken if r.destination}
        provider = providers.pop() if len(providers) == 1 else DEFAULT_PROVIDER
        task = spawn(
            self._handed_off(message, taken, peer, relay, reply, provider),
            self._settling,
            f"transferred {message.id}",
        )
        await asyncio.shield(task)

    async def _handed_off(
        self,
        message: QueuedMessage,
        recipients: list[Recipient],
        peer: str,
        relay: str,
        reply: Reply,
        provider: str,
    ) -> None:
        settled = await self._outcomes.transferred(
            message, recipients, peer, relay, reply, provider
        )
        self._after(message, settled)

    # reading

    def state(self, recipient: Recipient, paused: Callable[[str], bool]) -> str:
        """The SPEC §8 state of a recipient; `paused` says whether a queue is suspended."""
        where = recipient.where
        if where is Where.HELD:
            return "held"
        if where is Where.SCHEDULED:
            return "deferred"
        if where is Where.READY:
            destination = recipient.destination
            return "deferred" if destination and paused(destination.queue.key) else "ready"
        if where is Where.ROUTING:
            return "ready"
        if where is Where.ACTIVE:
            return "active"
        return recipient.status.name.lower()

    # shutdown

    async def stop(self) -> None:
        """Lookups are abandoned (the spool has the mail); outcome writes finish."""
        for task in list(self._routing):
            task.cancel()
        await asyncio.gather(*self._routing, return_exceptions=True)
        await wait_all(self._settling)
        await wait_all(self._marking)


_WAITING = (Where.ROUTING, Where.SCHEDULED, Where.READY)


def restore(recovered: Recovered) -> QueuedMessage:
    """A spooled message as the queue knows it: recipients' progress from its log."""
    message = QueuedMessage(recovered.envelope, recovered.body_offset)
    message.held = recovered.held
    message.hold_reason = recovered.hold_reason if recovered.held else ""
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


def _claimed(recipients: list[Recipient]) -> list[Recipient]:
    """Those of a transfer's claim still in hand: not settled meanwhile (a bounce, a
    deletion)."""
    return [r for r in recipients if r.where is Where.ACTIVE and not r.status.is_final]
