"""Takeover of a dead node's spool on shared storage (SPEC §9).

With `cluster.shared_spool`, each node's spool is `<dir>/<node>`. A node is dead when
both of its signs of life are older than `takeover_after`: its Redis heartbeat and the
`alive` file it touches in its own directory every second. Both, because a node cut off
from Redis alone is alive and still delivering (SPEC §9: under local limits): the file
on the shared storage says so.

Then one live node takes the lock `spool:<node>` (relay/cluster/lock.py), writes the
`adopted` marker with the lock's fencing token into the directory, moves every message
into its own spool (relay/queue/adoption.py), marks the marker done and gives the lock
back. Before each chunk it renews the lock and reads the marker back: an adopter that
stalled past its lock and was replaced (a higher token) stops there.

The marker fences the directory's owner too: a node finds it at start and waits until
the adopter is done (then removes it). A node that finds it while running (it was frozen
long enough to be declared dead) starts no other transaction and drains: before each
transaction, a node whose last check is late reads the marker first. A transaction that
was in flight when the node froze may still finish when it wakes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from relay.cluster.lock import Held, Locks
from relay.cluster.nodes import NodeRecord, Nodes
from relay.config.model import Cluster
from relay.errors import ClusterUnavailable

log = logging.getLogger("relay.cluster")

MARKER = "adopted"  # in the adopted node's directory: {"by", "token", "at", "done"}
ALIVE = "alive"  # in each node's own directory, touched every TICK
TICK = 1.0
LOCK_TTL = 30.0  # renewed between chunks, which take well under a second each
FENCE_WAIT = 3 * TICK  # after the marker, before moving: a live owner sees it and stops

# (directory, may it go on?) → (messages, recipients) queued here
Adopt = Callable[[str, Callable[[], Awaitable[bool]]], Awaitable[tuple[int, int]]]


@dataclass(frozen=True, slots=True)
class Marker:
    by: str
    token: int
    at: float
    done: bool = False  # adopted to the end: left for the owner to find when it is back


def read_marker(directory: str) -> Marker | None:
    try:
        with open(os.path.join(directory, MARKER), encoding="utf-8") as handle:
            data = json.load(handle)
        return Marker(
            str(data["by"]), int(data["token"]), float(data["at"]), bool(data.get("done"))
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # Shared storage may answer EIO or ESTALE for a moment: nobody may take it for
        # absent (and deliver) nor for an adoption (and shut down). Callers wait.
        log.error("cluster: %s/%s unreadable (%s)", directory, MARKER, exc)
        return UNREADABLE


UNREADABLE = Marker("?", -1, 0.0)


def _write_marker(directory: str, marker: Marker) -> None:
    path = os.path.join(directory, MARKER)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(
            {"by": marker.by, "token": marker.token, "at": marker.at, "done": marker.done},
            handle,
        )
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _has_mail(directory: str) -> bool:
    messages = os.path.join(directory, "messages")
    try:
        buckets = os.listdir(messages)
    except FileNotFoundError:
        return False
    for bucket in buckets:
        try:
            if any(not name.startswith(".") for name in os.listdir(os.path.join(messages, bucket))):
                return True
        except NotADirectoryError:
            continue
    return False


class Takeover:
    def __init__(
        self,
        config: Cluster,
        nodes: Nodes,
        locks: Locks,
        adopt: Adopt,
        fenced: Callable[[str], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`fenced(why)`: this node's own directory was adopted while it ran."""
        assert config.shared_spool is not None
        self._root = config.shared_spool
        self._node = config.node
        self._after = config.takeover_after
        self._nodes = nodes
        self._locks = locks
        self._adopt = adopt
        self._fenced = fenced
        self._clock = clock
        self._own = os.path.join(self._root, self._node)
        self._empty: dict[str, float] = {}  # node → its `alive` mtime when found empty
        self.adopting: str | None = None  # for `relay cluster status`
        self._confirmed = time.monotonic()  # when our directory was last seen ours
        self._lost = False
        # node → (its `alive` mtime, our monotonic time when that mtime was first seen):
        # silence is judged by our own clock, whatever the storage's clock says.
        self._alive: dict[str, tuple[float, float]] = {}

    # this node's own directory

    def beat(self) -> None:
        """Touch the `alive` file: the shared storage's sign that this node runs."""
        path = os.path.join(self._own, ALIVE)
        try:
            os.utime(path)
        except FileNotFoundError:
            with open(path, "wb"):
                pass
        except OSError as exc:
            log.error("cluster: cannot touch %s: %s", path, exc)

    async def claim(self) -> None:
        """At start, before this node queues or takes mail: wait while a live peer is
        adopting this directory. A marker whose lock nobody holds is left by an adopter
        that died: the directory is ours again."""
        waiting = False
        while (marker := await asyncio.to_thread(read_marker, self._own)) is not None:
            if marker is UNREADABLE:
                await asyncio.sleep(TICK)
                continue
            if marker.done:
                log.warning(
                    "cluster: %s was adopted by %s while this node was away; its mail is there",
                    self._own,
                    marker.by,
                )
                await asyncio.to_thread(_remove, os.path.join(self._own, MARKER))
                break
            try:
                held = await self._locks.held(_lock_name(self._node))
            except ClusterUnavailable:
                held = True  # nobody can tell: wait for Redis
            if not held:
                log.warning(
                    "cluster: %s was being adopted by %s (token %d), who stopped; taking it back",
                    self._own,
                    marker.by,
                    marker.token,
                )
                await asyncio.to_thread(_remove, os.path.join(self._own, MARKER))
                break
            if not waiting:
                log.warning(
                    "cluster: %s is being adopted by %s; waiting until it is released",
                    self._own,
                    marker.by,
                )
                waiting = True
            await asyncio.sleep(TICK)
        if waiting:
            log.info("cluster: %s released; starting", self._own)
        await asyncio.to_thread(self.beat)

    # the dead

    async def watch_forever(self) -> None:
        """Every TICK: beat, check our own directory, look for the dead (an owned task).
        Files are touched in worker threads: shared storage may be slow to answer."""
        next_scan = 0.0
        while True:
            marker = await asyncio.to_thread(self._tick)
            if marker is not None and marker is not UNREADABLE and marker.by != self._node:
                self._lose(marker)
                return
            now = self._clock()
            if now >= next_scan:
                next_scan = now + min(self._after / 4, 5.0)
                try:
                    await self.scan()
                except ClusterUnavailable:
                    pass  # no lock without Redis: nobody adopts meanwhile
                except OSError as exc:
                    log.error("cluster: takeover scan of %s failed: %s", self._root, exc)
            await asyncio.sleep(TICK)

    def _tick(self) -> Marker | None:
        self.beat()
        marker = read_marker(self._own)
        if marker is None or marker.by == self._node:
            self._confirmed = time.monotonic()
        return marker

    def may_deliver(self) -> bool:
        """Asked before each transaction: cheap while the watcher's ticks come on time.
        A late tick means the process was frozen or starved, maybe past takeover_after:
        the marker is read here and now, before anything is sent."""
        if self._lost:
            return False
        if time.monotonic() - self._confirmed <= 2 * TICK:
            return True
        marker = read_marker(self._own)
        if marker is None or marker.by == self._node:
            self._confirmed = time.monotonic()
            return True
        if marker is not UNREADABLE:
            self._lose(marker)
        return False  # unreadable: no transaction until it can be read

    def _lose(self, marker: Marker) -> None:
        if not self._lost:
            self._lost = True
            self._fenced(f"{self._own} was adopted by {marker.by} (token {marker.token})")

    async def scan(self) -> int:
        """Adopt every dead node's directory that holds mail; how many were adopted."""
        records = {r.node: r for r in await self._nodes.records()}
        adopted = 0
        for name, directory in await asyncio.to_thread(self._dead_nodes, records):
            if await self._take(name, directory):
                adopted += 1
        return adopted

    def _dead_nodes(self, records: dict[str, NodeRecord]) -> list[tuple[str, str]]:
        found = []
        for name in sorted(os.listdir(self._root)):
            directory = os.path.join(self._root, name)
            if name == self._node or not os.path.isdir(directory):
                continue
            if self._dead(name, directory, records.get(name)):
                found.append((name, directory))
        return found

    def _silent(self, name: str, directory: str) -> tuple[float, float]:
        """How long, by our clock, the node's `alive` file has not changed, and its mtime.
        A node first looked at now counts from now."""
        try:
            mtime = os.stat(os.path.join(directory, ALIVE)).st_mtime
        except FileNotFoundError:
            mtime = 0.0
        now = time.monotonic()
        seen = self._alive.get(name)
        if seen is None or seen[0] != mtime:
            self._alive[name] = seen = (mtime, now)
        return now - seen[1], mtime

    def _dead(self, name: str, directory: str, record: NodeRecord | None) -> bool:
        silent, alive = self._silent(name, directory)  # watched at every scan, from the first
        if record is not None and (record.live or record.age < self._after):
            return False
        if silent < self._after:
            return False  # cut off from Redis, not dead: it delivers under local limits
        if self._empty.get(name) == alive:
            return False
        if not _has_mail(directory):
            self._empty[name] = alive
            return False
        return True

    async def _take(self, name: str, directory: str) -> bool:
        held = await self._locks.acquire(_lock_name(name), LOCK_TTL)
        if held is None:
            return False  # another node is on it
        mine = Marker(self._node, held.token, self._clock())
        try:
            # Judged again now that the lock is ours: the node may have come back since
            # the scan (its start waits only for a marker, and there is none yet).
            record = next((r for r in await self._nodes.records() if r.node == name), None)
            if not await asyncio.to_thread(self._dead, name, directory, record):
                return False
            current = await asyncio.to_thread(read_marker, directory)
            if current is UNREADABLE or (current is not None and current.token > held.token):
                return False  # unreadable now, or a later adopter's: ours is stale
            await asyncio.to_thread(_write_marker, directory, mine)
            # A node that started just now, before the marker, sees it within a tick
            # and starts no other transaction: only then are its files moved.
            await asyncio.sleep(FENCE_WAIT)
            if not await self._still(held, mine, directory):
                return False
            log.warning(
                "cluster: node %s silent for over %.0fs; adopting %s (token %d)",
                name,
                self._after,
                directory,
                held.token,
            )
            self.adopting = name
            started = time.monotonic()
            messages, recipients = await self._adopt(
                directory, lambda: self._still(held, mine, directory)
            )
            log.warning(
                "cluster: adopted %s: %d messages, %d recipients queued here (%.1fs)",
                directory,
                messages,
                recipients,
                time.monotonic() - started,
            )
            if await asyncio.to_thread(read_marker, directory) == mine:
                # Left, marked done: a node that was only frozen finds it and stops.
                done = Marker(mine.by, mine.token, mine.at, done=True)
                await asyncio.to_thread(_write_marker, directory, done)
            return True
        finally:
            self.adopting = None
            try:
                await self._locks.release(held)
            except ClusterUnavailable:
                pass  # it expires by itself

    async def _still(self, held: Held, mine: Marker, directory: str) -> bool:
        """Between chunks: the lock renewed and the marker still ours."""
        try:
            kept = await self._locks.keep(held, LOCK_TTL)
        except ClusterUnavailable:
            kept = False
        return kept and await asyncio.to_thread(read_marker, directory) == mine


def _lock_name(node: str) -> str:
    return f"spool:{node}"


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
