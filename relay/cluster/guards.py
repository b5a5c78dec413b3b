"""The account guard's trips and releases told to every node (SPEC §9), through the
`relay:guard` hash and channel (broadcast.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from relay.cluster.broadcast import Broadcast
from relay.cluster.link import RedisLink
from relay.guard.shared import GuardEvent

log = logging.getLogger("relay.cluster")

NAME = "relay:guard"


class SharedGuards:
    """`GuardAnnouncer` for a cluster, and the follower of the other nodes' events."""

    def __init__(self, link: RedisLink, node: str, clock: Callable[[], float] = time.time) -> None:
        self._events = Broadcast(link, node, NAME, GuardEvent.loads, clock)

    def announce(self, event: GuardEvent) -> None:
        self._events.announce(event)

    async def follow(self, apply: Callable[[GuardEvent], None]) -> None:
        """Apply the other nodes' trips and releases, forever (an owned task)."""
        await self._events.follow(apply)
