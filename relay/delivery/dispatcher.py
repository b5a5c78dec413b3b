"""Lanes by key: creates a lane on first use, forgets it once it is idle and empty."""

from __future__ import annotations

import asyncio

from relay.delivery.context import LaneContext
from relay.delivery.lane import Lane
from relay.routing.models import Batch, QueuedMessage, Recipient
from relay.routing.router import Destination


class Dispatcher:
    def __init__(self, context: LaneContext) -> None:
        self.context = context
        self.lanes: dict[str, Lane] = {}

    def enqueue(
        self, destination: Destination, message: QueuedMessage, recipients: list[Recipient]
    ) -> None:
        """Recipients of one domain → batches of at most max_recipients_per_message."""
        lane = self.lane(destination)
        size = destination.shaping.max_recipients_per_message
        domain = recipients[0].domain
        for start in range(0, len(recipients), size):
            lane.push(Batch(message, recipients[start : start + size], domain, lane.key))

    def lane(self, destination: Destination) -> Lane:
        lane = self.lanes.get(destination.lane_key)
        if lane is None:
            lane = Lane(destination, self.context, self._forget)
            self.lanes[destination.lane_key] = lane
        return lane

    def _forget(self, lane: Lane) -> None:
        if self.lanes.get(lane.key) is lane and not lane.busy:
            del self.lanes[lane.key]

    def drain(self) -> None:
        self.context.stopping = True
        for lane in self.lanes.values():
            lane.wake()

    async def wait_idle(self) -> None:
        """Until every worker has finished its transaction in hand."""
        while True:
            workers = [w for lane in self.lanes.values() for w in lane.workers]
            if not workers:
                return
            await asyncio.wait(workers)

    async def stop(self) -> None:
        await asyncio.gather(*(lane.stop() for lane in list(self.lanes.values())))
        await self.context.suspensions.flush()
