"""The one thread that writes timelines and history, so the event loop never waits on
a file or an SQLite commit.

The event loop hands it events and finished messages (`record`, `finish`: an append to
a deque, nothing more) and goes on. The thread works in rounds, at most every `ROUND`
seconds (a group commit: under load a round carries hundreds of messages):

1. New events wait in the thread's buffer, per message, for `SPILL_AFTER` seconds.
2. A message that finished meanwhile (most do, within a second) goes to SQLite with its
   events straight from the buffer: no file is ever made for it. With the ones of its
   round, in one transaction.
3. A message still queued after `SPILL_AFTER` has its events appended to its timeline
   file beside it in the spool (`<id>.ev`), and from then on they live on disk, not in
   memory. When it finishes, the file is read back into its history row and removed.

What waits is bounded: past `MAX_BUFFERED` events the oldest are written out early, and
past `MAX_QUEUED` unprocessed ones new events are dropped and the log says so.
"""

from __future__ import annotations

import collections
import logging
import operator
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from relay.history import db
from relay.history.events import ENCODER, MAX_READ, Event, Finished, decode, encode
from relay.history.events import finished as _finished
from relay.queue.models import QueuedMessage

log = logging.getLogger("relay.history")

ROUND = 0.5  # seconds a round waits for more work before it writes
CHUNK = 32  # work items or messages between two chances for the event loop (below)
SPILL_AFTER = 5.0  # seconds an event may stay in memory before it goes to its file
MAX_BUFFERED = 20_000  # events in memory (a few MiB); past it, the oldest go to their files
MAX_QUEUED = 50_000  # handed over and not yet taken by the thread; past it, dropped

_WHEN = operator.itemgetter("time")  # every event's time is a number (decode() sees to it)

# One piece of work, in the order it was handed over: events of a message, a finished
# message, or a pruning deadline.
_Work = tuple[str, Any, Any]


class Writer:
    def __init__(self, events_path: Callable[[str], str], spill_after: float = SPILL_AFTER) -> None:
        """`events_path(id)`: the message's timeline file, beside it in the spool. What
        is handed over before `start` waits for it."""
        self._events_path = events_path
        self._db_path: str | None = None
        self._spill_after = spill_after
        self._work: collections.deque[_Work] = collections.deque()
        self._wake = threading.Event()
        self._idle = False
        self._closing = False
        self._dropped = 0
        # The thread's own, but read by `pending` (queue show): under the lock.
        self._lock = threading.Lock()
        self._buffer: dict[str, list[Event]] = {}  # by first-buffered time, oldest first
        self._since: dict[str, float] = {}  # monotonic time of each message's first one
        self._buffered = 0
        self._prune_before: float | None = None  # a pruning under way, a chunk a round
        self._pruned = 0
        # Messages received before this (wall clock) may have a timeline file: those of
        # an earlier run, and any written early because the buffer was full.
        self._filed_before = time.time()
        self._thread = threading.Thread(target=self._run, name="relay-history", daemon=True)

    def start(self, db_path: str | None) -> None:
        """`db_path` None: timelines only, no history (the database could not be
        opened)."""
        self._db_path = db_path
        self._thread.start()

    # from the event loop (a Recorder): an append and, when the thread sleeps, a wake-up

    def record(self, message_id: str, *events: Event) -> None:
        if len(self._work) >= MAX_QUEUED:  # behind, or stopped by a fault
            self._dropped += 1
            return
        self._work.append(("events", message_id, events))
        if self._idle:
            self._wake.set()

    def finish(
        self,
        message: QueuedMessage,
        now: float,
        status: str | None = None,
        last: tuple[Event, ...] = (),
    ) -> None:
        if len(self._work) >= MAX_QUEUED:
            self._dropped += 1
            return
        self._work.append(("finished", message, (now, status, last)))
        if self._idle:
            self._wake.set()

    def prune(self, before: float) -> None:
        self._work.append(("prune", before, None))
        if self._idle:
            self._wake.set()

    def pending(self, message_id: str) -> list[Event]:
        """Events of `message_id` not yet in its file. Taken before the file is read: an
        event written out meanwhile is then seen twice (the reader removes the copy),
        never missed."""
        handed = list(self._work)  # one C call: no other thread runs meanwhile
        with self._lock:
            buffered = list(self._buffer.get(message_id, ()))
        for kind, subject, events in handed:
            if kind == "events" and subject == message_id:
                buffered.extend(events)
        return buffered

    def close(self, timeout: float = 30.0) -> None:
        """Write everything out, then stop (from a worker thread, at shutdown)."""
        self._closing = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # the thread

    def _run(self) -> None:
        connection = self._connect()
        try:
            while True:
                self._sleep()
                if not self._closing:
                    time.sleep(ROUND)  # let the round fill: fewer, larger commits
                closing = self._closing
                self._round(connection, flush=closing)
                if closing and not self._work:
                    return
        except Exception:
            # A bug here must not pass silently: the log says so, and mail flows on. What
            # is handed over from now on stays under MAX_QUEUED, then is dropped.
            log.exception("history writer stopped; timelines and history are no longer kept")
        finally:
            if connection is not None:
                connection.close()

    def _sleep(self) -> None:
        """Until there is work, or the oldest buffered event is due for its file (or at
        once while a pruning goes on)."""
        self._idle = True
        if not self._work and not self._closing and self._prune_before is None:
            oldest = next(iter(self._since.values()), None)
            timeout = (
                None if oldest is None else max(0.0, oldest + self._spill_after - time.monotonic())
            )
            self._wake.wait(timeout)
        self._wake.clear()
        self._idle = False

    def _round(self, connection: sqlite3.Connection | None, flush: bool) -> None:
        handed: list[tuple[QueuedMessage, float, str | None, tuple[Event, ...]]] = []
        before: float | None = None
        work, buffer, since = self._work, self._buffer, self._since
        while work:
            now = time.monotonic()
            with self._lock:
                for _ in range(CHUNK):
                    if not work:
                        break
                    kind, subject, events = work.popleft()
                    if kind == "events":
                        waiting = buffer.get(subject)
                        if waiting is None:
                            buffer[subject] = list(events)
                            since[subject] = now
                        else:
                            waiting.extend(events)
                        self._buffered += len(events)
                    elif kind == "finished":
                        handed.append((subject, *events))
                    else:
                        before = subject
            _let_the_loop_run()
        dropped, self._dropped = self._dropped, 0
        finished = []
        for n, (message, now, status, last) in enumerate(handed, 1):
            finished.append(_finished(message, now, status, last))
            if n % CHUNK == 0:
                _let_the_loop_run()
        if dropped:
            log.warning("history writer behind: %d timeline records dropped", dropped)
        if finished:
            self._import(connection, finished)
        self._spill(flush)
        if before is not None:
            self._prune_before = before
        if self._prune_before is not None and connection is not None:
            self._prune(connection, self._prune_before)

    def _connect(self) -> sqlite3.Connection | None:
        if self._db_path is None:
            return None
        try:
            return db.connect(self._db_path)
        except sqlite3.Error as exc:
            log.error("history %s unusable (%s): finished mail is not kept", self._db_path, exc)
            return None

    def _take(self, message_id: str) -> list[Event]:
        with self._lock:
            events = self._buffer.pop(message_id, [])
            self._since.pop(message_id, None)
            self._buffered -= len(events)
        return events

    def _spill(self, everything: bool) -> None:
        """Buffered events of messages still queued go to their files: those buffered
        longer than SPILL_AFTER, the oldest while too many are, all at shutdown."""
        due = time.monotonic() - self._spill_after
        while self._since:
            message_id, since = next(iter(self._since.items()))
            if not everything and since > due:
                if self._buffered <= MAX_BUFFERED:
                    return
                self._filed_before = time.time()
            lines = b"".join(encode(e) for e in self._take(message_id))
            path = self._events_path(message_id)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, lines)
                finally:
                    os.close(fd)
            except OSError as exc:
                log.warning("timeline of %s not written: %s", message_id, exc.strerror)

    def _import(self, connection: sqlite3.Connection | None, finished: list[Finished]) -> None:
        rows: list[tuple[Finished, str]] = []
        spilled = []
        for record in finished:
            if not self._may_have_file(record):
                rows.append((record, self._timeline([], record)))
                continue
            path = self._events_path(record.id)
            try:
                with open(path, "rb") as handle:
                    written = decode(handle.read(MAX_READ))
                spilled.append(path)
            except FileNotFoundError:
                written = []  # it finished before its events had to go to a file
            except OSError as exc:
                log.warning("timeline of %s not readable: %s", record.id, exc.strerror)
                written = []
            rows.append((record, self._timeline(written, record)))
            if len(rows) % CHUNK == 0:
                _let_the_loop_run()
        if connection is not None:
            try:
                db.insert(connection, rows)
            except sqlite3.Error as exc:
                log.error("history: %d finished messages not recorded: %s", len(rows), exc)
        # Removed only once imported: a crash before leaves the file to the spool's
        # recovery, which removes a timeline whose message is gone.
        for path in spilled:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("timeline %s not removed: %s", path, exc.strerror)

    def _may_have_file(self, record: Finished) -> bool:
        """Whether its events may have gone to a file: it waited long enough, or came
        before this start or before the buffer last overflowed. The others are most
        messages, and looking for a file costs each of them a system call for nothing."""
        return (
            record.finished_at - record.received_at >= self._spill_after / 2
            or record.received_at <= self._filed_before
        )

    def _timeline(self, written: list[Event], record: Finished) -> str:
        timeline = [*written, *self._take(record.id), *record.last]
        timeline.sort(key=_WHEN)
        return ENCODER.encode(timeline)

    def _prune(self, connection: sqlite3.Connection, before: float) -> None:
        """One chunk a round: forgetting a week of a busy relay's history takes many, and
        new history keeps being written meanwhile."""
        try:
            removed = db.prune(connection, before, chunks=1)
        except sqlite3.Error as exc:
            log.error("history not pruned: %s", exc)
            self._prune_before = None
            return
        self._pruned += removed
        if removed < db.PRUNE_CHUNK:
            if self._pruned:
                log.info("history: %d messages past history.retain forgotten", self._pruned)
            self._prune_before, self._pruned = None, 0


def _let_the_loop_run() -> None:
    """Hand Python's lock to the event loop's thread now, if it waits for it. Without
    this, a round's Python work (a few milliseconds under load) would hold the loop up
    until the interpreter's switch interval forces a handover: `sleep(0)` releases the
    lock, and the loop, which releases it at each of its own system calls, hands it back
    within microseconds."""
    time.sleep(0)
