"""Lanes by queue key: a lane for each ready queue the manager opens, forgotten once it is
idle, empty and not suspended. In a cluster, the other nodes' suspensions and throttles
arrive here (`apply_shared`), for lanes that exist now or later."""

from __future__ import annotations

import asyncio
import logging
import re

from relay.config.model import Rule
from relay.config.units import parse_rate
from relay.delivery.context import LaneContext
from relay.delivery.lane import Lane
from relay.queue.ready import ReadyQueue
from relay.shaping.lanestate import LaneEvent

log = logging.getLogger("relay.delivery")


class Dispatcher:
    def __init__(self, context: LaneContext) -> None:
        self.context = context
        self.lanes: dict[str, Lane] = {}
        self._throttles: dict[str, LaneEvent] = {}  # from other nodes, for lanes not here
        self._limits: dict[str, LaneEvent] = {}  # adaptive limits likewise

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
            throttle = self._throttles.pop(ready.key, None)
            if throttle is not None:
                self._throttle(lane, throttle)
            limits = self._limits.pop(ready.key, None)
            if limits is not None:
                lane.assume_limits(limits)
        return lane

    def apply_shared(self, event: LaneEvent) -> None:
        """Another node suspended, resumed, throttled a lane or changed its adaptive
        limits (SPEC §9)."""
        lane = self.lanes.get(event.lane)
        now = self.context.clock.time()
        if event.kind == "suspend" and event.until > now:
            if lane is not None:
                lane.suspend(event.until - now, event.reason, announce=False)
            else:  # a lane made later restores it from there, like one saved at shutdown
                self.context.suspensions.set(event.lane, event.until, event.reason)
        elif event.kind == "resume":
            if lane is not None:
                if lane.paused:
                    lane.resume(announce=False)
            else:
                self.context.suspensions.clear(event.lane)
        elif event.kind == "throttle" and event.until > now:
            if lane is not None:
                self._throttle(lane, event)
            else:
                self._throttles[event.lane] = event
        elif event.kind == "limit":
            if lane is not None:
                lane.assume_limits(event)
            else:
                self._limits[event.lane] = event

    def _throttle(self, lane: Lane, event: LaneEvent) -> None:
        remaining = event.until - self.context.clock.time()
        if remaining <= 0:
            return
        try:
            rate = parse_rate(event.rate) if event.rate else None
        except ValueError:
            log.warning("lane %s: throttle rate %r from another node ignored", lane.key, event.rate)
            rate = None
        rule = Rule(re.compile(""), "throttle", remaining, rate, event.max_connections)
        lane.throttle(rule, f"{event.reason} (from node {event.node})", announce=False)

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
