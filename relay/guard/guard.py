"""The account guard (SPEC §12): a configured account that suddenly sends far more than
usual, or whose mail the receiving servers reject, is tripped, and its mail stops until
an admin releases it (`relay account release NAME`).

It counts, judges and remembers; what a trip does is asked of others, one change at a
time, in `enforce`: the queue holds the account's mail (`hold_account`), and with
`action: refuse` the listener process answers its MAIL with 450 4.7.1 (`refuse`). New
mail of a tripped account is held from its arrival (the queue asks `holds`), whatever
the action: with `refuse`, that is only the mail accepted before the listener heard.

Every configured account is counted, and judged where the guard is on (a `guard`
block): its baseline is ready the day it is turned on. Trusted-network mail (label
`trusted`) and DSNs (`MAILER-DAEMON`) are neither. Volume counts recipients, as a
message to 500 addresses is as many deliveries as 500 messages; bounces count only 5xx
from the receiving servers (a recipient relay returned itself, by expiry or an admin's
bounce, is not the account's doing). The figures are saved in `<spool>/state/guard.json`
on each trip and release, and at most a minute after other counts change, so a crash
loses at most a minute of counting, and a trip outlives a restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import Gauge

from relay.clock import SYSTEM_CLOCK, Clock
from relay.config.model import Config, GuardSettings
from relay.guard.ledger import Ledger, Trip
from relay.guard.shared import GuardAnnouncer, GuardEvent
from relay.statefile import StateFile

log = logging.getLogger("relay.guard")

SAVE_EVERY = 60.0  # seconds: counts between trips are saved at most this late
VERSION = 1


class UnknownAccount(LookupError):
    """No such account in the configuration nor in the guard's figures."""


class HoldsAccounts(Protocol):
    """The queue, as a trip and a release need it (relay.queue.manager)."""

    async def hold_account(self, account: str, reason: str) -> int: ...

    async def release_account(self, account: str) -> int: ...


class RefusesAccounts(Protocol):
    """The listener process, told which accounts get 450 at MAIL (relay.listener.supervisor)."""

    def refuse(self, accounts: frozenset[str]) -> None: ...


@dataclass(slots=True)
class _Change:
    account: str
    trip: Trip | None  # None: a release
    released: asyncio.Future[int] | None = field(default=None)  # a release's count


class AccountGuard:
    def __init__(
        self,
        config: Config,
        spool_path: str,
        tripped_gauge: Gauge,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._clock = clock
        self._gauge = tripped_gauge  # relay_account_guard_tripped{account}
        self._file = StateFile(os.path.join(spool_path, "state", "guard.json"), "account guard")
        self._ledgers: dict[str, Ledger] = {}
        self._settings: dict[str, GuardSettings] = {}
        self._changes: asyncio.Queue[_Change] = asyncio.Queue()
        self._pending_save: asyncio.TimerHandle | None = None  # counts changed, not saved
        self._published: set[str] = set()  # accounts with a gauge series
        self.announcer: GuardAnnouncer | None = None  # a cluster's (SPEC §9)
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """New thresholds from now on; a tripped account stays tripped until released."""
        self._settings = {a.name: a.guard for a in config.accounts}
        self._publish()

    def load(self) -> list[tuple[str, Trip]]:
        """Read the saved figures (before any mail is queued); returns the tripped accounts."""
        try:
            with open(self._file.path, encoding="utf-8") as handle:
                raw = json.load(handle)
            self._ledgers = {
                str(name): Ledger.from_dict(entry) for name, entry in raw["accounts"].items()
            }
        except FileNotFoundError:
            self._ledgers = {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error(
                "cannot read %s (%s); the account guard starts without baselines",
                self._file.path,
                exc,
            )
            self._ledgers = {}
        self._publish()
        return [(name, ledger.trip) for name, ledger in self._ledgers.items() if ledger.trip]

    # what the queue tells and asks (relay.queue.models.AccountWatch)

    def received(self, account: str, recipients: int) -> None:
        """A new message of `account` was accepted."""
        settings = self._settings.get(account)
        if settings is None:
            return
        ledger = self._ledger(account)
        now = self._clock.time()
        ledger.sent(now, recipients)
        self._save_soon()
        if settings.enabled and ledger.trip is None:
            self._judge(account, ledger, settings, now)

    def finished(self, account: str, received_at: float, bounced: bool) -> None:
        """A recipient of `account` was delivered, or rejected by the receiving server."""
        settings = self._settings.get(account)
        if settings is None:
            return
        ledger = self._ledger(account)
        if received_at < ledger.judged_since:
            return
        now = self._clock.time()
        ledger.finished(now, bounced)
        self._save_soon()
        if settings.enabled and ledger.trip is None and bounced:
            self._judge(account, ledger, settings, now)

    def holds(self, account: str) -> str | None:
        """Why `account`'s mail is held now, or None."""
        ledger = self._ledgers.get(account)
        return ledger.trip.reason if ledger is not None and ledger.trip is not None else None

    def refused(self) -> frozenset[str]:
        """Tripped accounts whose MAIL the listener refuses (`action: refuse`)."""
        return frozenset(
            name
            for name, ledger in self._ledgers.items()
            if ledger.trip is not None and self._action(name) == "refuse"
        )

    # judging

    def _action(self, account: str) -> str:
        settings = self._settings.get(account)
        return settings.action if settings is not None else "hold"

    def _ledger(self, account: str) -> Ledger:
        ledger = self._ledgers.get(account)
        if ledger is None:
            ledger = self._ledgers[account] = Ledger()
        return ledger

    def _judge(self, account: str, ledger: Ledger, settings: GuardSettings, now: float) -> None:
        reason = ledger.judge(now, settings)
        if reason is None:
            return
        ledger.trip = Trip(now, reason)
        if self.announcer is not None:
            self.announcer.announce(GuardEvent(account, "trip", now, reason))
        log.warning(
            "account %s tripped the account guard: %s; its mail is %s until "
            "'relay account release %s'",
            account,
            reason,
            "held" if settings.action == "hold" else "held and its MAIL refused (450 4.7.1)",
            account,
        )
        self._changes.put_nowait(_Change(account, ledger.trip))
        self._publish()
        self._save()

    # releasing

    async def release(self, account: str) -> int:
        """Untrip `account` and let its held mail go; returns how many messages went."""
        if account not in self._settings and account not in self._ledgers:
            known = ", ".join(sorted(self._settings)) or "none configured"
            raise UnknownAccount(f"no account {account!r} (accounts: {known})")
        ledger = self._ledger(account)
        was = ledger.trip
        now = self._clock.time()
        ledger.release(now)
        if self.announcer is not None:
            self.announcer.announce(GuardEvent(account, "release", now))
        if was is not None:
            log.warning(
                "account %s released from the account guard (tripped: %s)", account, was.reason
            )
        self._publish()
        self._save()
        released: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._changes.put_nowait(_Change(account, None, released))
        return await released

    def apply_shared(self, event: GuardEvent) -> None:
        """Another node tripped or released an account: the same here."""
        ledger = self._ledger(event.account)
        if event.kind == "trip":
            if ledger.trip is not None:
                return
            ledger.trip = Trip(event.at, f"{event.reason} (on node {event.node})")
            log.warning(
                "account %s tripped the account guard on node %s: %s; its mail is held here too",
                event.account,
                event.node,
                event.reason,
            )
            self._changes.put_nowait(_Change(event.account, ledger.trip))
        else:
            if ledger.trip is None:
                return
            ledger.release(self._clock.time())
            log.warning(
                "account %s released from the account guard on node %s", event.account, event.node
            )
            self._changes.put_nowait(_Change(event.account, None))
        self._publish()
        self._save()

    # applying changes

    async def enforce(self, queue: HoldsAccounts, listener: RefusesAccounts) -> None:
        """Apply trips and releases one at a time, in order, so that a release never
        runs in the middle of its trip's holding."""
        listener.refuse(self.refused())
        while True:
            change = await self._changes.get()
            try:
                if change.trip is not None:
                    held = await queue.hold_account(change.account, change.trip.reason)
                    log.info("account %s: %d queued messages held", change.account, held)
                else:
                    count = await queue.release_account(change.account)
                    log.info("account %s: %d held messages released", change.account, count)
                    if change.released is not None and not change.released.done():
                        change.released.set_result(count)
            except Exception as exc:
                # The next change must still be applied: logged here, and a release
                # waiting for its answer gets the error.
                log.exception("account %s: the guard's change was not applied", change.account)
                if change.released is not None and not change.released.done():
                    change.released.set_exception(exc)
            listener.refuse(self.refused())

    async def close(self) -> None:
        """Save the figures as they are (at shutdown)."""
        self._save()
        await self._file.flush()

    # showing

    def report(self) -> list[dict[str, Any]]:
        """Every configured or tripped account with its figures, by name."""
        now = self._clock.time()
        rows = []
        for name in sorted(set(self._settings) | set(self._ledgers)):
            settings = self._settings.get(name, GuardSettings(enabled=False))
            ledger = self._ledgers.get(name) or Ledger()
            finished, bounced = ledger.outcomes(now)
            trip = ledger.trip
            rows.append(
                {
                    "account": name,
                    "state": "tripped" if trip else ("ok" if settings.enabled else "off"),
                    "since": trip.since if trip else None,
                    "reason": trip.reason if trip else None,
                    "action": settings.action,
                    "configured": name in self._settings,
                    "volume": ledger.volume(now),
                    "limit": ledger.limit(settings),
                    "baseline": ledger.baseline,
                    "hours": ledger.hours,
                    "finished": finished,
                    "bounced": bounced,
                    "bounce_ratio": bounced / finished if finished else None,
                    "usual_bounce_ratio": ledger.bounce_baseline,
                    "max_bounce_ratio": settings.max_bounce_ratio,
                    "min_outcomes": settings.min_outcomes,
                }
            )
        return rows

    # state

    def _publish(self) -> None:
        """The gauge: 0 or 1 for every configured account, and 1 for a tripped one
        that left the configuration (its held mail still waits for a release)."""
        names = set(self._settings) | {n for n, ledger in self._ledgers.items() if ledger.trip}
        for name in self._published - names:
            self._gauge.remove(name)  # gone from the configuration, and not tripped
        for name in names:
            ledger = self._ledgers.get(name)
            self._gauge.labels(name).set(1 if ledger is not None and ledger.trip else 0)
        self._published = names

    def _save_soon(self) -> None:
        if self._pending_save is None:
            loop = asyncio.get_running_loop()
            self._pending_save = loop.call_later(SAVE_EVERY, self._save)

    def _save(self) -> None:
        if self._pending_save is not None:
            self._pending_save.cancel()
            self._pending_save = None
        now = self._clock.time()
        for ledger in self._ledgers.values():
            ledger.advance(now)
        # An account gone from the configuration is forgotten, unless it is tripped.
        kept = {
            name: ledger.to_dict()
            for name, ledger in self._ledgers.items()
            if name in self._settings or ledger.trip is not None
        }
        self._file.save({"version": VERSION, "accounts": kept})
