"""Connection slots, as a lane asks for them: one per connection, held from before the
connect until the socket is gone (SPEC §5).

On one node the lane's own worker count is the limit, so `LocalSlots` grants every
request. A cluster hands out leases from Redis instead (relay/cluster/leases.py): a
request may then be refused while other nodes hold the provider's slots, and a slot
may be *lost* (its lease could not be renewed), after which its connection carries no
further transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(eq=False, slots=True)
class Slot:
    key: str  # the lane's queue key: a provider, or a site under `defaults`
    lost: bool = False  # set by the lease keeper: close this connection, take no more


class Slots(Protocol):
    async def acquire(self, key: str, limit: int) -> Slot | None:
        """A slot of `key`'s `limit`, or None when all are held (try again shortly)."""
        ...

    def release(self, slot: Slot) -> None:
        """The connection's socket is gone: its slot is free."""
        ...

    async def wanted(self, slot: Slot) -> bool:
        """Someone else waits for a slot of this kind: an idle connection lets go."""
        ...


class LocalSlots:
    async def acquire(self, key: str, limit: int) -> Slot | None:
        return Slot(key)

    def release(self, slot: Slot) -> None:
        pass

    async def wanted(self, slot: Slot) -> bool:
        return False  # the lane's own workers take work from the idle ones
