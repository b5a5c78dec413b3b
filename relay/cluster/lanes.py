"""Suspensions, throttles and limit changes told to every node (SPEC §9), through the
`relay:lanes` hash and channel (broadcast.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from relay.cluster.broadcast import Broadcast
from relay.cluster.link import RedisLink
from relay.shaping.lanestate import LaneEvent, LaneStateSink

log = logging.getLogger("relay.cluster")

NAME = "relay:lanes"


class SharedLanes:
    """`LaneAnnouncer` (relay/shaping/lanestate.py) for a cluster, and the follower
    that applies the other nodes' events to a `LaneStateSink`."""

    def __init__(self, link: RedisLink, node: str, clock: Callable[[], float] = time.time) -> None:
        self._events = Broadcast(link, node, NAME, LaneEvent.loads, clock)

    def announce(self, event: LaneEvent) -> None:
        self._events.announce(event)

    async def follow(self, sink: LaneStateSink) -> None:
        """Apply the other nodes' events to `sink`, forever (an owned task)."""
        await self._events.follow(lambda event: _apply(sink, event))

    async def reread(self, sink: LaneStateSink) -> None:
        await self._events.reread(lambda event: _apply(sink, event))


def _apply(sink: LaneStateSink, event: LaneEvent) -> None:
    log.info(
        "cluster: %s %s from node %s%s",
        event.lane,
        event.kind,
        event.node,
        f": {event.reason}" if event.reason else "",
    )
    sink.apply_shared(event)
