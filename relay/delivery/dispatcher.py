"""Lanes by key: creates a lane on first use, forgets it once it is idle and empty."""

from __future__ import annotations

import asyncio

from relay.config.model import Config
from relay.delivery.client import Connector
from relay.delivery.lane import Lane, Requeue
from relay.delivery.outcomes import Outcomes
from relay.routing.models import Batch, QueuedMessage, Recipient
from relay.routing.router import Destination
from relay.shaping.suspensions import Suspensions
from relay.spool.store import Spool


class Dispatcher:
    def __init__(self, config: Config, connector: Connector, outcomes: Outcomes,
                 spool: Spool, suspensions: Suspensions, requeue: Requeue) -> None:
        self._config = config
        self._connector = connector
        self._outcomes = outcomes
        self._spool = spool
        self._suspensions = suspensions
        self._requeue = requeue
        self.lanes: dict[str, Lane] = {}

    def enqueue(self, destination: Destination, message: QueuedMessage,
                recipients: list[Recipient]) -> None:
        """Recipients of one domain → batches of at most max_recipients_per_message."""
        lane = self.lane(destination)
        size = destination.shaping.max_recipients_per_message
        domain = recipients[0].domain
        for start in range(0, len(recipients), size):
            lane.push(Batch(message, recipients[start:start + size], domain, lane.key))

    def lane(self, destination: Destination) -> Lane:
        lane = self.lanes.get(destination.lane_key)
        if lane is None:
            lane = Lane(destination, self._config, self._connector, self._outcomes,
                        self._spool, self._suspensions, self._requeue, self._forget)
            self.lanes[destination.lane_key] = lane
        return lane

    def _forget(self, lane: Lane) -> None:
        if self.lanes.get(lane.key) is lane and not lane.busy:
            del self.lanes[lane.key]

    async def stop(self) -> None:
        await asyncio.gather(*(lane.stop() for lane in list(self.lanes.values())))
        await self._suspensions.flush()
