"""Every message in the queue by ID, and in arrival order for paging.

Queue IDs sort by arrival, so new ones append to `_order`; removed IDs are skipped and
compacted away once they are the majority. A page is a bisect and a short scan, cheap
with a million messages.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

from relay.queue.models import QueuedMessage


class Registry:
    def __init__(self) -> None:
        self.messages: dict[str, QueuedMessage] = {}
        self._order: list[str] = []
        self._sorted = True

    def add(self, message: QueuedMessage) -> None:
        if message.id in self.messages:
            return
        self.messages[message.id] = message
        if self._order and message.id < self._order[-1]:
            self._sorted = False
        self._order.append(message.id)

    def remove(self, message_id: str) -> None:
        if (
            self.messages.pop(message_id, None) is not None
            and len(self._order) > 1024
            and len(self._order) > 2 * len(self.messages)
        ):
            self._order = [i for i in self._order if i in self.messages]

    def get(self, message_id: str) -> QueuedMessage | None:
        return self.messages.get(message_id)

    def __len__(self) -> int:
        return len(self.messages)

    def page(
        self,
        after: str | None,
        limit: int,
        accept: Callable[[QueuedMessage], bool],
        scan_limit: int = 50_000,
    ) -> tuple[list[QueuedMessage], str | None]:
        """Up to `limit` accepted messages after ID `after`; and the cursor to continue
        (None at the end). At most `scan_limit` entries are looked at per call."""
        if not self._sorted:
            self._order = sorted(i for i in self._order if i in self.messages)
            self._sorted = True
        start = bisect.bisect_right(self._order, after) if after else 0
        found: list[QueuedMessage] = []
        position = start
        for position in range(start, min(len(self._order), start + scan_limit)):
            message = self.messages.get(self._order[position])
            if message is not None and accept(message):
                found.append(message)
                if len(found) >= limit:
                    break
        else:
            position = min(len(self._order), start + scan_limit) - 1
        last = position + 1 >= len(self._order)
        cursor = None if last else self._order[position]
        return found, cursor
