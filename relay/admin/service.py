"""Queue operations an admin can ask for: list, show, flush, hold, release, delete, bounce,
suspend, resume. The HTTP API is a thin layer over this; so is the CLI, through the API.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from relay.delivery.outcomes import Attempt
from relay.reply import Reply, Verdict
from relay.routing.models import Batch, QueuedMessage, Recipient, Where

if TYPE_CHECKING:
    from relay.app import Relay
    from relay.delivery.lane import Lane

log = logging.getLogger("relay.admin")

STATES = ("ready", "deferred", "held", "active")


class NotFound(LookupError):
    """No such message or provider; the message says which."""


class BadRequest(ValueError):
    """The request itself is wrong (HTTP 400); the message says how. Any other
    ValueError is a bug, answered 500 and logged."""


class QueueService:
    def __init__(self, relay: Relay) -> None:
        self._relay = relay

    # reading

    def recipient_state(self, recipient: Recipient) -> str:
        where = recipient.where
        if where is Where.HELD:
            return "held"
        if where is Where.SCHEDULED:
            return "deferred"
        if where is Where.LANE:
            lane = self._lane_of(recipient)
            return "deferred" if lane is not None and lane.paused else "ready"
        if where is Where.FLIGHT:
            return "active"
        return recipient.status.name.lower() if recipient.status.is_final else "routing"

    def _lane_of(self, recipient: Recipient) -> Lane | None:
        if recipient.destination is None:
            return None
        return self._relay.dispatcher.lanes.get(recipient.destination.lane_key)

    def _summary(self, message: QueuedMessage, full: bool = False) -> dict[str, Any]:
        envelope = message.envelope
        recipients = []
        for r in message.recipients:
            if r.status.is_final and not full:
                continue
            entry: dict[str, Any] = {
                "address": r.address,
                "provider": r.destination.provider if r.destination else None,
                "state": self.recipient_state(r),
                "attempts": r.attempts,
                "last_reply": r.last_reply or None,
            }
            if r.where is Where.SCHEDULED:
                entry["next_attempt"] = r.next_attempt
            if full:
                entry["queue"] = r.destination.lane_key if r.destination else None
                entry["notify"] = r.spec.notify
                entry["orcpt"] = r.spec.orcpt
            recipients.append(entry)
        summary: dict[str, Any] = {
            "id": message.id,
            "sender": envelope.sender,
            "size": envelope.size,
            "arrival": envelope.received_at,
            "class": envelope.class_name,
            "account": envelope.account,
            "held": message.held,
            "recipients": recipients,
        }
        if full:
            summary["envid"] = envelope.envid
            summary["ret"] = envelope.ret
            summary["headers"] = self._headers(message)
        return summary

    def _headers(self, message: QueuedMessage) -> str:
        try:
            data = self._relay.spool.read_message(message.id, message.body_offset, 16384)
        except OSError:
            return ""
        end = data.find(b"\r\n\r\n")
        return data[: end if end >= 0 else len(data)].decode("utf-8", "replace")

    def list_messages(
        self,
        provider: str | None = None,
        class_name: str | None = None,
        state: str | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> dict[str, Any]:
        if state is not None and state not in STATES:
            raise BadRequest(f"state must be one of {', '.join(STATES)}")

        def accept(message: QueuedMessage) -> bool:
            if class_name and message.envelope.class_name != class_name:
                return False
            for r in message.recipients:
                if r.status.is_final:
                    continue
                if provider and (r.destination is None or r.destination.provider != provider):
                    continue
                if state and self.recipient_state(r) != state:
                    continue
                return True
            return False

        registry = self._relay.registry
        found, cursor = registry.page(after, max(1, min(limit, 1000)), accept)
        return {
            "messages": [self._summary(m) for m in found],
            "next": cursor,
            "total": len(registry),
        }

    def message(self, message_id: str) -> QueuedMessage:
        message = self._relay.registry.get(message_id)
        if message is None:
            raise NotFound(f"no message with ID {message_id} in the queue")
        return message

    def show(self, message_id: str) -> dict[str, Any]:
        return self._summary(self.message(message_id), full=True)

    def providers(self) -> list[dict[str, Any]]:
        rows = []
        for lane in sorted(self._relay.dispatcher.lanes.values(), key=lambda x: x.key):
            rows.append(
                {
                    "queue": lane.key,
                    "provider": lane.destination.provider,
                    "suspended": lane.suspended,
                    "paused": lane.paused,
                    "pending_batches": lane.pending,
                    "max_connections": lane.shaper.max_connections(),
                }
            )
        return rows

    # acting

    def flush(self, provider: str | None = None, message_id: str | None = None) -> int:
        """Deferred mail due now; lanes backing off an unreachable destination retry too
        (rule suspensions stay: lift them with resume)."""
        if message_id is not None:
            self.message(message_id)
        count = self._relay.scheduler.flush(
            lambda m, r: (
                (message_id is None or m.id == message_id)
                and (
                    provider is None
                    or (r.destination is not None and r.destination.provider == provider)
                )
            )
        )
        if message_id is None:
            for lane in list(self._relay.dispatcher.lanes.values()):
                if (
                    (provider is None or lane.destination.provider == provider)
                    and lane.paused
                    and lane.suspended is None
                ):
                    lane.resume()
        log.info(
            "flush provider=%s id=%s: %d recipients due now",
            provider or "*",
            message_id or "*",
            count,
        )
        return count

    async def hold(self, message_id: str) -> None:
        message = self.message(message_id)
        if message.held:
            return
        message.held = True
        await self._relay.spool.set_held(message_id, True)
        waiting = [r for r in message.recipients if r.where in (Where.SCHEDULED, Where.LANE)]
        self._relay.stats.move(message, waiting, Where.HELD)
        log.info("id=%s held by the administrator", message_id)

    async def release(self, message_id: str) -> None:
        message = self.message(message_id)
        if not message.held:
            return
        message.held = False
        await self._relay.spool.set_held(message_id, False)
        held = [r for r in message.recipients if r.where is Where.HELD]
        for recipient in held:
            recipient.next_attempt = 0.0
        self._relay.scheduler.defer(message, held)
        log.info("id=%s released by the administrator", message_id)

    async def delete(self, message_id: str) -> None:
        """Gone without a DSN (postsuper -d); an attempt in flight is not recorded."""
        message = self.message(message_id)
        message.deleted = True
        self._relay.stats.move(
            message, [r for r in message.recipients if r.where is not Where.FLIGHT], Where.NOWHERE
        )
        await self._relay.spool.remove(message_id)
        self._relay.registry.remove(message_id)
        log.info("id=%s deleted by the administrator", message_id)

    async def bounce(self, message_id: str) -> int:
        """Return every waiting recipient to the sender with a DSN."""
        message = self.message(message_id)
        reply = Reply.local(550, "5.0.0", "message returned to sender by the administrator")
        waiting = [
            r for r in message.recipients if not r.status.is_final and r.where is not Where.FLIGHT
        ]
        by_provider: dict[str, list[Recipient]] = defaultdict(list)
        for r in waiting:
            by_provider[r.destination.provider if r.destination else "default"].append(r)
        for provider, recipients in by_provider.items():
            self._relay.stats.move(message, recipients, Where.FLIGHT)
            batch = Batch(message, recipients, recipients[0].domain, "admin")
            await self._relay.outcomes.settle(
                batch, [Attempt(r, reply, Verdict.BOUNCED) for r in recipients], None, provider
            )
        log.info("id=%s bounced by the administrator (%d recipients)", message_id, len(waiting))
        return len(waiting)

    def _lane_for(self, name: str) -> Lane:
        relay = self._relay
        destination = relay.router.destination_for_key(name)
        if destination is None:
            known = ", ".join(p.name for p in relay.config.providers)
            raise NotFound(f"no provider {name!r} (providers: {known}; or default:<domain>)")
        return relay.dispatcher.lane(destination)

    def suspend(self, name: str, seconds: float) -> None:
        if seconds <= 0:
            raise BadRequest("the suspension must last more than 0s")
        self._lane_for(name).suspend(seconds, "suspended by the administrator")

    def resume(self, name: str) -> None:
        self._lane_for(name).resume()
