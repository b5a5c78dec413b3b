"""Admission control (SPEC §12): a class's backlog per provider (or site) has a cap.

`classes.<name>.max_queued` caps the recipients of that class queued for one provider,
or, for domains without a provider, one site. Counted: recipients in any place but
final (routing again, ready, active, deferred, held: `QueueStats.backlog`), plus the
reservations of RCPTs already answered 250 in transactions still open. Past the cap a
new RCPT gets `452 4.3.1 <provider> backlog full, try again later`: the client keeps the
mail and tries later, when deliveries have drained the backlog.

The listener process asks here, for RCPTs of a capped class only, and waits for the
answer. The count is exact under any number of concurrent sessions: this process is
one event loop, and between reading the count and taking the slot nothing awaits. A
slot is reserved per admitted RCPT and goes when its transaction ends: handed to the
message once it is queued (`queued`, then `accepted`, so its recipients are counted
before their reservations go), or released (RSET, QUIT, a lost connection, a refused
DATA, a lost listener process).

Best-effort only where routing needs DNS that does not answer (a domain routed by MX):
its backlog is not known, so the RCPT is admitted without a reservation.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Hashable
from typing import NamedTuple

from relay.config.model import Config
from relay.metrics import Metrics
from relay.queue.stats import QueueStats
from relay.routing.router import DEFAULT_PROVIDER, Router

log = logging.getLogger("relay.queue")

_Key = tuple[str, str]  # (Destination.backlog_key, class)
_Id = tuple[int, Hashable]  # (epoch, the listener process's id)


class Refused(NamedTuple):
    """An RCPT turned away: the reply, and the provider label of its count."""

    reply: str
    provider: str


class Admission:
    def __init__(self, config: Config, router: Router, stats: QueueStats, metrics: Metrics) -> None:
        self._config = config
        self._router = router
        self._stats = stats
        self._metrics = metrics
        self.reserved: Counter[_Key] = Counter()
        self._tickets: dict[_Id, dict[_Id, _Key]] = {}  # transaction → its reservations
        self._inflight: dict[_Id, _Id] = {}  # request being decided → its transaction
        self._pending: dict[str, list[_Key]] = {}  # message ID → reservations it takes over
        # Ids are the listener process's own; a new process starts them again, so each
        # process gets an epoch, and a decision still running for a lost one is void.
        self._epoch = 0
        self._zero_series()

    def reconfigure(self, config: Config, router: Router) -> None:
        self._config = config
        self._router = router
        self._zero_series()

    def _zero_series(self) -> None:
        """Every capped class's series from the start, at 0, so alerts see it exists."""
        providers = [*self._router.providers(), DEFAULT_PROVIDER]
        for traffic in self._config.classes.values():
            if traffic.max_queued is not None:
                for provider in providers:
                    self._metrics.admission_refused.labels(provider, traffic.name)

    async def admit(
        self, request: Hashable, ticket: Hashable, class_name: str, domain: str
    ) -> Refused | None:
        """Decide one RCPT of transaction `ticket`; None: admitted (a slot is reserved)."""
        traffic = self._config.classes.get(class_name)
        cap = traffic.max_queued if traffic is not None else None
        if cap is None:
            return None
        rid, tid = (self._epoch, request), (self._epoch, ticket)
        self._inflight[rid] = tid
        try:
            destination = self._router.cached(domain) or await self._router.route(domain)
        finally:
            live = self._inflight.pop(rid, None) is not None
        if not live:  # the transaction ended meanwhile: nobody holds this slot
            return None
        if destination.queue.provider == DEFAULT_PROVIDER and not destination.site.hosts:
            log.debug("admission: %s not routed (DNS did not answer); admitted uncounted", domain)
            return None
        key = (destination.backlog_key, class_name)
        queued, reserved = self._stats.backlog[key], self.reserved[key]
        if queued + reserved >= cap:
            log.info(
                "admission: RCPT to %s refused: provider=%s queue=%s class=%s "
                "queued=%d reserved=%d max_queued=%d",
                domain,
                destination.queue.provider,
                key[0],
                class_name,
                queued,
                reserved,
                cap,
            )
            # The reply names the provider; a site by its hosts (clipped for the line).
            name = key[0] if len(key[0]) <= 200 else key[0][:200] + "..."
            return Refused(
                f"452 4.3.1 {name} backlog full, try again later", destination.queue.provider
            )
        self.reserved[key] += 1
        self._tickets.setdefault(tid, {})[rid] = key
        return None

    def refused(self, provider: str, class_name: str) -> None:
        """A client was told 452 (counted as it is told: the metric equals the replies)."""
        self._metrics.admission_refused.labels(provider, class_name).inc()

    def release(self, ticket: Hashable, request: Hashable | None = None) -> None:
        """The transaction ended without a message (request None), or one RCPT's answer
        was abandoned (timed out, the session went away): its slots are free."""
        tid = (self._epoch, ticket)
        if request is not None:
            rid = (self._epoch, request)
            self._inflight.pop(rid, None)
            key = self._tickets.get(tid, {}).pop(rid, None)
            if key is not None:
                self._unreserve(key)
            return
        for rid in [r for r, t in self._inflight.items() if t == tid]:
            del self._inflight[rid]
        for key in self._tickets.pop(tid, {}).values():
            self._unreserve(key)

    def queued(self, ticket: Hashable, message_id: str) -> None:
        """The transaction's message is durable and about to be reported: its slots stay
        taken until `accepted` has queued its recipients."""
        slots = self._tickets.pop((self._epoch, ticket), None)
        if slots:
            self._pending[message_id] = list(slots.values())

    def accepted(self, message_id: str) -> None:
        """The message is queued (its recipients are in the backlog now)."""
        for key in self._pending.pop(message_id, ()):
            self._unreserve(key)

    def reset(self) -> None:
        """The listener process is gone: its transactions with it. Messages it reported
        durable but not accepted are found again by the spool's recovery."""
        self._epoch += 1
        self.reserved.clear()
        self._tickets.clear()
        self._inflight.clear()
        self._pending.clear()

    def _unreserve(self, key: _Key) -> None:
        self.reserved[key] -= 1
        if self.reserved[key] <= 0:
            del self.reserved[key]
