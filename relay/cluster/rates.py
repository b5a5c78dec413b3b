"""GCRA rates as one budget for the whole cluster (SPEC §9).

The shaper asks a bucket synchronously (`delay`, then `take` with no await between), as
it asks the in-memory `Gcra`; a round trip to Redis cannot fit in that. So each node
*reserves* the cluster's next slot in Redis ahead of use (scripts.GCRA, "reserve"): the
shared timeline is advanced by one interval per reservation, atomically, and the node
learns when its slot falls due. `delay` is then the wait for that slot, `take` consumes
it and `refund` keeps it for the next message. Every node holds at most one reservation
per bucket, so the cluster's events are spaced exactly `period / count` apart, and a
node never waits behind a slot another node holds.

While Redis is down, the bucket is a local `Gcra` at the rate divided by the live nodes
last seen; it is back on the shared budget at the first answer.

Per-mailbox rates (`recipient_rate`, `SharedMailboxes`) are asked differently: a lane
may meet any of millions of mailboxes, so nothing can be reserved ahead. The lane asks
for a batch's recipients together, asynchronously, just before the transaction, and
one script takes each mailbox's rate or says how long it must wait (scripts.MAILBOXES).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from relay.cluster import scripts
from relay.cluster.link import RedisLink
from relay.config.units import Rate
from relay.errors import ClusterUnavailable
from relay.shaping.rate import Bucket, Gcra, Mailboxes
from relay.tasks import spawn

log = logging.getLogger("relay.cluster")

PENDING = 0.005  # the wait reported while a reservation is on its way (a round trip)


def rate_key(lane: str, name: str) -> str:
    return f"relay:rate:{lane}:{name}"


class SharedGcra:
    """A `Bucket` whose budget is the cluster's."""

    def __init__(
        self,
        link: RedisLink,
        script: Any,
        key: str,
        rate: Rate,
        live_nodes: Callable[[], int],
        clock: Callable[[], float],
    ) -> None:
        self._link = link
        self._script = script
        self._key = key
        self._rate = rate
        self._interval_ms = rate.period / rate.count * 1000
        self._live_nodes = live_nodes
        self._clock = clock
        self._slot: float | None = None  # monotonic time our reserved slot falls due
        self._fetching: set[asyncio.Task[Any]] = set()
        self._local: Gcra | None = None
        self._local_nodes = 0

    def _fallback(self) -> Gcra:
        """The local share of the rate, rebuilt when the live count changed."""
        nodes = max(1, self._live_nodes())
        if self._local is None or nodes != self._local_nodes:
            tat = self._local.tat if self._local is not None else 0.0
            self._local = Gcra(Rate(self._rate.count, self._rate.period * nodes, self._rate.text))
            self._local.tat = tat
            self._local_nodes = nodes
        return self._local

    def delay(self, now: float) -> float:
        if not self._link.up:
            return self._fallback().delay(now)
        if self._slot is not None:
            return max(0.0, self._slot - now)
        if not self._fetching:
            spawn(self._reserve(), self._fetching, f"rate {self._key}")
        return PENDING

    def take(self, now: float) -> None:
        if self._slot is not None and self._slot <= now:
            self._slot = None
        else:  # Redis went down after the wait began, or the local share allowed it
            self._fallback().take(now)

    def refund(self) -> None:
        if self._link.up:
            self._slot = self._clock()  # the slot was ours: the next message has it
        else:
            self._fallback().refund()

    def idle(self, now: float) -> bool:
        local = self._local is None or self._local.idle(now)
        return self._slot is None and not self._fetching and local

    async def _reserve(self) -> None:
        try:
            wait_ms = await self._link.run(
                lambda _: self._script(keys=[self._key], args=[self._interval_ms, 0, "reserve"])
            )
        except ClusterUnavailable:
            return  # delay() uses the local share until the link is back
        self._slot = self._clock() + float(wait_ms) / 1000


class SharedMailboxes:
    """`Mailboxes` whose budget is the cluster's: one Redis key per mailbox.

    This node also remembers when it last sent to each mailbox. While Redis is down
    that decides alone, at the rate divided by the live nodes last seen; when Redis is
    back, it is the floor the script starts from, so a mailbox written to during the
    outage (Redis never saw it) still waits its interval."""

    def __init__(
        self,
        link: RedisLink,
        script: Any,
        prefix: str,
        rate: Rate,
        live_nodes: Callable[[], int],
        clock: Callable[[], float],
        prune_above: int = 10_000,
    ) -> None:
        self._link = link
        self._script = script
        self._prefix = prefix
        self._interval = rate.period / rate.count
        self._live_nodes = live_nodes
        self._clock = clock
        self._sent: dict[str, float] = {}  # mailbox → when this node last sent to it
        self._prune_above = prune_above

    async def admit(self, keys: list[str], now: float) -> list[float]:
        if self._link.up:
            floors = [self._wait(key, now, 1) * 1000 for key in keys]
            try:
                waits = await self._link.run(
                    lambda _: self._script(
                        keys=[self._prefix + key for key in keys],
                        args=[self._interval * 1000, *floors],
                    )
                )
            except ClusterUnavailable:
                pass  # the local share decides
            else:
                sent = self._clock()
                result = [float(wait) / 1000 for wait in waits]
                for key, wait in zip(keys, result, strict=True):
                    if wait <= 0:
                        self._record(key, sent)
                return result
        share = max(1, self._live_nodes())
        result = []
        for key in keys:
            wait = self._wait(key, now, share)
            if wait <= 0:
                self._record(key, now)
            result.append(wait)
        return result

    def _wait(self, key: str, now: float, share: int) -> float:
        """Until this node may send to `key` again, by what it sent itself."""
        sent = self._sent.get(key)
        return 0.0 if sent is None else max(0.0, sent + self._interval * share - now)

    def _record(self, key: str, now: float) -> None:
        if key not in self._sent and len(self._sent) >= self._prune_above:
            horizon = self._interval * max(1, self._live_nodes())
            self._sent = {k: t for k, t in self._sent.items() if now - t < horizon}
        self._sent[key] = now

    def idle(self, now: float) -> bool:
        horizon = self._interval * max(1, self._live_nodes())
        return all(now - sent >= horizon for sent in self._sent.values())


class SharedRates:
    """Makes the buckets of each lane's shaper (`BucketFactory` per lane) and its
    mailboxes (`MailboxFactory`)."""

    def __init__(
        self, link: RedisLink, live_nodes: Callable[[], int], clock: Callable[[], float]
    ) -> None:
        self._link = link
        self._script = link.client.register_script(scripts.GCRA)
        self._mailboxes = link.client.register_script(scripts.MAILBOXES)
        self._live_nodes = live_nodes
        self._clock = clock

    def bucket(self, lane: str, name: str, rate: Rate) -> Bucket:
        return SharedGcra(
            self._link, self._script, rate_key(lane, name), rate, self._live_nodes, self._clock
        )

    def mailboxes(self, lane: str, rate: Rate) -> Mailboxes:
        return SharedMailboxes(
            self._link,
            self._mailboxes,
            rate_key(lane, "rcpt:"),
            rate,
            self._live_nodes,
            self._clock,
        )
