"""The queue manager with a fake clock: scheduling, site backoff, priority, states,
expiry and the admin actions, in microseconds. The spool is real (a temporary
directory); routing uses smarthost routes, so no DNS is involved."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from relay.config import parse_config
from relay.config.model import Config
from relay.dns.resolver import Resolver
from relay.metrics import Metrics
from relay.queue.manager import QueueManager
from relay.queue.models import Attempt, Batch, QueuedMessage, Recipient, Where
from relay.queue.ready import ReadyQueue
from relay.reply import Reply, Verdict
from relay.routing.router import Destination, Queue, Router, Site
from relay.spool.records import Envelope, EnvelopeRecipient, RecipientStatus
from relay.spool.store import Spool

START = 1_700_000_000.0


class FakeClock:
    def __init__(self) -> None:
        self.now = START

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now - START


def _config(**extra: Any) -> Config:
    raw: dict[str, Any] = {
        "hostname": "relay.test",
        "defaults": {"route": "127.0.0.1:2525", "max_recipients_per_message": 2},
        "providers": {
            "alpha": {"domains": ["alpha.test"], "route": "127.0.0.2:25"},
            "beta": {"domains": ["beta.test"], "route": "127.0.0.3:25"},
        },
        "retry": {"initial": "5m", "max": "1h", "lifetime": "1d"},
        "classes": {"transactional": {"priority": 10}, "bulk": {"priority": 1}},
    }
    raw.update(extra)
    return parse_config(raw)


def run(test: Callable[[QueueManager, FakeClock, Spool], Awaitable[None]], tmp_path: Path) -> None:
    async def main() -> None:
        clock = FakeClock()
        config = _config()
        spool = Spool(str(tmp_path / "spool"))
        spool.open()
        router = Router(config, Resolver(config.dns), clock)
        manager = QueueManager(config, spool, router, Metrics(), clock)
        await test(manager, clock, spool)
        await manager.stop()

    asyncio.run(main())


async def _message(
    spool: Spool, clock: FakeClock, *to: str, class_name: str = "transactional"
) -> QueuedMessage:
    data = b"Subject: t\r\n\r\nbody\r\n"
    envelope = Envelope(
        id=spool.new_id(),
        sender="app@example.org",
        recipients=tuple(EnvelopeRecipient(a) for a in to),
        received_at=clock.now,
        size=len(data),
        class_name=class_name,
        account="app",
    )
    offset = await spool.store(envelope, data)
    return QueuedMessage(envelope, offset)


def _states_add_up(manager: QueueManager) -> None:
    queued = sum(
        1 for m in manager.registry.messages.values() for r in m.recipients if not r.status.is_final
    )
    assert manager.stats.total() == queued


def _ready(manager: QueueManager, key: str) -> ReadyQueue:
    [ready] = [q for q in manager.ready_queues() if q.key == key]
    return ready


def test_routes_by_provider_and_batches_per_domain(tmp_path: Path) -> None:
    async def test(manager: QueueManager, clock: FakeClock, spool: Spool) -> None:
        message = await _message(
            spool, clock, "a@alpha.test", "b@beta.test", *[f"u{i}@x.test" for i in range(5)]
        )
        manager.submit(message)
        assert {q.key for q in manager.ready_queues()} == {
            "alpha",
            "beta",
            "default:[127.0.0.1]:2525",
        }
        assert _ready(manager, "default:[127.0.0.1]:2525").pending == 3  # 5 recipients, 2 per batch
        assert all(r.where is Where.READY for r in message.recipients)
        _states_add_up(manager)

    run(test, tmp_path)


def test_deferred_recipients_wait_for_the_clock(tmp_path: Path) -> None:
    async def test(manager: QueueManager, clock: FakeClock, spool: Spool) -> None:
        message = await _message(spool, clock, "a@alpha.test")
        manager.submit(message)
        ready = _ready(manager, "alpha")
        site = Site("[127.0.0.2]:25", ("127.0.0.2",))
        batch = ready.take(site, "127.0.0.2", lambda _: True)
        assert batch is not None
        manager.take(batch)
        assert message.recipients[0].where is Where.ACTIVE
        _states_add_up(manager)
        reply = Reply.parse(451, "4.3.0 try later")
        await manager.settle(batch, [Attempt(batch.recipients[0], reply, Verdict.DEFERRED)], "mx")
        recipient = message.recipients[0]
        assert recipient.where is Where.SCHEDULED and recipient.attempts == 1
        assert 270 <= recipient.next_attempt - clock.now <= 330  # retry.initial ±10 %
        assert manager.schedule.pop_due() == []
        clock.now = recipient.next_attempt
        [(due, recipients)] = manager.schedule.pop_due()
        assert due is message and recipients == [recipient]
        _states_add_up(manager)

    run(test, tmp_path)


def test_an_unreachable_site_backs_off_alone(tmp_path: Path) -> None:
    async def test(manager: QueueManager, clock: FakeClock, spool: Spool) -> None:
        dead = await _message(spool, clock, "a@alpha.test", "x@alpha.test")
        live = await _message(spool, clock, "b@beta.test")
        manager.submit(dead)
        manager.submit(live)
        alpha = _ready(manager, "alpha")
        site = Site("[127.0.0.2]:25", ("127.0.0.2",))
        await manager.site_unreachable(alpha, site, Reply.local(451, "4.4.1", "refused"))
        assert all(r.where is Where.SCHEDULED and r.attempts == 1 for r in dead.recipients)
        assert alpha.pending == 0
        assert _ready(manager, "beta").pending == 1  # the other provider is untouched
        # New mail for the dead site waits for its backoff, without an attempt.
        later = await _message(spool, clock, "c@alpha.test")
        manager.submit(later)
        assert later.recipients[0].where is Where.SCHEDULED
        assert later.recipients[0].attempts == 0
        _states_add_up(manager)
        # Once the backoff is over, the site is tried again; reaching it clears it.
        clock.now += 3600
        for message, recipients in manager.schedule.pop_due():
            manager.requeue(message, recipients)
        assert alpha.pending == 2
        manager.site_reached(site)
        assert manager.sites.until(site.key) is None
        _states_add_up(manager)

    run(test, tmp_path)


def test_backoff_grows_with_each_failed_round(tmp_path: Path) -> None:
    async def test(manager: QueueManager, clock: FakeClock, spool: Spool) -> None:
        retry = manager.config.retry
        first = manager.sites.failed("s", retry) - clock.now
        clock.now += first
        assert manager.sites.until("s") is None
        second = manager.sites.failed("s", retry) - clock.now
        assert 1.6 < second / first < 2.5

    run(test, tmp_path)


def test_transactional_goes_before_bulk(tmp_path: Path) -> None:
    async def test(manager: QueueManager, clock: FakeClock, spool: Spool) -> None:
        bulk = await _message(spool, clock, "a@alpha.test", class_name="bulk")
        clock.now += 1
        urgent = await _message(spool, clock, "b@alpha.test")
        manager.submit(bulk)
        manager.submit(urgent)
        ready = _ready(manager, "alpha")
        site = Site("[127.0.0.2]:25", ("127.0.0.2",))
        first = ready.take(site, "127.0.0.2", lambda _: True)
        assert first is not None and first.message is urgent
        # A class whose rate is spent is skipped, not waited for.
        assert ready.take(site, "127.0.0.2", lambda name: name != "bulk") is None
        second = ready.take(site, "127.0.0.2", lambda _: True)
        assert second is not None and second.message is bulk

    run(test, tmp_path)


def test_a_connection_carries_every_domain_its_host_serves() -> None:
    shaping = _config().defaults
    queue = Queue("orange", "orange", shaping)
    ready = ReadyQueue(queue, lambda _: 0)
    both = Site("mx1.orange.test,mx2.orange.test", ("mx1.orange.test", "mx2.orange.test"))
    one = Site("mx1.orange.test", ("mx1.orange.test",))
    other = Site("mx.elsewhere.test", ("mx.elsewhere.test",))
    batches = []
    for site, domain in ((both, "orange.test"), (one, "client.test"), (other, "else.test")):
        message = QueuedMessage(
            Envelope("id" + domain, "a@b.c", (EnvelopeRecipient(f"u@{domain}"),), 0, 1, "t", "a"),
            0,
        )
        message.recipients[0].where = Where.READY
        batches.append(Batch(message, message.recipients, Destination(queue, site, "t"), domain))
        ready.push(batches[-1])
    taken = []
    while (batch := ready.take(both, "mx1.orange.test", lambda _: True)) is not None:
        taken.append(batch.domain)
    assert taken == ["orange.test", "client.test"]  # the same host serves both sites
    assert ready.waiting_elsewhere(both, "mx1.orange.test", lambda _: True)
    assert ready.next_site(lambda _: True) == other


def test_admin_bounce_during_the_mx_lookup_is_not_undone(tmp_path: Path) -> None:
    async def test(manager: QueueManager, clock: FakeClock, spool: Spool) -> None:
        message = await _message(spool, clock, "a@alpha.test", "b@alpha.test")
        manager.registry.add(message)
        recipients = list(message.recipients)
        manager.stats.move(message, recipients, Where.ROUTING)  # an MX lookup in flight
        lookup = manager._lookup("alpha.test", message, recipients)
        bounced, again = await asyncio.gather(manager.bounce(message), manager.bounce(message))
        assert sorted([bounced, again]) == [0, 2]  # a second bounce finds nothing left
        assert all(r.status is RecipientStatus.BOUNCED for r in recipients)
        assert manager.registry.get(message.id) is None
        # The lookup now ends: nothing is queued again against the removed file.
        await lookup
        assert all(r.where is Where.NOWHERE for r in recipients)
        assert "alpha" not in {q.key for q in manager.ready_queues()}
        # One DSN went to the sender (queued as mail of its own).
        dsns = [m for m in manager.registry.messages.values() if m.envelope.sender == ""]
        assert len(dsns) == 1
        _states_add_up(manager)

    run(test, tmp_path)


def test_a_deferral_past_the_lifetime_expires_with_a_dsn(tmp_path: Path) -> None:
    async def test(manager: QueueManager, clock: FakeClock, spool: Spool) -> None:
        message = await _message(spool, clock, "a@alpha.test")
        manager.submit(message)
        batch = _ready(manager, "alpha").take(
            Site("[127.0.0.2]:25", ("127.0.0.2",)), "127.0.0.2", lambda _: True
        )
        assert batch is not None
        manager.take(batch)
        clock.now += 86400 + 1
        reply = Reply.parse(451, "4.3.0 still busy")
        await manager.settle(batch, [Attempt(batch.recipients[0], reply, Verdict.DEFERRED)], "mx")
        assert message.recipients[0].status is RecipientStatus.EXPIRED
        assert manager.registry.get(message.id) is None
        [dsn] = manager.registry.messages.values()
        assert dsn.envelope.recipients[0].address == "app@example.org"
        _states_add_up(manager)

    run(test, tmp_path)


def test_hold_and_release(tmp_path: Path) -> None:
    async def test(manager: QueueManager, clock: FakeClock, spool: Spool) -> None:
        message = await _message(spool, clock, "a@alpha.test")
        manager.submit(message)
        await manager.hold(message)
        assert message.recipients[0].where is Where.HELD
        _states_add_up(manager)
        await manager.release(message)
        assert message.recipients[0].where is Where.READY
        _states_add_up(manager)

    run(test, tmp_path)


def test_a_suspension_lasts_its_time_and_is_saved(tmp_path: Path) -> None:
    from relay.delivery.pause import Pause
    from relay.shaping.suspensions import Suspensions

    async def main() -> None:
        clock = FakeClock()
        clock.now = time.time()  # the saved file is read back against the wall clock
        store = Suspensions(str(tmp_path))
        ended: list[bool] = []
        pause = Pause("orange", "orange", store, clock, lambda: ended.append(True))
        assert pause.start(60, "421 come back later")
        assert pause.active and pause.reason == "421 come back later"
        assert not pause.start(30, "shorter")  # a shorter one does not cut it down
        clock.now += 61
        assert not pause.active
        pause.end()
        await store.flush()
        assert pause.reason is None and Suspensions(str(tmp_path)).load() == {}
        pause.start(3600, "admin")
        await store.flush()
        [saved] = Suspensions(str(tmp_path)).load().values()
        assert saved.until == clock.now + 3600 and saved.reason == "admin"
        pause.cancel()
        assert ended == []  # the timer never fired: the fake clock does not move the loop

    asyncio.run(main())


def test_a_recipient_scheduled_twice_for_one_time_is_due_once(tmp_path: Path) -> None:
    async def test(manager: QueueManager, clock: FakeClock, spool: Spool) -> None:
        alpha = Site("[127.0.0.2]:25", ("127.0.0.2",))
        first = await _message(spool, clock, "a@alpha.test")
        manager.submit(first)
        await manager.site_unreachable(_ready(manager, "alpha"), alpha, Reply.parse(421, "x"))
        message = await _message(spool, clock, "b@alpha.test")
        manager.submit(message)  # waits for the site's backoff, without an attempt
        await manager.hold(message)
        await manager.release(message)  # scheduled again for the same moment
        clock.now += 3600
        due = [r for m, rs in manager.schedule.pop_due() if m is message for r in rs]
        assert due == message.recipients

    run(test, tmp_path)


def test_the_oldest_age_heap_stays_bounded_behind_an_old_message(tmp_path: Path) -> None:
    from relay.queue.stats import QueueStats

    stats = QueueStats()
    envelope = Envelope("old", "a@b.c", (EnvelopeRecipient("x@y.z"),), 0, 1, "t", "a")
    old = QueuedMessage(envelope, 0)
    old.recipients[0].destination = Destination(
        Queue("q", "default", _config().defaults), Site("s", ("s",)), "t"
    )
    stats.move(old, old.recipients, Where.READY)  # waits for days
    for i in range(5000):
        message = QueuedMessage(
            Envelope(f"m{i:05}", "a@b.c", (EnvelopeRecipient("x@y.z"),), i, 1, "t", "a"), 0
        )
        message.recipients[0].destination = old.recipients[0].destination
        stats.move(message, message.recipients, Where.READY)
        stats.move(message, message.recipients, Where.NOWHERE)  # delivered
    assert sum(len(heap) for heap in stats._oldest.values()) < 2100
    assert stats.oldest_ages(5000)[("default", "t")] == 5000


def test_hold_and_release_racing_never_leave_mail_stuck(tmp_path: Path) -> None:
    async def test(manager: QueueManager, clock: FakeClock, spool: Spool) -> None:
        for _ in range(10):
            message = await _message(spool, clock, "a@alpha.test")
            manager.submit(message)
            await asyncio.gather(manager.hold(message), manager.release(message))
            [recipient] = message.recipients
            expected = Where.HELD if message.held else Where.READY
            assert recipient.where is expected
            await manager.release(message)
            assert recipient.where is Where.READY
            _states_add_up(manager)

    run(test, tmp_path)


def test_workers_failing_one_round_together_count_one_failure(tmp_path: Path) -> None:
    async def test(manager: QueueManager, clock: FakeClock, spool: Spool) -> None:
        manager.submit(await _message(spool, clock, "a@alpha.test"))
        ready = _ready(manager, "alpha")
        site = Site("[127.0.0.2]:25", ("127.0.0.2",))
        refused = Reply.local(451, "4.4.1", "refused")
        await asyncio.gather(*(manager.site_unreachable(ready, site, refused) for _ in range(5)))
        until = manager.sites.until(site.key)
        assert until is not None and until - clock.now <= 330  # retry.initial, not retry.max

    run(test, tmp_path)


def test_claimed_recipients_leave_delivery_until_transferred_or_put_back(tmp_path: Path) -> None:
    """A transfer's claim: READY recipients go ACTIVE, so no lane takes them; the peer's
    250 makes them final here (durably: a restart does not queue them again); the rest
    go back where they waited, with no attempt counted."""

    async def test(manager: QueueManager, clock: FakeClock, spool: Spool) -> None:
        message = await _message(spool, clock, "a@alpha.test", "b@beta.test", "c@beta.test")
        manager.submit(message)
        a, b, c = message.recipients

        def beta(r: Recipient) -> bool:
            return r.destination is not None and r.destination.queue.provider == "beta"

        claimed = manager.claim(message, beta)
        assert claimed == [b, c] and b.where is c.where is Where.ACTIVE
        assert a.where is Where.READY
        assert manager.claim(message, beta) == []  # claimed once only
        _states_add_up(manager)
        site = Site("[127.0.0.3]:25", ("127.0.0.3",))
        assert _ready(manager, "beta").take(site, "127.0.0.3", lambda _: True) is None
        reply = Reply.parse(250, "2.0.0 Ok: queued as PEER1")
        await manager.transferred(message, [b], "peer.test:587", "peer.test[127.0.0.9]:587", reply)
        manager.unclaim(message, claimed)
        assert b.status is RecipientStatus.TRANSFERRED and b.where is Where.NOWHERE
        assert c.where is Where.READY and c.attempts == 0 and c.status is RecipientStatus.PENDING
        _states_add_up(manager)
        [recovered] = list(spool.recover(time.time() + 1))
        assert [r.status for r in recovered.records] == [RecipientStatus.TRANSFERRED]
        # A held message is not claimed at all; once every recipient is final, it is gone.
        await manager.hold(message)
        assert manager.claim(message, lambda r: True) == []
        await manager.release(message)
        rest = manager.claim(message, lambda r: True)
        assert rest == [a, c]
        await manager.transferred(message, rest, "peer.test:587", "peer", reply)
        assert manager.registry.get(message.id) is None
        assert list(spool.recover(time.time() + 1)) == []
        _states_add_up(manager)

    run(test, tmp_path)
