"""Suspensions that outlive the process: a provider told to come back in 24 h stays away
through a restart.

Kept in `<spool>/state/suspensions.json`, rewritten atomically (tmp, fsync, rename) on
each change; changes are rare, so the whole file is small and cheap to rewrite.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

from relay.statefile import StateFile

log = logging.getLogger("relay.shaping")


@dataclass(frozen=True, slots=True)
class Suspension:
    until: float  # wall-clock time
    reason: str


class Suspensions:
    def __init__(self, spool_path: str) -> None:
        self._file = StateFile(os.path.join(spool_path, "state", "suspensions.json"), "suspensions")
        self._path = self._file.path
        self._entries: dict[str, Suspension] = {}

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
        self._file.save(
            {k: {"until": v.until, "reason": v.reason} for k, v in self._entries.items()}
        )

    async def flush(self) -> None:
        await self._file.flush()
