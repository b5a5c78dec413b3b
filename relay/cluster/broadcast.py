"""State changes told to every node (SPEC §9): stored in a Redis hash and published on a
channel of the same name.

A node stores each event in the hash (one field per `key()`; a script keeps the one
with the latest `at`, whatever order they arrive in) and publishes it; every node
applies what it hears within milliseconds. The hash is read again every few seconds and
after each reconnection, the safety net for a message lost while a node was cut off
from Redis. Events a node could not send (Redis down) wait here
and go out, the latest per key, when the link is back. Lanes' suspensions, throttles and
limits (lanes.py) and the account guard's trips and releases (guards.py) travel this way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Generic, Protocol, Self, TypeVar

from relay.cluster import scripts
from relay.cluster.link import RedisLink
from relay.errors import ClusterUnavailable
from relay.tasks import spawn

log = logging.getLogger("relay.cluster")

REREAD_INTERVAL = 3.0
MAX_AGE = 7 * 86400.0  # events older than this (and no longer in force) are dropped


class Event(Protocol):
    @property
    def at(self) -> float:
        """Wall clock of the change: a later event replaces an earlier one."""
        ...

    @property
    def until(self) -> float:
        """Wall clock until which it is in force (0: an instant)."""
        ...

    @property
    def node(self) -> str:
        """Where it happened."""
        ...

    def key(self) -> str:
        """The hash field: an event replaces the last one of the same key."""
        ...

    def from_node(self, node: str) -> Self: ...

    def dumps(self) -> str: ...


E = TypeVar("E", bound=Event)


class Broadcast(Generic[E]):
    def __init__(
        self,
        link: RedisLink,
        node: str,
        name: str,
        loads: Callable[[str | bytes], E],
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`loads` raises ValueError for anything that is not such an event."""
        self._link = link
        self._node = node
        self._name = name  # the hash and the channel
        self._loads = loads
        self._clock = clock
        self._unsent: dict[str, E] = {}
        self._seen: dict[str, float] = {}  # key → `at` of the last event applied or sent
        self._tasks: set[asyncio.Task[Any]] = set()
        self._script = link.client.register_script(scripts.STORE_EVENT)

    def announce(self, event: E) -> None:
        event = event.from_node(self._node)
        self._seen[event.key()] = event.at
        self._unsent[event.key()] = event
        spawn(self._send(), self._tasks, f"{self._name} event")

    async def _send(self) -> None:
        while self._unsent:
            key, event = next(iter(self._unsent.items()))
            try:
                await self._link.run(partial(self._store, key, event))
            except ClusterUnavailable:
                return  # sent by follow() when the link is back
            if self._unsent.get(key) is event:
                del self._unsent[key]

    async def _read(self, client: Any) -> dict[str, str]:
        return dict(await client.hgetall(self._name))

    async def _store(self, key: str, event: E, client: Any) -> None:
        await self._script(keys=[self._name], args=[key, event.dumps(), repr(event.at)])

    async def follow(self, apply: Callable[[E], None]) -> None:
        """Apply the other nodes' events, forever (an owned task)."""
        while True:
            await self._link.wait_up()
            try:
                await self._session(apply)
            except ClusterUnavailable:
                pass
            except Exception as exc:  # redis errors inside pub/sub: the link decides
                log.debug("cluster: %s events interrupted: %s", self._name, exc)
                await self._link.probe()
                await asyncio.sleep(0.2)

    async def _session(self, apply: Callable[[E], None]) -> None:
        """Subscribed while the link is up: the hash first, then what is published."""
        pubsub = self._link.client.pubsub(ignore_subscribe_messages=True)
        try:
            await asyncio.wait_for(pubsub.subscribe(self._name), 1.0)
            await self._send()
            await self.reread(apply)
            next_read = time.monotonic() + REREAD_INTERVAL
            while self._link.up:
                message = await asyncio.wait_for(pubsub.get_message(timeout=0.5), 1.0)
                if message is not None and message.get("type") == "message":
                    self._apply(apply, message["data"])
                if time.monotonic() >= next_read:
                    await self._send()
                    await self.reread(apply)
                    next_read = time.monotonic() + REREAD_INTERVAL
        finally:
            try:
                await asyncio.wait_for(pubsub.aclose(), 1.0)  # type: ignore[no-untyped-call]
            except Exception as exc:  # a hung Redis: the socket is dropped anyway
                log.debug("cluster: closing the subscription: %s", exc)

    async def reread(self, apply: Callable[[E], None]) -> None:
        stored = await self._link.run(self._read)
        now = self._clock()
        stale = []
        for key, raw in stored.items():
            event = self._apply(apply, raw)
            if event is not None and max(event.until, event.at) < now - MAX_AGE:
                stale.append(key)
        if stale:
            await self._link.run(lambda client: client.hdel(self._name, *stale))

    def _apply(self, apply: Callable[[E], None], raw: str | bytes) -> E | None:
        try:
            event = self._loads(raw)
        except ValueError as exc:
            log.warning("cluster: ignoring a %s event that does not parse: %s", self._name, exc)
            return None
        key = event.key()
        if event.at <= self._seen.get(key, 0.0):
            return event  # already applied, or ours
        self._seen[key] = event.at
        if event.node != self._node:
            apply(event)
        return event
