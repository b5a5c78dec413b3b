"""Account rates (`accounts[].rate`) as one budget for the cluster (SPEC §9), for the
listener process.

At MAIL, one GCRA "take" in Redis (scripts.GCRA, on Redis's clock, with the account's
burst) decides for every node at once, bounded by LOOKUP_BUDGET (50 ms) as the AUTH
lookups are. When it cannot answer in time, or while the link is down, the local bucket
decides at this node's share: the rate and its burst divided by the live nodes last
seen, which the main process sends (relay/listener/worker.py). MAIL is never slowed by
more than the budget, and a 250 for DATA never waits on Redis.
"""

from __future__ import annotations

import asyncio
from typing import Any

from relay.cluster import scripts
from relay.cluster.authfail import LOOKUP_BUDGET
from relay.cluster.link import RedisLink
from relay.config.model import Account
from relay.errors import ClusterUnavailable
from relay.listener.abuse import LocalAccountRates


def account_rate_key(name: str) -> str:
    return f"relay:account-rate:{name}"


class SharedAccountRates:
    """`AccountRates` (relay/listener/abuse.py) whose budget is the cluster's."""

    def __init__(self, local: LocalAccountRates, link: RedisLink) -> None:
        self._local = local
        self._link = link
        self._script = link.client.register_script(scripts.GCRA)
        self.live_nodes = 1  # the count last seen by the main process; 1 until it says

    async def allow(self, account: Account) -> bool:
        rate = account.rate
        if rate is None:
            return True
        if self._link.up:
            interval = rate.period / rate.count * 1000
            tolerance = interval * (max(1, int(rate.count)) - 1)
            try:
                delay = await asyncio.wait_for(
                    self._link.run(
                        lambda _: self._take(account_rate_key(account.name), interval, tolerance)
                    ),
                    LOOKUP_BUDGET,
                )
            except (ClusterUnavailable, TimeoutError):
                pass  # the local share decides; the link's probe finds out if Redis is down
            else:
                return float(delay) <= 0
        return self._local.take(account, max(1, self.live_nodes))

    async def _take(self, key: str, interval: float, tolerance: float) -> Any:
        return await self._script(keys=[key], args=[interval, tolerance, "take"])
