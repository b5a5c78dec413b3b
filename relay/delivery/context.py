"""What every lane shares: the collaborators the dispatcher hands to each lane it makes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from relay.config.model import Config
from relay.delivery.client import Connector
from relay.delivery.outcomes import Outcomes
from relay.metrics import Metrics
from relay.routing.models import QueuedMessage, Recipient
from relay.routing.stats import QueueStats
from relay.shaping.suspensions import Suspensions
from relay.spool.store import Spool

Requeue = Callable[[QueuedMessage, list[Recipient]], None]


@dataclass
class LaneContext:
    config: Config  # replaced on reload
    connector: Connector
    outcomes: Outcomes
    spool: Spool
    suspensions: Suspensions
    requeue: Requeue
    stats: QueueStats
    metrics: Metrics
    stopping: bool = False  # shutting down: finish the transaction in hand, start no other
