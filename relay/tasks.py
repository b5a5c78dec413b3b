"""Background tasks that are owned and whose failure is seen.

`spawn` keeps a strong reference in the owner's set until the task ends (asyncio keeps
only a weak one) and logs any exception the task ends with: a task that dies silently
leaves its work nowhere.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger("relay")

T = TypeVar("T")


def spawn(
    coro: Coroutine[Any, Any, T], owner: set[asyncio.Task[Any]], name: str
) -> asyncio.Task[T]:
    task = asyncio.create_task(coro, name=name)
    owner.add(task)

    def finished(done: asyncio.Task[T]) -> None:
        owner.discard(done)
        if not done.cancelled() and done.exception() is not None:
            log.error("background task %r failed", name, exc_info=done.exception())

    task.add_done_callback(finished)
    return task


async def wait_all(owner: set[asyncio.Task[Any]]) -> None:
    """Until every task in `owner` (including ones added meanwhile) has ended."""
    while owner:
        await asyncio.wait(list(owner))
