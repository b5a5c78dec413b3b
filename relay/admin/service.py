"""Queue operations an admin can ask for: list, show, flush, hold, release, delete, bounce,
transfer, suspend, resume. The HTTP API is a thin layer over this; so is the CLI, through
the API.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable
from typing import Any

from relay.admin.explain import limit_json
from relay.config.model import Secret
from relay.delivery.connector import PeerLogin
from relay.delivery.dispatcher import Dispatcher
from relay.delivery.handoff import Handoff, TransferBusy, TransferRequest
from relay.delivery.lane import Lane
from relay.history import History
from relay.queue.manager import QueueManager
from relay.queue.models import QueuedMessage, Recipient, Where
from relay.routing.router import DEFAULT_PROVIDER, Router
from relay.shaping.shaper import configured_limits
from relay.spool.store import Spool

log = logging.getLogger("relay.admin")

STATES = ("ready", "deferred", "held", "active")
_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")


class NotFound(LookupError):
    """No such message or provider; the message says which."""


class BadRequest(ValueError):
    """The request itself is wrong (HTTP 400); the message says how. Any other
    ValueError is a bug, answered 500 and logged."""


class Busy(RuntimeError):
    """The daemon is doing this already (HTTP 409); the message says what."""


def peer_address(text: str) -> tuple[str, int]:
    """ "host:port", "192.0.2.1:587" or "[2001:db8::1]:587" → (host, port)."""
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            host = ""
    elif ":" in host or not _HOST_NAME.match(host):
        host = ""
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadRequest(
            f"to: expected HOST:PORT like 10.0.0.6:587 or [2001:db8::6]:587, not {text!r}"
        )
    return host, int(port)


class QueueService:
    def __init__(
        self,
        queue: QueueManager,
        lanes: Dispatcher,
        router: Callable[[], Router],
        spool: Spool,
        history: History | None = None,
        handoff: Handoff | None = None,
    ) -> None:
        self._queue = queue
        self._lanes = lanes
        self._router = router  # the current one: a reload replaces it
        self._spool = spool
        self._history = history
        self._handoff = handoff

    # reading

    def _paused(self, key: str) -> bool:
        lane = self._lanes.lanes.get(key)
        return lane is not None and lane.paused

    def recipient_state(self, recipient: Recipient) -> str:
        return self._queue.state(recipient, self._paused)

    def _summary(self, message: QueuedMessage, full: bool = False) -> dict[str, Any]:
        envelope = message.envelope
        recipients = []
        for r in message.recipients:
            if r.status.is_final and not full:
                continue
            destination = r.destination
            entry: dict[str, Any] = {
                "address": r.address,
                "provider": destination.queue.provider if destination else None,
                "state": self.recipient_state(r),
                "attempts": r.attempts,
                "last_reply": r.last_reply or None,
            }
            if r.where is Where.SCHEDULED:
                entry["next_attempt"] = r.next_attempt
            if full:
                entry["queue"] = destination.queue.key if destination else None
                entry["site"] = destination.site.key if destination else None
                entry["routed_by"] = destination.reason if destination else None
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
            "hold_reason": message.hold_reason if message.held else None,  # admin, guard
            "recipients": recipients,
        }
        if full:
            summary["envid"] = envelope.envid
            summary["ret"] = envelope.ret
            summary["headers"] = self._headers(message)
        return summary

    def _headers(self, message: QueuedMessage) -> str:
        try:
            data = self._spool.read_message(message.id, message.body_offset, 16384)
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
                if provider and (r.destination is None or r.destination.queue.provider != provider):
                    continue
                if state and self.recipient_state(r) != state:
                    continue
                return True
            return False

        registry = self._queue.registry
        found, cursor = registry.page(after, max(1, min(limit, 1000)), accept)
        return {
            "messages": [self._summary(m) for m in found],
            "next": cursor,
            "total": len(registry),
        }

    def message(self, message_id: str) -> QueuedMessage:
        message = self._queue.registry.get(message_id)
        if message is None:
            raise NotFound(f"no message with ID {message_id} in the queue")
        return message

    def show(self, message_id: str) -> dict[str, Any]:
        """One queued message in full, with its timeline so far (oldest first)."""
        shown = self._summary(self.message(message_id), full=True)
        shown["timeline"] = self._history.timeline(message_id) if self._history else []
        return shown

    async def finished(self, message_id: str) -> dict[str, Any]:
        """A finished message from history, with its whole timeline."""
        found = await self._history.get(message_id) if self._history else None
        if found is None:
            raise NotFound(
                f"no finished message with ID {message_id} in history (history.retain; "
                "`relay queue show` has queued ones)"
            )
        return found

    async def history(
        self,
        to: str | None = None,
        sender: str | None = None,
        within: float | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Finished messages to or from an address, finished in the last `within`
        seconds (None: all history keeps), newest first."""
        if to is None and sender is None:
            raise BadRequest("say which messages: an ID, to=ADDRESS or from=ADDRESS")
        if self._history is None:
            return []
        return await self._history.find(to=to, sender=sender, within=within, limit=limit)

    def providers(self) -> list[dict[str, Any]]:
        rows = []
        for lane in sorted(self._lanes.lanes.values(), key=lambda x: x.key):
            rows.append(
                {
                    "queue": lane.key,
                    "provider": lane.queue.provider,
                    "egress": lane.queue.egress,
                    "suspended": lane.suspended,
                    "paused": lane.paused,
                    "pending_batches": lane.ready.pending,
                    "sites": len(lane.ready.sites()),
                    "connections": lane.connections,
                    "max_connections": lane.shaper.max_connections(),
                }
            )
        return rows

    def provider(self, name: str) -> dict[str, Any]:
        """Every limit in force on a provider's queues (one per egress source), and why
        (`relay provider show`)."""
        router = self._router()
        keys = router.queues_of(name) if name in router.providers() else [name]
        queues = []
        for key in keys:
            lane = self._lanes.lanes.get(key)
            queue = lane.queue if lane is not None else router.queue(key)
            if queue is None:
                continue
            limits = lane.limits() if lane is not None else configured_limits(queue.shaping)
            adaptive = lane.shaper.adaptive if lane is not None else None
            queues.append(
                {
                    "queue": key,
                    "provider": queue.provider,
                    "egress": queue.egress,
                    "suspended": lane.suspended if lane is not None else None,
                    "suspended_until": lane.suspended_until if lane is not None else None,
                    "connections": lane.connections if lane is not None else 0,
                    "adaptive": queue.shaping.adaptive,
                    "clean_transactions": adaptive.clean if adaptive and adaptive.narrowed else 0,
                    "limits": [limit_json(limit) for limit in limits],
                }
            )
        if not queues:
            raise self._unknown(name)
        return {"provider": name, "queues": queues}

    def _unknown(self, name: str) -> NotFound:
        providers = ", ".join(sorted(self._router().providers()))
        return NotFound(
            f"no provider {name!r} (providers: {providers}; with egress sources also "
            "<provider>@<source>; a default:<site> queue exists only while it holds mail)"
        )

    # acting

    def flush(self, provider: str | None = None, message_id: str | None = None) -> int:
        """Deferred mail due now, and sites backing off are tried again (rule
        suspensions stay: lift them with resume)."""
        if message_id is not None:
            self.message(message_id)
        count = self._queue.flush(
            lambda m, r: (
                (message_id is None or m.id == message_id)
                and (
                    provider is None
                    or (r.destination is not None and r.destination.queue.provider == provider)
                )
            ),
            sites=message_id is None,
        )
        log.info(
            "flush provider=%s id=%s: %d recipients due now",
            provider or "*",
            message_id or "*",
            count,
        )
        return count

    async def hold(self, message_id: str) -> None:
        await self._queue.hold(self.message(message_id))

    async def release(self, message_id: str) -> None:
        await self._queue.release(self.message(message_id))

    async def delete(self, message_id: str) -> None:
        await self._queue.delete(self.message(message_id))

    async def bounce(self, message_id: str) -> int:
        """Return every waiting recipient to the sender with a DSN."""
        return await self._queue.bounce(self.message(message_id))

    async def transfer(
        self,
        to: str,
        provider: str | None = None,
        user: str | None = None,
        password: str | None = None,
    ) -> dict[str, Any]:
        """Move queued mail to a peer relay (SPEC §9) and say how it went; the call lasts
        as long as the transfer."""
        host, port = peer_address(to)
        if provider is not None:
            router = self._router()
            known = set(router.providers()) | {DEFAULT_PROVIDER}
            if provider not in known:
                raise BadRequest(
                    f"provider: no provider {provider!r} (providers: {', '.join(sorted(known))})"
                )
        if (user is None) != (password is None):
            raise BadRequest("user and password: give both, or neither")
        login = None
        if user is not None and password is not None:
            if any(c in user + password for c in "\r\n\0"):
                raise BadRequest("user and password must not contain CR, LF or NUL")
            login = PeerLogin(user, Secret(password))
        if self._handoff is None:
            raise BadRequest("this daemon cannot transfer mail")
        try:
            report = await self._handoff.transfer(TransferRequest(host, port, provider, login))
        except TransferBusy as exc:
            raise Busy(str(exc)) from None
        return report.as_dict()

    def _lanes_for(self, name: str) -> list[Lane]:
        """A queue by its key, or every queue of a configured provider (one per egress
        source when sources are named); a default site's only while it exists: an admin
        call never invents a queue the config does not name."""
        lane = self._lanes.lanes.get(name)
        if lane is not None:
            return [lane]
        router = self._router()
        keys = router.queues_of(name) if name in router.providers() else [name]
        found = []
        for key in keys:
            lane = self._lanes.lanes.get(key)
            if lane is None:
                queue = router.queue(key)
                if queue is None or queue.provider == DEFAULT_PROVIDER:
                    continue
                lane = self._lanes.lane(self._queue.ready_queue(queue))
            found.append(lane)
        if not found:
            raise self._unknown(name)
        return found

    def suspend(self, name: str, seconds: float) -> None:
        if seconds <= 0:
            raise BadRequest("the suspension must last more than 0s")
        for lane in self._lanes_for(name):
            lane.suspend(seconds, "suspended by the administrator")

    def resume(self, name: str) -> None:
        for lane in self._lanes_for(name):
            lane.resume()
