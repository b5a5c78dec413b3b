"""Suspensions that outlive the process: a provider told to come back in 24 h stays away
through a restart.

Kept in `<spool>/state/suspensions.json`, rewritten atomically (tmp, fsync, rename) on
each change; changes are rare, so the whole file is small and cheap to rewrite.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass

log = logging.getLogger("relay.shaping")


@dataclass(frozen=True, slots=True)
class Suspension:
    until: float  # wall-clock time
    reason: str


class Suspensions:
    def __init__(self, spool_path: str) -> None:
        self._path = os.path.join(spool_path, "state", "suspensions.json")
        self._entries: dict[str, Suspension] = {}
        self._writes: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()

    def load(self) -> dict[str, Suspension]:
        try:
            with open(self._path, encoding="utf-8") as handle:
                raw = json.load(handle)
            now = time.time()
            self._entries = {
                key: Suspension(float(v["until"]), str(v["reason"]))
                for key, v in raw.items()
                if float(v["until"]) > now
            }
        except FileNotFoundError:
            self._entries = {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("cannot read %s (%s); starting with no suspensions", self._path, exc)
            self._entries = {}
        return dict(self._entries)

    def get(self, key: str) -> Suspension | None:
        entry = self._entries.get(key)
        if entry is not None and entry.until <= time.time():
            return None
        return entry

    def set(self, key: str, until: float, reason: str) -> None:
        self._entries[key] = Suspension(until, reason)
        self._save()

    def clear(self, key: str) -> None:
        if self._entries.pop(key, None) is not None:
            self._save()

    def _save(self) -> None:
        snapshot = {k: {"until": v.until, "reason": v.reason} for k, v in self._entries.items()}
        task = asyncio.get_running_loop().create_task(self._write(snapshot))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, snapshot: dict[str, dict[str, object]]) -> None:
        async with self._lock:  # writes land in the order the changes were made
            try:
                await asyncio.to_thread(_write_atomically, self._path, snapshot)
            except OSError as exc:
                log.error("cannot save suspensions to %s: %s", self._path, exc)

    async def flush(self) -> None:
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)


def _write_atomically(path: str, data: dict[str, dict[str, object]]) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.rename(tmp, path)
    fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
