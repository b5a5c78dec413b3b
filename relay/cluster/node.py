"""This node's part of the cluster, for the main process: the parts of relay/cluster
made from the `cluster` block, their background tasks, and `relay cluster status`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

from relay.clock import Clock
from relay.cluster.guards import SharedGuards
from relay.cluster.lanes import SharedLanes
from relay.cluster.leases import SlotLeases
from relay.cluster.link import RedisLink
from relay.cluster.lock import Locks
from relay.cluster.nodes import Nodes
from relay.cluster.rates import SharedRates
from relay.config.model import Cluster
from relay.errors import ClusterUnavailable
from relay.guard.shared import GuardEvent
from relay.metrics import Metrics
from relay.shaping.lanestate import LaneStateSink
from relay.shaping.rate import BucketFactory, MailboxFactory
from relay.tasks import spawn

log = logging.getLogger("relay.cluster")


class ClusterNode:
    def __init__(self, config: Cluster, address: str, metrics: Metrics, clock: Clock) -> None:
        redis_up, live = metrics.cluster()
        self.config = config
        self.link = RedisLink(str(config.redis), redis_up)
        self.nodes = Nodes(self.link, config.node, address, live)
        self.leases = SlotLeases(self.link, config.node, config.lease, self.live_nodes)
        self.rates = SharedRates(self.link, self.live_nodes, clock.monotonic)
        self.lanes = SharedLanes(self.link, config.node, clock.time)
        self.guards = SharedGuards(self.link, config.node, clock.time)
        self.locks = Locks(self.link, config.node)  # for spool takeover
        self._tasks: set[asyncio.Task[Any]] = set()

    def live_nodes(self) -> int:
        return self.nodes.last_live

    def buckets(self, lane: str) -> BucketFactory:
        return partial(self.rates.bucket, lane)

    def mailboxes(self, lane: str) -> MailboxFactory:
        return partial(self.rates.mailboxes, lane)

    async def start(self, sink: LaneStateSink, guard: Callable[[GuardEvent], None]) -> None:
        """Connect (a Redis that is down now does not stop the start: local shares
        stand in until it answers), then run the heartbeat, the lease keeper and the
        followers of lane events and of account guard events."""
        if await self.link.probe():
            try:
                await self.nodes.beat()
            except ClusterUnavailable:
                pass
        log.info(
            "cluster: node %s, Redis %s, %d live nodes",
            self.config.node,
            "up" if self.link.up else "down",
            self.nodes.last_live,
        )
        spawn(self.link.watch(), self._tasks, "redis probe")
        spawn(self.nodes.beat_forever(), self._tasks, "heartbeat")
        spawn(self.leases.keep_forever(), self._tasks, "lease keeper")
        spawn(self.lanes.follow(sink), self._tasks, "lane events")
        spawn(self.guards.follow(guard), self._tasks, "guard events")

    async def stop(self) -> None:
        await self.leases.drain()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.link.close()

    async def status(self) -> dict[str, Any]:
        """What `relay cluster status` prints; Redis's view when it answers."""
        result: dict[str, Any] = {
            "node": self.config.node,
            "redis": "up" if self.link.up else "down",
            "redis_since": round(self.link.since, 3),
            "live_nodes": self.nodes.last_live,
            "lease": self.config.lease,
            "held_here": self.leases.by_key(),
            "nodes": None,
            "leases": None,
        }
        try:
            records = await self.nodes.records()
            result["nodes"] = [
                {"node": r.node, "address": r.address, "age": round(r.age, 3), "live": r.live}
                for r in records
            ]
            result["leases"] = await self.leases.cluster_counts()
        except ClusterUnavailable:
            pass  # the local part is all there is
        return result
