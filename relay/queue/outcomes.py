"""After an attempt: record each recipient's fate, durably, then act on it.

The order matters for durability: a DSN is stored before the failure that causes it
is recorded, and a message file is removed only when every recipient is final. A
crash between two steps repeats a step (a DSN, a delivery), never skips one.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

from relay.bounces.dsn import Failure, build_dsn
from relay.clock import Clock
from relay.config.model import Config
from relay.errors import SpoolError
from relay.history import events
from relay.history.events import NO_RECORDER, Recorder
from relay.metrics import Metrics
from relay.queue.models import NO_WATCH, AccountWatch, Attempt, QueuedMessage, Recipient, Where
from relay.queue.stats import QueueStats
from relay.reply import Reply, Verdict
from relay.routing.retry import backoff, expired
from relay.spool.records import Envelope, EnvelopeRecipient, RecipientStatus, StateRecord
from relay.spool.store import Spool

log = logging.getLogger("relay.delivery")


@dataclass(slots=True)
class Settled:
    """What the manager still has to do after an attempt was recorded."""

    deferred: list[Recipient] = field(default_factory=list)  # to schedule again
    notices: list[QueuedMessage] = field(default_factory=list)  # DSNs stored, to queue
    removed: bool = False  # every recipient final: the message file is gone


_STATUS = {
    Verdict.DELIVERED: RecipientStatus.DELIVERED,
    Verdict.BOUNCED: RecipientStatus.BOUNCED,
    Verdict.DEFERRED: RecipientStatus.DEFERRED,
}


def _notify(spec: EnvelopeRecipient, event: str) -> bool:
    """RFC 3461 §4.1: without NOTIFY, failures and delays are reported (as Postfix does);
    NEVER means nothing is. Success is reported only when asked for."""
    if spec.notify is None:
        return event != "SUCCESS"
    return event in spec.notify.upper().split(",")


def _relayed(attempt: Attempt, envelope: Envelope) -> bool:
    """RFC 3461 §5.2.2: a recipient who asked for NOTIFY=SUCCESS (§4.1), delivered to a
    next hop that cannot pass the request on (no DSN extension), gets a `relayed` DSN
    from us, since no later hop will send one."""
    hop = attempt.hop
    return (
        hop is not None
        and not hop.dsn
        and bool(envelope.sender)
        and _notify(attempt.recipient.spec, "SUCCESS")
    )


class Outcomes:
    def __init__(
        self,
        config: Config,
        spool: Spool,
        stats: QueueStats,
        metrics: Metrics,
        clock: Clock,
        recorder: Recorder = NO_RECORDER,
        accounts: AccountWatch = NO_WATCH,
    ) -> None:
        self.config = config  # replaced on reload
        self._spool = spool
        self._stats = stats
        self._metrics = metrics
        self._clock = clock
        self._events = recorder  # each message's timeline (relay/history)
        self._accounts = accounts  # the account guard counts delivered and rejected

    async def settle(
        self,
        message: QueuedMessage,
        attempts: list[Attempt],
        relay: str | None,
        provider: str,
        started: float | None = None,
    ) -> Settled:
        """Record one attempt's results; the caller shields this from cancellation.
        `started`: when the attempt began, for its duration in the timeline."""
        envelope = message.envelope
        done = Settled()
        if message.deleted:  # an admin deleted it while this attempt was in flight
            self._stats.move(message, [a.recipient for a in attempts], Where.NOWHERE)
            return done
        now = self._clock.time()
        retry = self.config.retry
        class_name = envelope.class_name
        failures: list[Failure] = []
        delays: list[Failure] = []
        relayed: list[Failure] = []
        live = [a for a in attempts if not a.recipient.status.is_final]
        for attempt in attempts:
            recipient, reply = attempt.recipient, attempt.reply
            if recipient.status.is_final:
                continue  # an admin bounced it meanwhile: that outcome stands
            recipient.attempts += 1
            verdict = attempt.verdict
            status = _STATUS[verdict]
            if verdict is Verdict.DEFERRED and expired(retry, envelope.received_at, now):
                status = RecipientStatus.EXPIRED
                reply = Reply.local(
                    reply.code if reply.is_permanent else 550,
                    "5.4.7" if not reply.is_permanent else reply.status,
                    f"delivery time expired (last reply: {reply})",
                )
            recipient.status = status
            recipient.last_reply = str(reply)
            # Remote-MTA only when a remote server gave this reply (not for our own expiry).
            remote = None
            if relay and status is not RecipientStatus.EXPIRED:
                remote = relay.partition("[")[0]
            if status is RecipientStatus.DEFERRED:
                recipient.next_attempt = now + backoff(retry, recipient.attempts)
                done.deferred.append(recipient)
                if (
                    retry.warn_after is not None
                    and not recipient.warned
                    and now - envelope.received_at >= retry.warn_after
                    and envelope.sender
                    and _notify(recipient.spec, "DELAY")
                ):
                    recipient.warned = True
                    delays.append(Failure(recipient.spec, reply, remote, action="delayed"))
            elif status in (RecipientStatus.BOUNCED, RecipientStatus.EXPIRED):
                if envelope.sender and _notify(recipient.spec, "FAILURE"):
                    failures.append(Failure(recipient.spec, reply, remote))
            elif status is RecipientStatus.DELIVERED and _relayed(attempt, envelope):
                relayed.append(Failure(recipient.spec, reply, remote, action="relayed"))
            # The guard's bounce ratio: the receiving servers' verdicts only, not a
            # bounce relay made itself (an admin's, a dead domain).
            if status is RecipientStatus.DELIVERED or (
                status is RecipientStatus.BOUNCED and attempt.reply.remote
            ):
                self._accounts.finished(
                    envelope.account, envelope.received_at, status is RecipientStatus.BOUNCED
                )
            outcome = {RecipientStatus.EXPIRED: "expired"}.get(status, verdict.value)
            destination = recipient.destination
            egress = destination.site.source if destination is not None else "default"
            self._metrics.deliveries.labels(provider, class_name, outcome, egress).inc()
            if status.is_final:
                self._metrics.delay.labels(provider, class_name).observe(now - envelope.received_at)
                self._stats.move(message, [recipient], Where.NOWHERE)
            hop = attempt.hop
            log.info(
                "id=%s to=<%s> provider=%s relay=%s%s%s delay=%.1f attempt=%d dsn=%s "
                "status=%s (%s)",
                envelope.id,
                recipient.address,
                provider,
                relay or "none",
                f" egress={egress}" if self.config.egress_named else "",
                f" tls={hop.tls or 'none'} policy={hop.policy}" if hop is not None else "",
                now - envelope.received_at,
                recipient.attempts,
                reply.status,
                outcome,
                reply,
                # The same facts as JSON keys (`--log-format json`) for `relay replay` and
                # log pipelines. `reply` is the one classified: for an expired recipient,
                # the server's last reply, not the expiry text of the message.
                extra={
                    "event": "delivery",
                    "id": envelope.id,
                    "to": recipient.address,
                    "provider": provider,
                    "relay": relay,
                    "attempt": recipient.attempts,
                    "status": outcome,
                    "verdict": verdict.value,
                    "reply": str(attempt.reply),
                    "remote": attempt.reply.remote,
                },
            )

        self._events.record(
            envelope.id, *events.attempts(now, live, relay, started, self.config.rules)
        )
        for notices in (failures, delays, relayed):
            if not notices:
                continue
            try:
                done.notices.append(await self._notice(message, notices, now))
            except SpoolError as exc:
                # No DSN without a place to store it: keep those recipients and try again,
                # rather than fail them silently.
                log.error(
                    "id=%s cannot store a DSN (%s): its recipients stay queued", envelope.id, exc
                )
                if notices is failures:
                    done.deferred += self._keep(message, failures, now)
        # Outcomes stay true in memory if not saved; after a crash they would be repeated.
        await self._persist(message, _records(attempts), now, done, "progress not saved")
        return done

    async def transferred(
        self,
        message: QueuedMessage,
        recipients: list[Recipient],
        peer: str,
        relay: str,
        reply: Reply,
        provider: str,
    ) -> Settled:
        """Record recipients a peer relay took (`relay queue transfer`): they are
        TRANSFERRED already (the manager marked them); this logs them and makes it
        durable. Not a delivery: no DSN, no delivery metric, no attempt counted: the
        peer delivers, and reports, from here on."""
        done = Settled()
        envelope = message.envelope
        if message.deleted:  # an admin deleted it while the peer was taking it
            return done
        now = self._clock.time()
        for recipient in recipients:
            log.info(
                "id=%s to=<%s> provider=%s relay=%s delay=%.1f status=transferred "
                "(transferred to %s: %s)",
                envelope.id,
                recipient.address,
                provider,
                relay,
                now - envelope.received_at,
                peer,
                reply,
                extra={
                    "event": "transfer",
                    "id": envelope.id,
                    "to": recipient.address,
                    "provider": provider,
                    "relay": relay,
                    "peer": peer,
                    "status": "transferred",
                    "reply": str(reply),
                },
            )
        addresses = [r.address for r in recipients]
        self._events.record(
            envelope.id, events.transferred(now, peer, relay, str(reply), addresses)
        )
        # True in memory if not saved: nothing here sends them again. After a crash they
        # would be delivered from here too (at least once).
        await self._persist(message, _records(recipients), now, done, "transfer not saved")
        return done

    async def _persist(
        self,
        message: QueuedMessage,
        records: list[StateRecord],
        now: float,
        done: Settled,
        unsaved: str,
    ) -> None:
        """A finished message leaves the spool for history; another has its progress
        appended (`unsaved` is logged when that fails)."""
        if message.done:
            await self._spool.remove(message.id)
            done.removed = True
            self._events.finish(message, now)
            return
        try:
            await self._spool.record(message.id, records)
        except SpoolError as exc:
            log.error("id=%s %s: %s", message.id, unsaved, exc)

    def _keep(self, message: QueuedMessage, failures: list[Failure], now: float) -> list[Recipient]:
        """Undo the failure of recipients whose DSN could not be stored."""
        addresses = {f.recipient.address for f in failures}
        kept = []
        failed = (RecipientStatus.BOUNCED, RecipientStatus.EXPIRED)
        for recipient in message.recipients:
            if recipient.status in failed and recipient.spec.address in addresses:
                recipient.status = RecipientStatus.DEFERRED
                recipient.next_attempt = now + self.config.retry.initial
                kept.append(recipient)
        return kept

    async def _notice(
        self, message: QueuedMessage, failures: list[Failure], now: float
    ) -> QueuedMessage:
        """Store a DSN durably, before the failure it reports is recorded."""
        envelope = message.envelope
        original = await self._spool.load_message(envelope.id, message.body_offset, envelope.size)
        dsn = build_dsn(self.config.hostname, envelope, failures, original, now)
        dsn_envelope = Envelope(
            id=self._spool.new_id(),
            sender="",
            recipients=(EnvelopeRecipient(envelope.sender),),
            received_at=now,
            size=len(dsn),
            class_name="transactional",
            account="MAILER-DAEMON",
            smtputf8=envelope.smtputf8,
        )
        offset = await self._spool.store(dsn_envelope, dsn)
        kind = {"delayed": "delay", "relayed": "success"}.get(failures[0].action, "non-delivery")
        log.info("id=%s sender %s notification: %s", envelope.id, kind, dsn_envelope.id)
        notified = [f.recipient.address for f in failures]
        self._events.record(envelope.id, events.notice(now, kind, dsn_envelope.id, notified))
        self._events.record(dsn_envelope.id, events.created(now, dsn_envelope, envelope.id, kind))
        return QueuedMessage(dsn_envelope, offset)


def _records(done: list[Attempt] | list[Recipient]) -> list[StateRecord]:
    groups: dict[tuple[RecipientStatus, int, float, str, bool], list[int]] = defaultdict(list)
    for item in done:
        r = item.recipient if isinstance(item, Attempt) else item
        groups[(r.status, r.attempts, r.next_attempt, r.last_reply, r.warned)].append(r.index)
    return [StateRecord(tuple(indices), *key) for key, indices in groups.items()]
