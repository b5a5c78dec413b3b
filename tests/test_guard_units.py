"""The account guard on a fake clock: the baseline and trip arithmetic (relay/guard/
ledger.py), the guard's trips, releases and state file (guard.py), and the queue holding
and releasing an account's mail. Microseconds, no sockets; the spool is a temporary
directory."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from relay.config import parse_config
from relay.config.model import Config, GuardSettings
from relay.dns.resolver import Resolver
from relay.errors import ConfigError
from relay.guard import AccountGuard, Ledger, Trip, UnknownAccount
from relay.guard.ledger import HOUR
from relay.metrics import Metrics
from relay.queue.manager import QueueManager, restore
from relay.queue.models import Where
from relay.routing.router import Router
from relay.spool.store import Spool
from tests.test_queue_units import FakeClock, _message

DEFAULTS = GuardSettings()  # volume_factor 5, min_volume 200, max_bounce_ratio 0.3, 50 outcomes
T0 = 1_700_000_000.0 - 1_700_000_000.0 % HOUR  # the start of an hour


def _steady(ledger: Ledger, start: float, hours: int, per_hour: int) -> float:
    """`per_hour` recipients a hour, spread evenly, for `hours`; returns the end time."""
    for hour in range(hours):
        for i in range(per_hour):
            ledger.sent(start + hour * HOUR + (i + 0.5) * HOUR / per_hour, 1)
    return start + hours * HOUR


# the arithmetic


def test_without_history_only_min_volume_counts() -> None:
    ledger = Ledger()
    for i in range(200):
        ledger.sent(T0 + i, 1)
    assert ledger.baseline is None
    assert ledger.judge(T0 + 200, DEFAULTS) is None  # 200 is not over 200
    ledger.sent(T0 + 201, 1)
    reason = ledger.judge(T0 + 201, DEFAULTS)
    assert reason == "201 recipients in the last hour, over min_volume 200 (no baseline yet)"


def test_a_week_at_50_an_hour_gives_a_baseline_of_50_and_a_limit_of_250() -> None:
    ledger = Ledger()
    now = _steady(ledger, T0, 24 * 7, 50)
    ledger.advance(now)
    assert ledger.hours == 24 * 7 - 1  # the hour counting began in is not learnt
    assert ledger.baseline == pytest.approx(50)
    assert ledger.limit(DEFAULTS) == pytest.approx(250)
    later = now + HOUR  # a fresh hour; the quiet one before it lowers the baseline a hair
    ledger.advance(later)
    limit = int(ledger.limit(DEFAULTS))
    assert 245 <= limit < 250
    for i in range(limit):
        ledger.sent(later + i, 1)
    assert ledger.volume(later + limit) == limit
    assert ledger.judge(later + limit, DEFAULTS) is None
    ledger.sent(later + limit, 1)
    reason = ledger.judge(later + limit, DEFAULTS)
    assert reason == (
        f"{limit + 1} recipients in the last hour, over {ledger.limit(DEFAULTS):.0f} "
        f"(5 x its baseline of {ledger.baseline:.1f}/h)"
    )


def test_a_small_baseline_never_lowers_the_limit_below_min_volume() -> None:
    ledger = Ledger()
    now = _steady(ledger, T0, 48, 10)
    assert ledger.baseline == pytest.approx(10)
    assert ledger.limit(DEFAULTS) == 200
    assert ledger.limit(GuardSettings(volume_factor=30)) == pytest.approx(300)
    for i in range(201):
        ledger.sent(now + i, 1)
    assert "over min_volume 200 (baseline 10.0/h)" in (ledger.judge(now + 201, DEFAULTS) or "")


def test_the_last_hour_slides_across_the_top_of_the_hour() -> None:
    ledger = Ledger()
    for i in range(150):
        ledger.sent(T0 + 55 * 60 + i, 1)  # 12:55
    for i in range(60):
        ledger.sent(T0 + HOUR + 2 * 60 + i, 1)  # 13:02: a calendar hour would start at 0
    assert ledger.volume(T0 + HOUR + 3 * 60) == 210
    assert ledger.baseline is None  # 12:55 to 13:00 is not an hour to learn from
    assert ledger.judge(T0 + HOUR + 3 * 60, DEFAULTS) is not None
    assert ledger.volume(T0 + HOUR + 56 * 60) == 60  # at 13:56, 12:55 is over an hour old


def test_quiet_hours_lower_the_baseline_slowly() -> None:
    ledger = Ledger()
    now = _steady(ledger, T0, 24 * 14, 50)
    ledger.advance(now + 60 * HOUR)  # a weekend without mail
    # A week's half-life: 60 hours keep 78 % of an old mean; of two weeks', a little less.
    assert ledger.baseline is not None and 35 < ledger.baseline < 40
    # A new account's first day: the mean of its whole hours, quiet ones included.
    young = Ledger()
    _steady(young, T0, 8, 100)
    young.advance(T0 + 24 * HOUR)
    assert young.hours == 23
    assert young.baseline == pytest.approx(700 / 23, rel=0.05)  # recent hours weigh more


def test_one_bounce_out_of_two_is_not_a_ratio() -> None:
    ledger = Ledger()
    ledger.finished(T0, bounced=True)
    ledger.finished(T0 + 1, bounced=False)
    assert ledger.judge(T0 + 2, DEFAULTS) is None
    for i in range(38):  # 39 bounced of 49 finished: still too few to judge
        ledger.finished(T0 + 2 + i, bounced=True)
    for i in range(9):
        ledger.finished(T0 + 40 + i, bounced=False)
    assert ledger.outcomes(T0 + 50) == (49, 39)
    assert ledger.judge(T0 + 50, DEFAULTS) is None
    ledger.finished(T0 + 51, bounced=True)
    reason = ledger.judge(T0 + 52, DEFAULTS)
    assert reason is not None and reason.startswith("40 of 50 recipients finished")
    assert "(80%, over max_bounce_ratio 30%)" in reason


def test_a_ratio_at_the_limit_does_not_trip() -> None:
    ledger = Ledger()
    for i in range(100):
        ledger.finished(T0 + i, bounced=i < 30)
    assert ledger.judge(T0 + 100, DEFAULTS) is None  # 30 % is not over 30 %
    ledger.finished(T0 + 101, bounced=True)
    assert ledger.judge(T0 + 102, DEFAULTS) is not None


def test_nothing_is_learnt_while_tripped_and_a_release_starts_afresh() -> None:
    ledger = Ledger()
    now = _steady(ledger, T0, 24, 50)
    for i in range(2000):
        ledger.sent(now + i, 1)
    reason = ledger.judge(now + 2000, DEFAULTS)
    assert reason is not None
    ledger.trip = Trip(now + 2000, reason)
    ledger.advance(now + 3 * HOUR)  # the attack's hour is not learnt
    assert ledger.baseline == pytest.approx(50)
    ledger.release(now + 3 * HOUR)
    assert ledger.trip is None and ledger.volume(now + 3 * HOUR) == 0
    assert ledger.judged_since == now + 3 * HOUR


def test_the_state_round_trips_and_a_seed_needs_only_the_baseline() -> None:
    ledger = Ledger()
    now = _steady(ledger, T0, 30, 40)
    for i in range(60):
        ledger.finished(now + i, bounced=i % 3 == 0)
    copy = Ledger.from_dict(json.loads(json.dumps(ledger.to_dict())))
    assert copy.to_dict() == ledger.to_dict()
    assert copy.judge(now + 61, DEFAULTS) == ledger.judge(now + 61, DEFAULTS)
    seeded = Ledger.from_dict({"baseline": 50, "hours": 168})
    assert seeded.limit(DEFAULTS) == 250
    with pytest.raises(ValueError):
        Ledger.from_dict({"slots": [[1, 2]]})


# the configuration


def test_the_guard_is_on_where_a_block_says_so_and_errors_name_their_key() -> None:
    def account(name: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, "password": "scrypt:x", "senders": ["*@x"], **extra}

    off = parse_config({"accounts": [account("a"), account("b", guard={"min_volume": 10})]})
    assert not off.guard.enabled and not off.accounts[0].guard.enabled
    assert off.accounts[1].guard == GuardSettings(enabled=True, min_volume=10)
    on = parse_config(
        {
            "guard": {"max_bounce_ratio": 0.5, "action": "refuse"},
            "accounts": [account("a"), account("b", guard=False), account("c", guard={})],
        }
    )
    expected = GuardSettings(enabled=True, max_bounce_ratio=0.5, action="refuse")
    assert on.guard == on.accounts[0].guard == on.accounts[2].guard == expected
    assert on.accounts[1].guard == GuardSettings(max_bounce_ratio=0.5, action="refuse")
    assert parse_config({"guard": {}}).guard == GuardSettings(enabled=True)
    with pytest.raises(ConfigError) as raised:
        parse_config(
            {
                "guard": {"volume_factor": 0.5, "action": "drop", "max_bounce_ratio": "lots"},
                "accounts": [account("a", guard={"min_volume": -1, "window": "1h"})],
            }
        )
    assert raised.value.problems == [
        "guard.volume_factor: expected at least 1, got 0.5",
        "guard.max_bounce_ratio: expected a number, got 'lots'",
        "guard.action: expected one of hold, refuse, got 'drop'",
        "accounts[0].guard.min_volume: expected at least 1, got -1",
        "accounts[0].guard.window: unknown key",
    ]


# the guard


def _config(**guard: Any) -> Config:
    return parse_config(
        {
            "hostname": "relay.test",
            "defaults": {"route": "127.0.0.1:2525"},
            "accounts": [
                {"name": "app", "password": "scrypt:x", "senders": ["*@example.org"]},
                {
                    "name": "shop",
                    "password": "scrypt:x",
                    "senders": ["*@example.org"],
                    "guard": {"action": "refuse", "min_volume": 20},
                },
                {"name": "lists", "password": "scrypt:x", "senders": ["*@x"], "guard": False},
            ],
            "guard": {"min_volume": 100, **guard},
        }
    )


def _gauge(metrics: Metrics, account: str) -> float | None:
    return metrics.registry.get_sample_value("relay_account_guard_tripped", {"account": account})


class FakeQueue:
    def __init__(self) -> None:
        self.held: list[tuple[str, str]] = []
        self.released: list[str] = []

    async def hold_account(self, account: str, reason: str) -> int:
        self.held.append((account, reason))
        return 7

    async def release_account(self, account: str) -> int:
        self.released.append(account)
        return 3


class FakeListener:
    def __init__(self) -> None:
        self.refused: list[frozenset[str]] = []

    def refuse(self, accounts: frozenset[str]) -> None:
        self.refused.append(accounts)


def test_the_guard_trips_holds_refuses_and_releases(tmp_path: Path) -> None:
    async def main() -> None:
        clock, metrics = FakeClock(), Metrics()
        guard = AccountGuard(_config(), str(tmp_path), metrics.guard_tripped, clock)
        queue, listener = FakeQueue(), FakeListener()
        enforcing = asyncio.create_task(guard.enforce(queue, listener))
        assert guard.load() == []
        assert _gauge(metrics, "app") == 0 and _gauge(metrics, "shop") == 0
        for _ in range(100):
            guard.received("app", 1)
            guard.received("trusted", 50)  # not a configured account: never judged
            guard.received("lists", 50)  # guard: false
        assert guard.holds("app") is None
        guard.received("app", 1)
        assert guard.holds("app") == "101 recipients in the last hour, over min_volume 100 " + (
            "(no baseline yet)"
        )
        assert guard.holds("trusted") is None and guard.holds("lists") is None
        assert _gauge(metrics, "app") == 1
        assert guard.refused() == frozenset()  # app holds; it is not refused
        for _ in range(21):
            guard.received("shop", 1)
        assert guard.refused() == {"shop"}
        for _ in range(100):  # bounded: the enforcing task applies the trips in turn
            if len(queue.held) == 2:
                break
            await asyncio.sleep(0)
        assert [a for a, _ in queue.held] == ["app", "shop"]
        assert listener.refused[-1] == {"shop"}

        assert await guard.release("app") == 3
        assert queue.released == ["app"]
        assert guard.holds("app") is None and _gauge(metrics, "app") == 0
        with pytest.raises(UnknownAccount):
            await guard.release("nobody")
        # Outcomes of mail received before the release are not judged again.
        for _ in range(60):
            guard.finished("app", clock.now - 1, bounced=True)
        assert guard.holds("app") is None
        clock.now += 10
        for _ in range(60):
            guard.finished("app", clock.now, bounced=True)
        assert guard.holds("app") is not None and "rejected" in (guard.holds("app") or "")

        await guard.close()
        enforcing.cancel()
        await asyncio.gather(enforcing, return_exceptions=True)

        # A restart: the trips are still there, and the refused account is refused.
        again = AccountGuard(_config(), str(tmp_path), Metrics().guard_tripped, clock)
        assert sorted(name for name, _ in again.load()) == ["app", "shop"]
        assert again.refused() == {"shop"}
        rows = {row["account"]: row for row in again.report()}
        assert rows["app"]["state"] == "tripped" and rows["app"]["bounced"] == 60
        assert rows["lists"]["state"] == "off" and rows["shop"]["action"] == "refuse"
        saved = json.loads((tmp_path / "state" / "guard.json").read_text())
        assert "trusted" not in saved["accounts"]  # unconfigured accounts are not kept

    asyncio.run(main())


def test_a_damaged_state_file_starts_without_baselines(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "guard.json").write_text('{"accounts": {"app": {"slots": 3}}}')
    guard = AccountGuard(_config(), str(tmp_path), Metrics().guard_tripped, FakeClock())
    assert guard.load() == []


# the queue


class Holds:
    """An account guard that holds `app`'s mail."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.outcomes: list[tuple[str, bool]] = []

    def holds(self, account: str) -> str | None:
        return self.reason if account == "app" else None

    def finished(self, account: str, received_at: float, bounced: bool) -> None:
        self.outcomes.append((account, bounced))


def _markers(spool: Spool) -> dict[str, str]:
    """Hold markers in the spool: message ID → content."""
    return {p.stem: p.read_text() for p in Path(spool.messages_dir).rglob("*.hold")}


def test_the_queue_holds_an_accounts_mail_and_releases_only_the_guards(tmp_path: Path) -> None:
    async def main() -> None:
        clock = FakeClock()
        config = _config()
        spool = Spool(str(tmp_path / "spool"))
        spool.open()
        watch = Holds()
        manager = QueueManager(
            config, spool, Router(config, Resolver(config.dns), clock), Metrics(), clock,
            accounts=watch,
        )  # fmt: skip
        before = await _message(spool, clock, "a@x.test")
        by_hand = await _message(spool, clock, "b@x.test")
        manager.submit(before)
        manager.submit(by_hand)
        await manager.hold(by_hand)
        assert all(r.where is Where.READY for r in before.recipients)

        watch.reason = "too much"
        assert await manager.hold_account("app", "too much") == 1
        assert before.held and before.hold_reason == "guard"
        assert by_hand.hold_reason == "admin"
        after = await _message(spool, clock, "c@x.test")
        manager.submit(after)  # new mail of a tripped account: held as it comes
        assert after.held and all(r.where is Where.HELD for r in after.recipients)
        await manager.stop()  # the marker of `after` is written
        assert _markers(spool) == {before.id: "guard\n", by_hand.id: "held\n", after.id: "guard\n"}
        recovered = {m.envelope.id: restore(m) for m in spool.recover(time.time() + 1)}
        assert recovered[after.id].hold_reason == "guard"
        assert recovered[by_hand.id].hold_reason == "admin"

        watch.reason = None
        assert await manager.release_account("app") == 2
        assert not before.held and not after.held and by_hand.held
        assert all(r.where is Where.READY for r in before.recipients + after.recipients)
        assert _markers(spool) == {by_hand.id: "held\n"}

    asyncio.run(main())


def test_guard_held_mail_of_an_account_no_longer_tripped_goes_out_when_queued(
    tmp_path: Path,
) -> None:
    """Mail held by the guard whose account was released while it was out of reach (on a
    node whose spool was adopted since, or behind a crash): queued here, it goes out and
    loses its marker; mail an admin held stays held."""

    async def main() -> None:
        clock = FakeClock()
        config = _config()
        spool = Spool(str(tmp_path / "spool"))
        spool.open()
        guarded = await _message(spool, clock, "a@x.test")
        by_hand = await _message(spool, clock, "b@x.test")
        await spool.set_held(guarded.id, True, "guard")
        await spool.set_held(by_hand.id, True)
        manager = QueueManager(
            config, spool, Router(config, Resolver(config.dns), clock), Metrics(), clock,
            accounts=Holds(),
        )  # fmt: skip
        await manager.recover(spool.recover(time.time() + 1))
        mine, theirs = manager.registry.get(guarded.id), manager.registry.get(by_hand.id)
        assert mine is not None and theirs is not None
        assert not mine.held and theirs.held
        await manager.stop()
        assert _markers(spool) == {by_hand.id: "held\n"}

    asyncio.run(main())
