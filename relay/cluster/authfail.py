"""AUTH failures counted by the whole cluster (SPEC §9), for the listener process.

The local counter (`LocalAuthFailures`) stays the authority for each decision and for
the delays; Redis adds what the other nodes saw: a guesser spreading attempts over
several nodes meets the same lockout as one who stays on one. The Redis side is
consulted only before a password check, bounded by a short timeout, and skipped while
the link is down, so it is never on the path of a 250 and a slow Redis costs at most
LOOKUP_BUDGET (50 ms) on an AUTH; failures are added to it in the background.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import Any

from relay.cluster import scripts
from relay.cluster.link import RedisLink, best_effort
from relay.errors import ClusterUnavailable
from relay.listener.abuse import (
    ACCOUNT_LOCKOUT_AFTER,
    AUTH_WINDOW,
    IP_LOCKOUT_AFTER,
    LocalAuthFailures,
    account_key,
)
from relay.tasks import spawn

log = logging.getLogger("relay.cluster")

# The most an AUTH waits for the cluster's counts (a GET on a LAN takes well under a
# millisecond); past it, the local count decides, and the link's own probe finds out
# whether Redis is down.
LOOKUP_BUDGET = 0.05


def _ip(ip: str) -> str:
    return f"relay:auth:ip:{ip}"


def _account(name: str) -> str:
    return f"relay:auth:account:{name}"


class SharedAuthFailures:
    """`AuthFailures` (relay/listener/abuse.py) with the cluster's counts added."""

    def __init__(self, local: LocalAuthFailures, link: RedisLink) -> None:
        self._local = local
        self._link = link
        self._count = link.client.register_script(scripts.COUNT_FAILURE)
        self._tasks: set[asyncio.Task[Any]] = set()

    async def attempt(self, ip: str, account: str) -> bool:
        if await self._locked_elsewhere(ip, account_key(account)):
            return False
        return await self._local.attempt(ip, account)

    async def failed(self, ip: str, account: str) -> int:
        failures = await self._local.failed(ip, account)
        name = account_key(account)
        window = int(AUTH_WINDOW * 1000)
        for key in (_ip(ip), _account(name)):
            spawn(
                best_effort(self._link, partial(self._add, key, window)),
                self._tasks,
                "auth failure count",
            )
        return failures

    async def _add(self, key: str, window_ms: int, _: Any) -> None:
        await self._count(keys=[key], args=[window_ms])

    async def passed(self, ip: str, account: str) -> None:
        await self._local.passed(ip, account)

    async def _locked_elsewhere(self, ip: str, name: str) -> bool:
        if not self._link.up:
            return False
        try:
            by_ip, by_account = await asyncio.wait_for(
                self._link.run(lambda c: c.mget([_ip(ip), _account(name)])), LOOKUP_BUDGET
            )
        except (ClusterUnavailable, TimeoutError):
            return False  # the local count decides alone
        if int(by_ip or 0) >= IP_LOCKOUT_AFTER:
            return True
        # An IP that logged in to this name lately is exempt from the name's lockout,
        # as in the local count: locking a name out locks its owner out too.
        return int(by_account or 0) >= ACCOUNT_LOCKOUT_AFTER and not self._local.known_good(
            name, ip
        )
