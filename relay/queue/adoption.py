"""Queueing the mail of another node's spool directory here (SPEC §9 takeover).

Each message moves into this node's spool (`Spool.take_over`: its side files copied,
then the message renamed across, the commit point) before it is queued, a chunk at a
time in a worker thread, so the event loop keeps serving while hundreds of thousands of
messages move.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterator

from relay.queue.manager import QueueManager
from relay.spool.store import Recovered, Spool

log = logging.getLogger("relay.queue")

CHUNK = 256


async def adopt(
    directory: str,
    spool: Spool,
    queue: QueueManager,
    proceed: Callable[[], Awaitable[bool]] | None = None,
) -> tuple[int, int]:
    """Move everything in `directory` into `spool` and queue it: (messages, recipients)
    queued. `proceed` is asked before each chunk (the takeover's lock and fencing
    marker); False stops there. Raises OSError/SpoolError when a file cannot be moved;
    what moved so far is queued and safe, the rest stays there for the next try."""
    source = Spool(directory)
    entries = source.recover(time.time())
    messages = recipients = 0
    while True:
        if proceed is not None and not await proceed():
            log.warning("adoption of %s stopped: no longer ours to take", directory)
            return messages, recipients
        seen, moved, error = await asyncio.to_thread(_move, spool, source, entries)
        if moved:
            queued = await queue.recover(moved)
            messages, recipients = messages + queued[0], recipients + queued[1]
        if error is not None:
            raise error  # what moved is queued; the rest stays there for the next try
        if seen < CHUNK:
            return messages, recipients


def _move(
    spool: Spool, source: Spool, entries: Iterator[Recovered]
) -> tuple[int, list[Recovered], OSError | None]:
    """Up to CHUNK messages moved: how many were looked at, those now ours, and the
    error that stopped the chunk early, if one did."""
    seen, moved = 0, []
    for entry in itertools.islice(entries, CHUNK):
        seen += 1
        try:
            if spool.take_over(source, entry):
                moved.append(entry)
        except OSError as exc:  # SpoolError included
            return seen, moved, exc
    return seen, moved, None
