"""Run the daemon's coroutine on uvloop when it is installed (the `fast` extra).

uvloop's C event loop spends less per socket event than asyncio's selector loop;
with relay's one loop per process that is throughput (see docs/performance.md).
RELAY_EVENT_LOOP=asyncio forces the standard loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    if os.environ.get("RELAY_EVENT_LOOP", "auto") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return new_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=factory()) as runner:
        return runner.run(main)
