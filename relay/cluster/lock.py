"""A lock in Redis with a fencing token, for work that one node only may do at a time
(the takeover of a dead node's spool, SPEC §9).

The token grows by one at each acquisition: whatever the holder does under the lock
carries it (written next to the adopted spool, for instance), so a holder that paused
past its lock's expiry and woke up is recognised as stale by a lower token. The lock
is kept by `keep` before its TTL runs out and given back by `release`.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.cluster import scripts
from relay.cluster.link import RedisLink


@dataclass(frozen=True, slots=True)
class Held:
    name: str
    token: int  # the fencing token


class Locks:
    def __init__(self, link: RedisLink, holder: str) -> None:
        self._link = link
        self._holder = holder
        self._lock = link.client.register_script(scripts.LOCK)
        self._keep = link.client.register_script(scripts.KEEP_LOCK)

    async def acquire(self, name: str, ttl: float) -> Held | None:
        """The lock and its token, or None while another holds it. ClusterUnavailable
        when Redis does not answer: nobody may then assume they hold it."""
        token = await self._link.run(
            lambda _: self._lock(
                keys=[f"relay:lock:{name}", f"relay:fence:{name}"],
                args=[self._holder, int(ttl * 1000)],
            )
        )
        return Held(name, int(token)) if token else None

    async def held(self, name: str) -> bool:
        """Whether anyone holds the lock now."""
        return bool(await self._link.run(lambda client: client.exists(f"relay:lock:{name}")))

    async def keep(self, held: Held, ttl: float) -> bool:
        """Extend it; False when it was lost (expired, and maybe taken by another)."""
        return bool(await self._run_keep(held, int(ttl * 1000)))

    async def release(self, held: Held) -> None:
        await self._run_keep(held, 0)

    async def _run_keep(self, held: Held, ttl_ms: int) -> int:
        result = await self._link.run(
            lambda _: self._keep(
                keys=[f"relay:lock:{held.name}"], args=[self._holder, held.token, ttl_ms]
            )
        )
        return int(result)
