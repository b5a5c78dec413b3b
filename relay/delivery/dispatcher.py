"""Lanes by queue key: a lane for each ready queue the manager opens, forgotten once it is
idle, empty and not suspended."""

from __future__ import annotations

import asyncio

from relay.delivery.context import LaneContext
from relay.delivery.lane import Lane
from relay.queue.ready import ReadyQueue


class Dispatcher:
    def __init__(self, context: LaneContext) -> None:
        self.context = context
        self.lanes: dict[str, Lane] = {}

    async def run(self, opened: asyncio.Queue[ReadyQueue]) -> None:
        """Give every ready queue the manager opens a lane."""
        while True:
            ready = await opened.get()
            self.lane(ready).wake()

    def lane(self, ready: ReadyQueue) -> Lane:
        lane = self.lanes.get(ready.key)
        if lane is None or lane.ready is not ready:
            lane = Lane(ready, self.context, self._idle)
            self.lanes[ready.key] = lane
        return lane

    def _idle(self, lane: Lane) -> None:
        if (
            self.lanes.get(lane.key) is lane
            and not lane.busy
            and self.context.queue.forget(lane.ready)
        ):
            del self.lanes[lane.key]

    def drain(self) -> None:
        self.context.stopping = True
        for lane in self.lanes.values():
            lane.interrupt()

    async def wait_idle(self) -> None:
        """Until every worker has finished its transaction in hand and closed."""
        while True:
            workers = [w for lane in self.lanes.values() for w in lane.workers]
            if not workers:
                return
            await asyncio.wait(workers)

    async def stop(self) -> None:
        await asyncio.gather(*(lane.stop() for lane in list(self.lanes.values())))
        await self.context.suspensions.flush()
        await self.context.connector.policy.sts.flush()  # MTA-STS policies learnt lately
