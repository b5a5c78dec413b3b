"""Node heartbeats: each node writes `node → (time, address)` every second with a short
TTL; the live count divides the limits while Redis is down, so the count last seen
is kept (SPEC §9: configured limit / live nodes, at least 1 each).

The record stays in the `relay:nodes` hash after its TTL key expired: that is how a
silent node is seen, with its age (`relay cluster status`, and the takeover of a dead
node's spool, which looks for nodes silent longer than `takeover_after`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from relay.cluster import scripts
from relay.cluster.link import RedisLink
from relay.errors import ClusterUnavailable

if TYPE_CHECKING:
    from prometheus_client import Gauge

log = logging.getLogger("relay.cluster")

BEAT_INTERVAL = 1.0
BEAT_TTL = 3.5  # three beats missed: the node is not counted any more
NODES = "relay:nodes"
FORGET_AFTER = 7 * 86400.0  # a node silent this long leaves the hash


@dataclass(frozen=True, slots=True)
class NodeRecord:
    node: str
    address: str
    age: float  # seconds since its last heartbeat, by Redis's clock
    live: bool


class TakesLiveNodes(Protocol):
    """Who else divides limits by the live count: the listener process, for the
    account rates (relay/listener/supervisor.py)."""

    def live_nodes(self, count: int) -> None: ...


def node_key(node: str) -> str:
    return f"relay:node:{node}"


class Nodes:
    def __init__(self, link: RedisLink, node: str, address: str, gauge: Gauge | None) -> None:
        self._link = link
        self.node = node
        self._address = address
        self._gauge = gauge
        self._beat = link.client.register_script(scripts.HEARTBEAT)
        self.last_live = 1  # what degraded mode divides by: the last count seen
        self._changes: list[asyncio.Event] = []  # see on_change
        if gauge is not None:
            gauge.set(1)

    def on_change(self) -> asyncio.Event:
        """An event of the caller's own, set whenever `last_live` changes; the caller
        clears it."""
        event = asyncio.Event()
        self._changes.append(event)
        return event

    async def tell(self, listener: TakesLiveNodes) -> None:
        """Give `listener` the live count now and at each change (an owned task)."""
        changed = self.on_change()
        while True:
            listener.live_nodes(self.last_live)
            await changed.wait()
            changed.clear()

    async def beat(self) -> None:
        """One heartbeat; the live count comes back with it."""
        live = await self._link.run(
            lambda _: self._beat(
                keys=[NODES, node_key(self.node)],
                args=[self.node, self._address, int(BEAT_TTL * 1000)],
            )
        )
        count = max(1, int(live))
        if count != self.last_live:
            log.info("cluster: %d live nodes (was %d)", count, self.last_live)
            self.last_live = count
            for event in self._changes:
                event.set()
        if self._gauge is not None:
            self._gauge.set(count)

    async def beat_forever(self) -> None:
        while True:
            try:
                await self.beat()
            except ClusterUnavailable:
                pass  # the link logged it; last_live stands for degraded mode
            await asyncio.sleep(BEAT_INTERVAL)

    async def records(self) -> list[NodeRecord]:
        """Every node the hash knows, live or silent, by name."""

        async def read(client):  # type: ignore[no-untyped-def]
            raw = await client.hgetall(NODES)
            alive = await client.mget([node_key(n) for n in raw]) if raw else []
            seconds, micros = await client.time()
            return raw, alive, seconds + micros / 1e6

        raw, alive, now = await self._link.run(read)
        found = []
        for (name, record), present in zip(raw.items(), alive, strict=True):
            try:
                data = json.loads(record)
                when, address = float(data["time"]), str(data["address"])
            except (ValueError, KeyError, TypeError):
                continue
            found.append(NodeRecord(name, address, max(0.0, now - when), present is not None))
        stale = [r.node for r in found if not r.live and r.age > FORGET_AFTER]
        if stale:
            await self._link.run(lambda c: c.hdel(NODES, *stale))
        return sorted((r for r in found if r.node not in stale), key=lambda r: r.node)
