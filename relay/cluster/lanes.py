"""Suspensions, throttles and limit changes told to every node (SPEC §9).

A node that suspends, resumes or throttles a lane stores the event in the `relay:lanes`
hash (one field per lane and kind, the latest wins) and publishes it on the
`relay:lanes` channel; every node applies what it hears within milliseconds. The hash
is read again every few seconds and after each reconnection, the safety net for a
message lost while a node was cut off from Redis.

Events a node could not send (Redis down) wait here and go out, the latest per lane and
kind, when the link is back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from relay.cluster.link import RedisLink
from relay.errors import ClusterUnavailable
from relay.shaping.lanestate import LaneEvent, LaneStateSink
from relay.tasks import spawn

log = logging.getLogger("relay.cluster")

CHANNEL = "relay:lanes"
STATE = "relay:lanes"
REREAD_INTERVAL = 3.0
MAX_AGE = 7 * 86400.0  # events older than this (and no longer in force) are dropped


async def _read_state(client: Any) -> dict[str, str]:
    return dict(await client.hgetall(STATE))


async def _store(field: str, raw: str, client: Any) -> None:
    async with client.pipeline(transaction=True) as pipe:
        pipe.hset(STATE, field, raw)
        pipe.publish(CHANNEL, raw)
        await pipe.execute()


def _field(event: LaneEvent) -> str:
    # A resume replaces the suspension it ends; throttles and limits are kept apart.
    kind = "suspend" if event.kind == "resume" else event.kind
    return f"{event.lane} {kind}"


class SharedLanes:
    """`LaneAnnouncer` (relay/shaping/lanestate.py) for a cluster, and the follower
    that applies the other nodes' events to a `LaneStateSink`."""

    def __init__(self, link: RedisLink, node: str, clock: Callable[[], float] = time.time) -> None:
        self._link = link
        self._node = node
        self._clock = clock
        self._unsent: dict[str, LaneEvent] = {}
        self._seen: dict[str, float] = {}  # field → `at` of the last event applied or sent
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    def announce(self, event: LaneEvent) -> None:
        event = dataclasses.replace(event, node=self._node)
        self._seen[_field(event)] = event.at
        self._unsent[_field(event)] = event
        spawn(self._send(), self._tasks, "lane event")

    async def _send(self) -> None:
        while self._unsent:
            field, event = next(iter(self._unsent.items()))
            try:
                await self._link.run(partial(_store, field, event.dumps()))
            except ClusterUnavailable:
                return  # sent by follow() when the link is back
            if self._unsent.get(field) is event:
                del self._unsent[field]

    async def follow(self, sink: LaneStateSink) -> None:
        """Apply the other nodes' events to `sink`, forever (an owned task)."""
        while True:
            await self._link.wait_up()
            try:
                await self._session(sink)
            except ClusterUnavailable:
                pass
            except Exception as exc:  # redis errors inside pub/sub: the link decides
                log.debug("cluster: lane events interrupted: %s", exc)
                await self._link.probe()
                await asyncio.sleep(0.2)

    async def _session(self, sink: LaneStateSink) -> None:
        """Subscribed while the link is up: the hash first, then what is published."""
        pubsub = self._link.client.pubsub(ignore_subscribe_messages=True)
        try:
            await asyncio.wait_for(pubsub.subscribe(CHANNEL), 1.0)
            await self._send()
            await self.reread(sink)
            next_read = time.monotonic() + REREAD_INTERVAL
            while self._link.up:
                message = await asyncio.wait_for(pubsub.get_message(timeout=0.5), 1.0)
                if message is not None and message.get("type") == "message":
                    self._apply(sink, message["data"])
                if time.monotonic() >= next_read:
                    await self._send()
                    await self.reread(sink)
                    next_read = time.monotonic() + REREAD_INTERVAL
        finally:
            try:
                await asyncio.wait_for(pubsub.aclose(), 1.0)  # type: ignore[no-untyped-call]
            except Exception as exc:  # a hung Redis: the socket is dropped anyway
                log.debug("cluster: closing the subscription: %s", exc)

    async def reread(self, sink: LaneStateSink) -> None:
        stored: dict[str, str] = await self._link.run(_read_state)
        now = self._clock()
        stale = []
        for field, raw in stored.items():
            event = self._apply(sink, raw)
            if event is not None and max(event.until, event.at) < now - MAX_AGE:
                stale.append(field)
        if stale:
            await self._link.run(lambda c: c.hdel(STATE, *stale))

    def _apply(self, sink: LaneStateSink, raw: str) -> LaneEvent | None:
        try:
            event = LaneEvent.loads(raw)
        except ValueError as exc:
            log.warning("cluster: ignoring a lane event that does not parse: %s", exc)
            return None
        field = _field(event)
        if event.at <= self._seen.get(field, 0.0):
            return event  # already applied, or ours
        self._seen[field] = event.at
        if event.node != self._node:
            log.info(
                "cluster: %s %s from node %s%s",
                event.lane,
                event.kind,
                event.node,
                f": {event.reason}" if event.reason else "",
            )
            sink.apply_shared(event)
        return event
