"""Connection slots as leases in Redis, per provider and per site (SPEC §9).

A slot is a member of the lane's ZSET (`relay:slots:<lane>`) whose score is its expiry;
a script removes the expired members and grants a new one only while fewer than the
limit are live, atomically. A node renews all the leases it holds every `lease / 3`,
so a connection keeps its slot as long as it lives, and a node that dies gives its
slots back within `lease` (kill -9, power cut: nobody has to release them).

While Redis is down, this node grants slots from its share of the limit, counting every
slot it holds (leased before the outage or not): limit / live nodes last seen, at least
1. When Redis answers again the keeper renews at once: slots granted meanwhile are
leased if there is room, else marked lost, and their connections close after the
transaction in hand, so the shared limit holds again within a second or two.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from typing import Any

from relay.cluster import scripts
from relay.cluster.link import RedisLink, best_effort
from relay.errors import ClusterUnavailable
from relay.shaping.slots import Slot
from relay.tasks import spawn

log = logging.getLogger("relay.cluster")


def slots_key(lane: str) -> str:
    return f"relay:slots:{lane}"


def wanted_key(lane: str) -> str:
    return f"relay:wanted:{lane}"


class Lease(Slot):
    __slots__ = ("id", "leased", "limit")

    def __init__(self, key: str, id: str, limit: int, leased: bool) -> None:
        super().__init__(key)
        self.id = id
        self.limit = limit
        self.leased = leased  # False: granted locally while Redis was down


class SlotLeases:
    """`Slots` (relay/shaping/slots.py) for a cluster."""

    def __init__(
        self, link: RedisLink, node: str, lease: float, live_nodes: Callable[[], int]
    ) -> None:
        self._link = link
        self._node = node
        self._lease_ms = int(lease * 1000)
        self._lease = lease
        self._live_nodes = live_nodes
        self._held: dict[str, Lease] = {}  # by lease id
        self._acquire = link.client.register_script(scripts.ACQUIRE)
        self._renew = link.client.register_script(scripts.RENEW)
        self._release = link.client.register_script(scripts.RELEASE)
        self._tasks: set[asyncio.Task[Any]] = set()

    def held(self, key: str) -> int:
        return sum(1 for lease in self._held.values() if lease.key == key)

    def local_share(self, limit: int) -> int:
        return max(1, limit // max(1, self._live_nodes()))

    async def acquire(self, key: str, limit: int) -> Slot | None:
        lease_id = f"{self._node}/{secrets.token_hex(6)}"
        if self._link.up:
            try:
                granted = await self._link.run(
                    lambda _: self._acquire(
                        keys=[slots_key(key), wanted_key(key)],
                        args=[limit, self._lease_ms, lease_id],
                    )
                )
            except ClusterUnavailable:
                pass  # fall through to the local share
            else:
                if not granted:
                    return None
                return self._keep(Lease(key, lease_id, limit, leased=True))
        if self.held(key) >= self.local_share(limit):
            return None
        return self._keep(Lease(key, lease_id, limit, leased=False))

    def _keep(self, lease: Lease) -> Lease:
        self._held[lease.id] = lease
        return lease

    async def wanted(self, slot: Slot) -> bool:
        """Another node was refused one of this lane's slots in the last 2 s."""
        if not isinstance(slot, Lease) or not slot.leased or not self._link.up:
            return False
        try:
            return bool(await self._link.run(lambda c: c.exists(wanted_key(slot.key))))
        except ClusterUnavailable:
            return False

    def release(self, slot: Slot) -> None:
        lease = self._held.pop(slot.id, None) if isinstance(slot, Lease) else None
        if lease is not None and lease.leased and self._link.up:
            spawn(
                best_effort(
                    self._link,
                    lambda _: self._release(keys=[slots_key(lease.key)], args=[lease.id]),
                ),
                self._tasks,
                "lease release",
            )

    async def renew(self) -> None:
        """Extend every lease held; take again those Redis forgot, or mark them lost."""
        leases = list(self._held.values())
        if not leases:
            return
        args: list[Any] = [self._lease_ms]
        for lease in leases:
            args += [lease.id, lease.limit]
        result = await self._link.run(
            lambda _: self._renew(keys=[slots_key(x.key) for x in leases], args=args)
        )
        lost = 0
        for lease, kept in zip(leases, result, strict=True):
            if lease.id not in self._held:
                continue  # released meanwhile; its ZREM follows
            if kept:
                lease.leased = True
            elif not lease.lost:
                lease.lost = True
                lost += 1
        if lost:
            log.info("cluster: %d connection slots not leasable now; they close", lost)

    async def keep_forever(self) -> None:
        """Renew every lease/3, and at once when Redis comes back."""
        recovered = self._link.on_recovery()
        while True:
            try:
                await asyncio.wait_for(recovered.wait(), self._lease / 3)
            except TimeoutError:
                pass
            recovered.clear()
            try:
                await self.renew()
            except ClusterUnavailable:
                pass

    async def drain(self) -> None:
        """Let the releases in flight reach Redis (at shutdown), a second at most."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)

    def by_key(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for lease in self._held.values():
            counts[lease.key] = counts.get(lease.key, 0) + 1
        return counts

    async def cluster_counts(self) -> dict[str, dict[str, int]]:
        """Live leases in Redis: lane → node → count (`relay cluster status`)."""

        async def read(client):  # type: ignore[no-untyped-def]
            found: dict[str, dict[str, int]] = {}
            seconds, micros = await client.time()
            now_ms = seconds * 1000 + micros // 1000
            async for key in client.scan_iter(match="relay:slots:*", count=1000):
                members = await client.zrangebyscore(key, now_ms, "+inf")
                per_node = found.setdefault(key.removeprefix("relay:slots:"), {})
                for member in members:
                    node = member.rpartition("/")[0]
                    per_node[node] = per_node.get(node, 0) + 1
            return {lane: nodes for lane, nodes in found.items() if nodes}

        result: dict[str, dict[str, int]] = await self._link.run(read)
        return result
