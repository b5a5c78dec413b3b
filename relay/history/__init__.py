"""A message's whole story: its timeline while queued, its history once finished.

    listener (arrival) ─▶ app ─┐
    queue manager, outcomes ───┴─record/finish─▶ Writer thread
                    queued more than a few seconds: ─append─▶ <spool>/messages/XX/<id>.ev
                    finished: buffer (+ file, then removed) ─▶ <spool>/history.sqlite (WAL)
    admin API ◀── timeline (file + what waits) / find, get (worker threads, SQLite)

Timelines live on disk, not in memory: a message queued longer than a few seconds has
its events in its file (a million queued recipients cost nothing more here), and one
delivered at once goes to history without a file ever being made. events.py lists the
kinds, writer.py the thread, records.py the file, db.py the database. History is kept
`history.retain` and pruned in the background.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import Callable
from typing import Any

from relay.clock import SYSTEM_CLOCK, Clock
from relay.history import db, events
from relay.history.events import Event
from relay.history.writer import Writer

log = logging.getLogger("relay.history")

PRUNE_EVERY = 600.0  # seconds; and once at start


class History:
    """The daemon's side: a Recorder for the queue, and lookups for the admin API."""

    def __init__(
        self, spool_path: str, events_path: Callable[[str], str], clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self._spool_path = spool_path
        self._events_path = events_path
        self._clock = clock
        self.db_path: str | None = None  # set by open(): None while unusable
        # The queue's Recorder: handed to it at construction, started by open().
        self.writer = Writer(events_path)

    def open(self) -> None:
        """Make the database if needed and start the writer. A database that cannot be
        opened costs history, never mail: the error is logged and timelines go on."""
        path = os.path.join(self._spool_path, db.FILE)
        try:
            db.connect(path).close()
            self.db_path = path
        except sqlite3.Error as exc:
            log.error("history %s unusable (%s): finished mail is not kept", path, exc)
        self.writer.start(self.db_path)

    async def close(self) -> None:
        await asyncio.to_thread(self.writer.close)

    # reading

    def timeline(self, message_id: str) -> list[Event]:
        """A queued message's events so far, oldest first (a small file, read here)."""
        pending = self.writer.pending(message_id)
        written = events.read(self._events_path(message_id))
        seen = {events.encode(e) for e in written}
        merged = written + [e for e in pending if events.encode(e) not in seen]
        merged.sort(key=lambda e: float(e["time"]))
        return merged

    async def get(self, message_id: str) -> dict[str, Any] | None:
        """A finished message with its timeline, or None."""
        path = self.db_path
        if path is None:
            return None

        def query() -> dict[str, Any] | None:
            connection = db.connect(path)
            try:
                return db.get(connection, message_id)
            finally:
                connection.close()

        return await asyncio.to_thread(query)

    async def find(
        self,
        *,
        to: str | None = None,
        sender: str | None = None,
        within: float | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Finished messages to or from an address (case-insensitive), finished in the
        last `within` seconds (None: all that is kept), newest first."""
        path = self.db_path
        if path is None:
            return []
        since = self._clock.time() - within if within is not None else None

        def query() -> list[dict[str, Any]]:
            connection = db.connect(path)
            try:
                return db.find(connection, to=to, sender=sender, since=since, limit=limit)
            finally:
                connection.close()

        return await asyncio.to_thread(query)

    # retention

    async def prune_forever(self, retain: Callable[[], float]) -> None:
        """Forget what is older than `retain()` (history.retain, read each time: a reload
        changes it), now and every PRUNE_EVERY seconds."""
        while True:
            self.writer.prune(self._clock.time() - retain())
            await asyncio.sleep(PRUNE_EVERY)
