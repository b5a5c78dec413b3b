"""Hand-off: queued mail moved to a peer relay over SMTP (`relay queue transfer`, SPEC §9).

For each queued message, in arrival order, a few sessions to the peer at once:

    claim: its waiting recipients (of one provider, with --provider) leave delivery here
      → one transaction per 100 of them, with the message as stored (our Received: and
        DKIM-Signature: stay) and its envelope: sender, NOTIFY, ORCPT, RET, ENVID
      → the peer's 250: those recipients are `transferred`, durably; the file goes when
        every recipient is final, as after a delivery
      → anything else (a refusal, a session that breaks): they go back where they waited,
        their next attempt as it was, and are delivered from here as before.

A crash between the peer's 250 and our record sends the message twice (once by each
node): at least once, as SPEC §6 allows for a delivery in flight; never lost.
Held messages and recipients in a delivery attempt now stay here (the report says so).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from relay.delivery.client import Connection
from relay.delivery.connector import Connector, PeerLogin
from relay.delivery.context import LoadMessage
from relay.errors import DeliveryError, RelayError, SpoolError, TransientDeliveryError
from relay.queue.models import QueuedMessage, Recipient
from relay.reply import Reply
from relay.tasks import spawn

log = logging.getLogger("relay.transfer")

CHUNK = 100  # recipients per transaction: the least a server must take (RFC 5321 §4.5.3.1.8)
SESSIONS = 4  # sessions to the peer at once: its group commit makes their fsyncs one
MAX_BROKEN = 3  # sessions in a row that broke without moving a message: the peer is gone
PROGRESS_EVERY = 500  # messages between two progress lines in the log


class HandoffQueue(Protocol):
    """What a transfer may ask of the queue manager."""

    def snapshot(self) -> list[QueuedMessage]: ...

    def queued(self, message: QueuedMessage) -> bool: ...

    def claim(
        self, message: QueuedMessage, accept: Callable[[Recipient], bool]
    ) -> list[Recipient]: ...

    def unclaim(self, message: QueuedMessage, recipients: list[Recipient]) -> None: ...

    async def transferred(
        self,
        message: QueuedMessage,
        recipients: list[Recipient],
        peer: str,
        relay: str,
        reply: Reply,
    ) -> None: ...


class TransferBusy(RelayError):
    """A transfer is running already: two would claim each other's messages."""


@dataclass(frozen=True)
class TransferRequest:
    host: str
    port: int
    provider: str | None = None  # only recipients queued for this provider
    login: PeerLogin | None = None

    @property
    def peer(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def in_scope(self, recipient: Recipient) -> bool:
        if recipient.status.is_final:
            return False
        if self.provider is None:
            return True
        destination = recipient.destination
        return destination is not None and destination.queue.provider == self.provider


@dataclass
class TransferReport:
    """Counted in messages (those with a recipient in scope), and recipients moved."""

    peer: str
    provider: str | None
    transferred: int = 0  # messages whose every recipient in scope went to the peer
    recipients: int = 0  # recipients the peer took
    failed: int = 0  # messages the peer refused, in whole or in part: still here
    left: int = 0  # messages not tried, or in part only (held, busy, transfer stopped)
    reasons: Counter[str] = field(default_factory=Counter)  # why failed or left
    stopped: str | None = None  # why the transfer ended before the last message

    def count(self, outcome: str, reason: str | None = None) -> None:
        setattr(self, outcome, getattr(self, outcome) + 1)
        if reason is not None:
            self.reasons[reason] += 1

    @property
    def done(self) -> int:
        return self.transferred + self.failed + self.left

    def as_dict(self) -> dict[str, Any]:
        return {
            "to": self.peer,
            "provider": self.provider,
            "transferred": self.transferred,
            "recipients": self.recipients,
            "failed": self.failed,
            "left": self.left,
            "reasons": dict(self.reasons.most_common()),
            "stopped": self.stopped,
        }


class Handoff:
    """Runs one transfer at a time; the admin API waits for its report."""

    def __init__(self, queue: HandoffQueue, connector: Connector, load: LoadMessage) -> None:
        self._queue = queue
        self._connector = connector
        self._load = load
        self._tasks: set[asyncio.Task[Any]] = set()

    async def transfer(self, request: TransferRequest) -> TransferReport:
        if self._tasks:
            raise TransferBusy("a transfer is running already; wait for its end")
        task = spawn(self._run(request), self._tasks, f"transfer to {request.peer}")
        # The transfer is the daemon's, not the HTTP request's: a client that goes away
        # does not stop it midway; shutdown does (stop).
        return await asyncio.shield(task)

    async def stop(self) -> None:
        """Shutdown: the message in hand goes back to the queue; the peer's 250s already
        read are recorded (shielded in the queue manager)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, request: TransferRequest) -> TransferReport:
        report = TransferReport(request.peer, request.provider)
        scope = " for provider " + request.provider if request.provider else ""
        log.info("transfer to %s%s started by the administrator", request.peer, scope)
        pending = iter(self._queue.snapshot())
        ended: list[str | None] = ["an internal error (the daemon's log has it)"]
        try:
            ended = await asyncio.gather(
                *(self._worker(request, pending, report) for _ in range(SESSIONS))
            )
        except asyncio.CancelledError:
            ended = ["the daemon is shutting down"]
            raise
        finally:
            # Not tried: the peer could not be reached any more, or the daemon stops.
            why = next((reason for reason in ended if reason), "")
            for message in pending:
                if self._in_scope(message, request):
                    report.stopped = why
                    report.count("left", why)
            log.info(
                "transfer to %s%s finished: %d messages (%d recipients) transferred, "
                "%d refused, %d left here%s",
                request.peer,
                scope,
                report.transferred,
                report.recipients,
                report.failed,
                report.left,
                f"; stopped: {report.stopped}" if report.stopped else "",
            )
        return report

    def _in_scope(self, message: QueuedMessage, request: TransferRequest) -> bool:
        return self._queue.queued(message) and any(request.in_scope(r) for r in message.recipients)

    async def _worker(
        self, request: TransferRequest, pending: Iterator[QueuedMessage], report: TransferReport
    ) -> str | None:
        """One session's share; why it ended early (None: nothing was left to move)."""
        connection: Connection | None = None
        broken = 0
        try:
            while True:
                if connection is not None and not connection.usable:
                    await connection.close()
                    connection = None
                    broken += 1
                if connection is None:
                    if broken >= MAX_BROKEN:
                        return f"{broken} sessions with {request.peer} in a row broke"
                    try:
                        connection = await self._connector.peer(
                            request.host, request.port, request.login
                        )
                    except DeliveryError as exc:
                        log.warning("transfer to %s: %s", request.peer, exc.reply)
                        return str(exc.reply)
                message = next(pending, None)
                if message is None:
                    return None
                if not self._in_scope(message, request):
                    continue  # finished meanwhile, or nothing for this provider
                if await self._move(connection, message, request, report):
                    broken = 0
                if report.done % PROGRESS_EVERY == 0:
                    log.info(
                        "transfer to %s: %d messages done, %d transferred",
                        request.peer,
                        report.done,
                        report.transferred,
                    )
        finally:
            if connection is not None:
                await asyncio.shield(connection.close())

    async def _move(
        self,
        connection: Connection,
        message: QueuedMessage,
        request: TransferRequest,
        report: TransferReport,
    ) -> bool:
        """One message to the peer; whether any of it got there."""
        in_scope = sum(1 for r in message.recipients if request.in_scope(r))
        claimed = self._queue.claim(message, request.in_scope)
        if not claimed:
            report.count("left", "held" if message.held else "in a delivery attempt now")
            return False
        moved = 0
        refusal: str | None = None
        try:
            refusal = _unfit(message, claimed, connection)
            if refusal is None:
                body = await self._load(message)
                for start in range(0, len(claimed), CHUNK):
                    chunk = claimed[start : start + CHUNK]
                    replies = await connection.send(message.envelope, chunk, body)
                    taken = [r for r in chunk if _took(replies.get(r.index))]
                    if taken:
                        reply = replies[taken[0].index]
                        relay = connection.description
                        await self._queue.transferred(message, taken, request.peer, relay, reply)
                        moved += len(taken)
                    refused = [replies.get(r.index) for r in chunk if r not in taken]
                    if refused:
                        refusal = str(refused[0] or "no reply")
                        break  # the rest would meet the same answer; they stay here
        except TransientDeliveryError as exc:  # the session broke midway
            refusal = str(exc.reply)
        except SpoolError as exc:
            refusal = f"cannot read it from the spool: {exc}"
        except asyncio.CancelledError:
            report.recipients += moved
            report.count("left", "the daemon is shutting down")
            raise
        finally:
            self._queue.unclaim(message, claimed)
        report.recipients += moved
        if refusal is not None:
            log.warning("id=%s not transferred to %s: %s", message.id, request.peer, refusal)
            report.count("failed", refusal)
        elif moved < in_scope:
            report.count("left", "in a delivery attempt now")
        else:
            report.count("transferred")
        return moved > 0


def _took(reply: Reply | None) -> bool:
    return reply is not None and reply.is_success


def _unfit(
    message: QueuedMessage, recipients: list[Recipient], connection: Connection
) -> str | None:
    """Why this peer cannot take the message as it is (checked before MAIL)."""
    envelope = message.envelope
    wants_dsn = bool(envelope.ret or envelope.envid) or any(
        r.spec.notify or r.spec.orcpt for r in recipients
    )
    if wants_dsn and not connection.dsn:
        # The envelope moves whole or not at all: without DSN (RFC 3461) on the peer,
        # the sender's NOTIFY, ORCPT, RET and ENVID would be silently dropped.
        return f"{connection.description} does not offer DSN: its DSN parameters would be lost"
    return None
