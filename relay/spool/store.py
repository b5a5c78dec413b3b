"""The durable store: a message is acknowledged only once it is on disk for good.

Writing follows the classic recipe: write a temporary file, fsync it, rename it into
place, fsync the directory (the rename itself is not durable until then). The
directory fsync is shared: every rename made before a directory sync starts is covered
by it, so concurrent sessions pay one directory fsync between them (group commit). A
progress log is appended to in place, but the append that creates it makes a new name
too, and syncs the directory the same way.
File fsyncs run in worker threads, where the filesystem coalesces concurrent ones into
one journal commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import random
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from relay.errors import SpoolCorrupt, SpoolError
from relay.spool.records import Envelope, StateRecord, decode_header, encode_header

log = logging.getLogger("relay.spool")

_MESSAGES = "messages"
_QUARANTINE = "quarantine"
_STATE_SUFFIX = ".st"
_HOLD_SUFFIX = ".hold"
EVENTS_SUFFIX = ".ev"  # the message's timeline (relay/history): not the spool's to remove
_TMP_PREFIX = ".tmp-"
_ID_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXYZ"
INLINE_READ = 64 * 1024


@dataclass(frozen=True, slots=True)
class Recovered:
    envelope: Envelope
    body_offset: int
    records: list[StateRecord]
    held: bool = False
    size: int = 0
    mtime: float = 0.0
    hold_reason: str = ""  # while held: "admin" or "guard" (the account guard's)


class _GroupSync:
    """Group commit for directory fsyncs, in the worker threads that write the files.

    A thread that has renamed its file asks for a sync of the directory; if a sync that
    started after its rename has finished meanwhile, it is covered and returns at once.
    Under load one fsync covers every file renamed before it began, and the file write
    and its directory sync cost one trip to a worker thread, not two.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dirs: dict[str, tuple[threading.Lock, list[int]]] = {}
        self._creating: dict[str, int] = {}  # path → creations whose sync is not yet done

    def sync(self, directory: str) -> None:
        with self._lock:
            entry = self._dirs.get(directory)
            if entry is None:
                entry = self._dirs[directory] = (threading.Lock(), [0, 0])
            lock, counters = entry  # [renames asked for, renames covered by a sync]
            counters[0] += 1
            mine = counters[0]
        with lock:
            if counters[1] >= mine:
                return
            with self._lock:
                upto = counters[0]
            _fsync_dir(directory)
            counters[1] = upto

    def creating(self, path: str) -> None:
        """Announce a file about to be created, before its name can appear."""
        with self._lock:
            self._creating[path] = self._creating.get(path, 0) + 1

    def created(self, path: str) -> None:
        """The creation announced is over: synced, or failed."""
        with self._lock:
            left = self._creating.pop(path) - 1
            if left:
                self._creating[path] = left

    def pending(self, path: str) -> bool:
        """Is `path` a name that may not be durable yet (its creator has not synced)?"""
        with self._lock:
            return path in self._creating


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(
    tmp_path: str, final_path: str, chunks: tuple[bytes, ...], dirsync: _GroupSync
) -> None:
    try:
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp_path, final_path)
    except BaseException:
        try:
            os.unlink(tmp_path)
        except OSError:
            pass
        raise
    dirsync.sync(os.path.dirname(final_path))


def _append_durably(path: str, data: bytes, dirsync: _GroupSync) -> None:
    """Append and fsync. The append that creates the file also syncs its directory: an
    fsync of the file does not make its new name durable (fsync(2)), and a crash would
    lose the log with every outcome in it, repeating those deliveries. An append that
    finds the file before its creator has synced the directory waits for a sync too:
    its own record is in that file."""
    flags = os.O_WRONLY | os.O_APPEND
    directory = os.path.dirname(path)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        dirsync.creating(path)
        try:
            fd = os.open(path, flags | os.O_CREAT, 0o600)
            _write_synced(fd, data)
            dirsync.sync(directory)
        finally:
            dirsync.created(path)
        return
    _write_synced(fd, data)
    if dirsync.pending(path):
        dirsync.sync(directory)


def _write_synced(fd: int, data: bytes) -> None:
    """Write all of `data` at the end of the file, fsync, close."""
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_synced(paths: tuple[str, ...], dirsync: _GroupSync) -> int | None:
    """Remove files of one directory, then sync it; the first one's size, or None if it
    was gone already.

    Run in a thread: unlinking a file just written can wait on the filesystem journal.
    """
    size: int | None = None
    for n, path in enumerate(paths):
        try:
            if n == 0:
                size = os.stat(path).st_size
            os.unlink(path)
        except FileNotFoundError:
            pass
    dirsync.sync(os.path.dirname(paths[0]))
    return size


class Spool:
    """Files under `path`/messages/XX/, XX the last two characters of the id."""

    def __init__(self, path: str, writer: int = 0) -> None:
        """`writer` 0 is the main process, 1 the listener process: their ids never meet."""
        self.path = os.path.abspath(path)
        self._writer = writer
        self.messages_dir = os.path.join(self.path, _MESSAGES)
        self.quarantine_dir = os.path.join(self.path, _QUARANTINE)
        self._dirsync = _GroupSync()
        self._counter = 0
        self._buckets: set[str] = set()
        self.messages = 0  # files in the spool, and their bytes: relay_spool_* gauges
        self.bytes = 0
        self.quarantined = 0

    def open(self) -> None:
        """Create the layout; fail with a clear SpoolError if the path is unusable."""
        try:
            os.makedirs(self.messages_dir, mode=0o700, exist_ok=True)
            os.makedirs(self.quarantine_dir, mode=0o700, exist_ok=True)
            probe = os.path.join(self.path, f"{_TMP_PREFIX}probe-{os.getpid()}")
            with open(probe, "wb") as handle:
                handle.write(b"ok")
            os.unlink(probe)
        except OSError as exc:
            raise SpoolError(
                exc.errno, f"spool.path: {self.path} is not writable: {exc.strerror}"
            ) from exc

    def new_id(self) -> str:
        """Sortable by arrival, unique across restarts: time, counter, randomness."""
        self._counter = (self._counter + 1) % 512
        stamp = int(time.time() * 1000) * 1024 + self._writer * 512 + self._counter
        text = ""
        while stamp:
            stamp, digit = divmod(stamp, len(_ID_ALPHABET))
            text = _ID_ALPHABET[digit] + text
        suffix = "".join(random.choices(_ID_ALPHABET, k=4))  # unique, not secret
        return text + suffix

    def _dir(self, message_id: str) -> str:
        return os.path.join(self.messages_dir, message_id[-2:])

    def message_path(self, message_id: str) -> str:
        return os.path.join(self._dir(message_id), message_id)

    def events_path(self, message_id: str) -> str:
        """The message's timeline, beside it (records.py has the format)."""
        return self.message_path(message_id) + EVENTS_SUFFIX

    async def store(self, envelope: Envelope, message: bytes) -> int:
        """Make the message durable; return the body offset. Raises SpoolError."""
        directory = self._dir(envelope.id)
        header = encode_header(envelope)
        try:
            if directory not in self._buckets:
                # at most 1,024 buckets: the stat and mkdir happen once each per run
                await asyncio.to_thread(self._make_bucket, directory)
                self._buckets.add(directory)
            await asyncio.to_thread(
                _write_durably,
                os.path.join(directory, _TMP_PREFIX + envelope.id),
                os.path.join(directory, envelope.id),
                (header, message),
                self._dirsync,
            )
        except OSError as exc:
            if isinstance(exc, SpoolError):
                raise
            reason = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror
            raise SpoolError(exc.errno, f"cannot store {envelope.id}: {reason}") from exc
        self.messages += 1
        self.bytes += len(header) + len(message)
        return len(header)

    def _make_bucket(self, directory: str) -> None:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._dirsync.sync(self.messages_dir)

    async def record(self, message_id: str, records: list[StateRecord]) -> None:
        """Append recipient progress durably."""
        data = b"".join(record.encode() for record in records)
        path = self.message_path(message_id) + _STATE_SUFFIX
        try:
            await asyncio.to_thread(_append_durably, path, data, self._dirsync)
        except OSError as exc:
            raise SpoolError(
                exc.errno, f"cannot record state of {message_id}: {exc.strerror}"
            ) from exc

    async def remove(self, message_id: str) -> None:
        """Forget a message whose every recipient is final (message first, then its log)."""
        path = self.message_path(message_id)
        try:
            size = await asyncio.to_thread(
                _unlink_synced, (path, path + _STATE_SUFFIX, path + _HOLD_SUFFIX), self._dirsync
            )
        except OSError as exc:
            raise SpoolError(exc.errno, f"cannot remove {message_id}: {exc.strerror}") from exc
        if size is not None:
            self.messages -= 1
            self.bytes -= size

    async def set_held(self, message_id: str, held: bool, reason: str = "admin") -> None:
        """Hold survives a restart: a marker file beside the message, saying who held it
        ("held" for an admin, as before reasons were kept; else the reason)."""
        marker = self.message_path(message_id) + _HOLD_SUFFIX
        content = b"held\n" if reason == "admin" else reason.encode("ascii") + b"\n"
        try:
            if held:
                tmp = os.path.join(self._dir(message_id), _TMP_PREFIX + message_id + _HOLD_SUFFIX)
                await asyncio.to_thread(_write_durably, tmp, marker, (content,), self._dirsync)
            else:
                await asyncio.to_thread(_unlink_synced, (marker,), self._dirsync)
        except OSError as exc:
            raise SpoolError(exc.errno, f"cannot mark {message_id}: {exc.strerror}") from exc

    def read_message(self, message_id: str, body_offset: int, limit: int = -1) -> bytes:
        try:
            with open(self.message_path(message_id), "rb") as handle:
                handle.seek(body_offset)
                return handle.read(limit)
        except OSError as exc:
            raise SpoolError(exc.errno, f"cannot read {message_id}: {exc.strerror}") from exc

    async def load_message(self, message_id: str, body_offset: int, size: int) -> bytes:
        """The body of a message of `size` bytes. Up to INLINE_READ it is read right here:
        mail delivered soon after it came is in the page cache, and a trip to a worker
        thread would cost more than the read."""
        if size <= INLINE_READ:
            return self.read_message(message_id, body_offset)
        return await asyncio.to_thread(self.read_message, message_id, body_offset)

    def note_stored(self, size: int) -> None:
        """Count a message another process stored, or one found at recovery."""
        self.messages += 1
        self.bytes += size

    def recover(self, stale_before: float) -> Iterator[Recovered]:
        """Every message written before `stale_before` (a time.time()), with its progress;
        corrupt entries are quarantined.

        The listener process may be writing while this runs: what it writes from then
        on it reports itself, and a temporary file is an abandoned write only if older.
        """
        if not os.path.isdir(self.messages_dir):
            return
        for bucket in sorted(os.listdir(self.messages_dir)):
            directory = os.path.join(self.messages_dir, bucket)
            if not os.path.isdir(directory):
                continue
            names = set(os.listdir(directory))
            for name in sorted(names):
                path = os.path.join(directory, name)
                if name.startswith(_TMP_PREFIX):
                    with contextlib.suppress(FileNotFoundError):
                        if os.stat(path).st_mtime < stale_before:
                            os.unlink(path)  # never acknowledged: the client got no 250
                    continue
                suffix = next(
                    (s for s in (_STATE_SUFFIX, _HOLD_SUFFIX, EVENTS_SUFFIX) if name.endswith(s)),
                    "",
                )
                if suffix:
                    if name[: -len(suffix)] not in names:
                        # Its message was removed and the log outlived it (a timeline too:
                        # history imports it before, unless we crashed), or a take-over
                        # cut short left it. One written since `stale_before` may be a
                        # take-over in progress, whose message arrives last: kept.
                        with contextlib.suppress(FileNotFoundError):
                            if os.stat(path).st_mtime < stale_before:
                                os.unlink(path)
                    continue
                try:
                    recovered = self._load(path, names)
                    if recovered.mtime < stale_before:
                        yield recovered
                except FileNotFoundError:
                    continue  # delivered and removed since the directory was listed
                except SpoolCorrupt as exc:
                    self.quarantine(name, str(exc), path)
                except OSError as exc:
                    log.error("spool: cannot read %s: %s", path, exc)

    def _load(self, path: str, names: set[str]) -> Recovered:
        with open(path, "rb") as handle:
            head = handle.read(8192)
            parsed = decode_header(head)
            while isinstance(parsed, int):
                more = handle.read(parsed - len(head))
                if not more:
                    raise SpoolCorrupt("truncated header")
                head += more
                parsed = decode_header(head)
            envelope, offset = parsed
            stat = os.fstat(handle.fileno())
            size = stat.st_size
        if size != offset + envelope.size:
            raise SpoolCorrupt(f"body is {size - offset} bytes, envelope says {envelope.size}")
        records: list[StateRecord] = []
        state_name = os.path.basename(path) + _STATE_SUFFIX
        if state_name in names:
            with open(path + _STATE_SUFFIX, "rb") as handle:
                records = StateRecord.decode_log(handle.read())
        held = os.path.basename(path) + _HOLD_SUFFIX in names
        reason = _hold_reason(path + _HOLD_SUFFIX) if held else ""
        return Recovered(envelope, offset, records, held, size, stat.st_mtime, reason)

    def quarantine(self, message_id: str, reason: str, path: str | None = None) -> None:
        """Move a damaged entry aside: never delivered, never blocking startup."""
        source = path or self.message_path(message_id)
        target = os.path.join(self.quarantine_dir, message_id)
        log.error("spool: quarantined %s (%s) to %s", message_id, reason, target)
        self.quarantined += 1
        for suffix in ("", _STATE_SUFFIX):
            if os.path.exists(source + suffix):
                shutil.move(source + suffix, target + suffix)

    # taking over another node's spool (SPEC §9)

    def take_over(self, source: Spool, recovered: Recovered) -> bool:
        """Move one message of `source` into this spool; blocking (run it in a thread).
        False when it is no longer there (another node took it first).

        The message keeps its ID. Its progress log, hold mark and timeline are copied
        first; then the message file itself is renamed across (every node's spool is a
        directory of one shared filesystem). That rename is the commit point and it is
        atomic: at every moment exactly one spool holds the message, and of two nodes
        racing for it only one gets it. Side files copied by the loser, or by a move cut
        short before the rename, have no message beside them: recovery drops them. The
        original's side files go last. The caller queues the message, and counts it in
        this spool's gauges then (`note_stored`), as recovery does.
        """
        message_id = recovered.envelope.id
        origin, target = source.message_path(message_id), self.message_path(message_id)
        if os.path.exists(target):
            raise SpoolError(
                errno.EEXIST, f"cannot take {message_id}: a message with that ID is here already"
            )
        directory = self._dir(message_id)
        if directory not in self._buckets:
            self._make_bucket(directory)
            self._buckets.add(directory)
        sides = (_STATE_SUFFIX, _HOLD_SUFFIX, EVENTS_SUFFIX)
        for suffix in sides:
            try:
                with open(origin + suffix, "rb") as handle:
                    data = handle.read()
            except FileNotFoundError:
                continue
            tmp = os.path.join(directory, _TMP_PREFIX + message_id + suffix)
            _write_durably(tmp, target + suffix, (data,), self._dirsync)
        try:
            os.rename(origin, target)
        except FileNotFoundError:
            _unlink_synced(tuple(target + suffix for suffix in sides), self._dirsync)
            return False
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                raise SpoolError(
                    exc.errno,
                    f"cannot take {message_id}: {source.path} and {self.path} are not on one "
                    "filesystem (cluster.shared_spool must be a single mount)",
                ) from exc
            raise
        self._dirsync.sync(directory)
        _unlink_synced(tuple(origin + suffix for suffix in ("", *sides)), source._dirsync)
        return True


def _hold_reason(marker: str) -> str:
    """Who held a message, from its marker: "guard", or "admin" (marker "held")."""
    try:
        with open(marker, "rb") as handle:
            word = handle.read(64).strip()
    except OSError:
        return "admin"  # unreadable (or released since the directory was listed): held
    return "guard" if word == b"guard" else "admin"
