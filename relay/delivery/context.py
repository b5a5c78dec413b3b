"""What every lane shares, and the narrow view of the queue manager that delivery uses."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from relay.clock import Clock
from relay.config.model import Config
from relay.delivery.connector import Connector
from relay.metrics import Metrics
from relay.queue.models import Attempt, Batch, QueuedMessage, Recipient
from relay.queue.ready import ReadyQueue
from relay.reply import Reply, Verdict
from relay.routing.router import Site
from relay.shaping.lanestate import LaneAnnouncer
from relay.shaping.rate import BucketFactory, MailboxFactory, local_bucket, local_mailboxes
from relay.shaping.slots import LocalSlots, Slots
from relay.shaping.suspensions import Suspensions


class QueueSide(Protocol):
    """What a lane may ask of the queue manager: hand back attempts and their effects."""

    def take(self, batch: Batch) -> None: ...

    async def settle(self, batch: Batch, attempts: list[Attempt], relay: str | None) -> None: ...

    async def settle_all(self, batches: list[Batch], reply: Reply, verdict: Verdict) -> None: ...

    async def site_unreachable(self, ready: ReadyQueue, site: Site, reply: Reply) -> None: ...

    def site_reached(self, site: Site) -> None: ...

    def requeue(self, message: QueuedMessage, recipients: list[Recipient]) -> None: ...

    def suspended(self, ready: ReadyQueue, detail: str) -> None: ...

    def forget(self, ready: ReadyQueue) -> bool: ...


LoadMessage = Callable[[QueuedMessage], Awaitable[bytes]]


def local_buckets(lane: str) -> BucketFactory:
    return local_bucket


def local_mailbox_rates(lane: str) -> MailboxFactory:
    return local_mailboxes


@dataclass
class LaneContext:
    config: Config  # replaced on reload
    connector: Connector
    queue: QueueSide
    load: LoadMessage
    suspensions: Suspensions
    metrics: Metrics
    clock: Clock
    # One node: slots are the lane's workers, rates in memory, nobody to tell. A
    # cluster gives leases, shared rates and an announcer (relay/cluster, SPEC §9).
    slots: Slots = field(default_factory=LocalSlots)
    buckets: Callable[[str], BucketFactory] = local_buckets  # lane key → its rates
    mailboxes: Callable[[str], MailboxFactory] = local_mailbox_rates  # and recipient_rate
    announcer: LaneAnnouncer | None = None
    clustered: bool = False  # limits are the cluster's: adaptive cuts halve the limit
    stopping: bool = False  # shutting down: finish the transaction in hand, start no other
    # False once another node adopted this spool (relay/cluster/takeover.py)
    may_deliver: Callable[[], bool] = lambda: True
