"""The link to the cluster's Redis, and whether it is up.

Every command is bounded by a short timeout, so a Redis that accepts connections and
never answers is found down within about a second, like one that refuses them. While
the link is down, commands fail at once without touching the network (callers fall
back to local limits); `watch` probes with PING and brings the link back up by itself.
Each transition is logged once and exported as `relay_cluster_redis_up`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from relay.errors import ClusterUnavailable

if TYPE_CHECKING:
    from prometheus_client import Gauge
    from redis.asyncio import Redis

log = logging.getLogger("relay.cluster")

T = TypeVar("T")

COMMAND_TIMEOUT = 0.5  # seconds; a Lua script here runs in well under a millisecond
PROBE_INTERVAL = 0.5  # PING while up (to notice a hang) and while down (to notice a return)


class RedisLink:
    def __init__(
        self,
        url: str,
        gauge: Gauge | None = None,
        timeout: float = COMMAND_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # Imported here: without a `cluster` block nothing needs redis (SPEC §9).
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self._errors: tuple[type[BaseException], ...] = (
            aioredis.RedisError,
            OSError,
            TimeoutError,
        )
        self.client: Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # No retries: a retry triples the time a hung Redis holds a caller, and the
            # callers have a local answer ready.
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            decode_responses=True,
        )
        self._timeout = timeout
        self._gauge = gauge
        self._clock = clock
        self.up = False
        self.since = clock()
        self._up = asyncio.Event()  # set while up
        self._recoveries: list[asyncio.Event] = []  # see on_recovery
        self._known = False  # the first probe logs its result even when "down"
        if gauge is not None:
            gauge.set(0)

    def on_recovery(self) -> asyncio.Event:
        """An event of the caller's own, set at each down → up; the caller clears it."""
        event = asyncio.Event()
        self._recoveries.append(event)
        return event

    async def wait_up(self) -> None:
        await self._up.wait()

    async def run(self, command: Callable[[Redis], Awaitable[T]]) -> T:
        """`command` on the client, bounded in time; ClusterUnavailable if the link is
        down or the command fails (then the link is down until a probe answers)."""
        if not self.up:
            raise ClusterUnavailable("Redis is unreachable")
        try:
            return await asyncio.wait_for(command(self.client), self._timeout * 2)
        except self._errors as exc:
            self._mark(False, f"{type(exc).__name__}: {exc}")
            raise ClusterUnavailable(f"Redis did not answer: {exc}") from exc

    async def probe(self) -> bool:
        if not self.up:
            # Connections opened while Redis hung, or before it restarted, are stuck or
            # dead: the first commands after its return would find them and fail, and
            # the link would flap. Every probe while down starts from fresh ones.
            try:
                await asyncio.wait_for(self.client.connection_pool.disconnect(), self._timeout)
            except Exception as exc:  # best effort: the PING below decides
                log.debug("dropping Redis connections: %s", exc)
        try:
            await asyncio.wait_for(self.client.ping(), self._timeout * 2)
        except self._errors as exc:
            self._mark(False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            return False
        self._mark(True, "PING answered")
        return True

    async def watch(self, interval: float = PROBE_INTERVAL) -> None:
        """Probe forever (an owned background task)."""
        while True:
            await self.probe()
            await asyncio.sleep(interval)

    def _mark(self, up: bool, why: str) -> None:
        if up == self.up and self._known:
            return
        self._known = True
        was = self.up
        self.up = up
        self.since = self._clock()
        if self._gauge is not None:
            self._gauge.set(1 if up else 0)
        if up:
            self._up.set()
            log.info("cluster: Redis is up; limits are shared again")
            for event in self._recoveries:
                event.set()
            return
        self._up.clear()
        if was:
            log.warning("cluster: Redis is down (%s); each node keeps its share of the limits", why)
        else:
            log.warning("cluster: Redis is unreachable (%s); local shares of the limits", why)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.client.aclose(), self._timeout * 2)
        except Exception as exc:  # closing is best effort
            log.debug("closing the Redis client: %s", exc)


async def best_effort(link: RedisLink, command: Callable[[Redis], Awaitable[Any]]) -> None:
    """Run `command` if Redis answers; its failure is already logged by the link."""
    try:
        await link.run(command)
    except ClusterUnavailable:
        pass
