"""Small JSON state files in the spool's `state/` directory (suspensions, MTA-STS policies).

Each change rewrites the whole file atomically (tmp, fsync, rename, fsync the
directory), so a crash leaves the old or the new one, never a mix. Writes run in a
thread, in the order the changes were made; a failed write is logged, and the state in
memory stays true until the next change writes it again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

log = logging.getLogger("relay")


class StateFile:
    def __init__(self, path: str, what: str) -> None:
        self.path = path
        self._what = what  # for the log: "suspensions", "MTA-STS policies"
        self._writes: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()

    def save(self, snapshot: dict[str, Any]) -> None:
        """Write `snapshot` soon, after any write already under way."""
        task = asyncio.get_running_loop().create_task(self._write(snapshot))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, snapshot: dict[str, Any]) -> None:
        async with self._lock:  # writes land in the order the changes were made
            try:
                await asyncio.to_thread(_write_atomically, self.path, snapshot)
            except OSError as exc:
                log.error("cannot save %s to %s: %s", self._what, self.path, exc)

    async def flush(self) -> None:
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)


def _write_atomically(path: str, data: dict[str, Any]) -> None:
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
