"""The cluster's parts against a real redis-server on loopback (tests/redisserver.py):
the link's health (down, hung, back), leases, shared GCRA, per-mailbox and account
rates, lane events, AUTH failure counts, heartbeats and the fencing lock."""

from __future__ import annotations

import asyncio
import functools
import itertools
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.cluster.accountrates import SharedAccountRates
from relay.cluster.authfail import SharedAuthFailures
from relay.cluster.lanes import SharedLanes
from relay.cluster.leases import SlotLeases
from relay.cluster.link import RedisLink
from relay.cluster.lock import Locks
from relay.cluster.nodes import Nodes
from relay.cluster.rates import SharedRates
from relay.config.model import Account, Secret
from relay.config.units import parse_rate
from relay.errors import ClusterUnavailable
from relay.listener.abuse import IP_LOCKOUT_AFTER, LocalAccountRates, LocalAuthFailures
from relay.shaping.lanestate import LaneEvent
from tests.redisserver import HungServer, RedisServer


async def _link(server: RedisServer) -> RedisLink:
    link = RedisLink(server.url)
    assert await link.probe()
    return link


def in_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop; a `redis` argument becomes a link to the
    test's redis-server, made (and closed) in that loop."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        async def scenario() -> None:
            server = kwargs.get("redis_server")
            if "link" in kwargs and server is not None:
                kwargs["link"] = await _link(server)
                await kwargs["link"].client.flushdb()
            try:
                await test(*args, **kwargs)
            finally:
                if isinstance(kwargs.get("link"), RedisLink):
                    await kwargs["link"].close()

        asyncio.run(scenario())

    return run


@pytest.fixture
def link(redis_server: RedisServer) -> None:
    """Replaced by a RedisLink to `redis_server` inside the test's loop (in_loop)."""


@in_loop
async def test_the_fixture_answers_and_can_be_stopped_and_restarted(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    try:
        assert server.ping()
        server.stop()
        assert not server.ping()
        server.start()
        assert server.ping()
    finally:
        server.stop()


@in_loop
async def test_a_stopped_then_hung_redis_is_down_within_a_second_and_comes_back(
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path).start()
    link = await _link(server)
    try:
        server.stop()
        started = time.monotonic()
        assert not await link.probe()
        assert time.monotonic() - started < 1.5
        with pytest.raises(ClusterUnavailable):
            await link.run(lambda c: c.ping())
        hung = HungServer(server.port)
        try:
            link.up = True  # as if it had come back just before hanging
            started = time.monotonic()
            with pytest.raises(ClusterUnavailable):
                await link.run(lambda c: c.get("x"))
            assert time.monotonic() - started < 1.5
            assert not link.up
            started = time.monotonic()
            assert not await link.probe()
            assert time.monotonic() - started < 1.5
        finally:
            hung.close()
        server.start()
        recovered = link.on_recovery()
        assert await link.probe()
        assert link.up and recovered.is_set()
    finally:
        await link.close()
        server.stop()


@in_loop
async def test_leases_never_exceed_the_limit_across_nodes_and_come_back(
    link: RedisLink, redis_server: RedisServer
) -> None:
    a = SlotLeases(link, "a", 3.0, lambda: 2)
    b = SlotLeases(link, "b", 3.0, lambda: 2)
    first = await a.acquire("orange", 2)
    second = await b.acquire("orange", 2)
    assert first is not None and second is not None
    assert await a.acquire("orange", 2) is None
    assert await b.acquire("orange", 2) is None
    assert await a.acquire("free", 2) is not None  # per provider
    b.release(second)
    await b.drain()
    third = await a.acquire("orange", 2)
    assert third is not None
    counts = await a.cluster_counts()
    assert counts["orange"] == {"a": 2}
    await a.renew()
    assert not first.lost and not third.lost
    # a node that dies: its leases expire after `lease` (3 s here), renewed by nobody
    started = time.monotonic()
    while (await b.acquire("orange", 2)) is None:
        assert time.monotonic() - started < 5
        await asyncio.sleep(0.1)
    assert 2.5 < time.monotonic() - started < 4.0  # after the lease, not before
    await a.renew()
    assert first.lost or third.lost  # its place was taken while it did not renew


@in_loop
async def test_leases_fall_back_to_the_local_share_while_redis_is_down(
    link: RedisLink, redis_server: RedisServer
) -> None:
    leases = SlotLeases(link, "a", 3.0, lambda: 3)
    link.up = False
    one = await leases.acquire("orange", 7)
    two = await leases.acquire("orange", 7)
    assert one is not None and two is not None
    assert await leases.acquire("orange", 7) is None  # 7 // 3 = 2
    assert await leases.acquire("tiny", 2) is not None  # at least 1 each
    assert await leases.acquire("tiny", 2) is None
    assert await link.probe()
    other = SlotLeases(link, "b", 3.0, lambda: 3)
    taken = [await other.acquire("orange", 7) for _ in range(6)]
    assert sum(t is not None for t in taken) == 6
    await leases.renew()  # back: one of its two fits under 7, the other is lost
    assert [one.lost, two.lost].count(True) == 1


@in_loop
async def test_a_shared_rate_spaces_events_of_every_node_on_one_timeline(
    link: RedisLink, redis_server: RedisServer
) -> None:
    rate = parse_rate("50/s")  # 20 ms apart
    buckets = [
        SharedRates(link, lambda: 2, time.monotonic).bucket("orange", "provider", rate)
        for _ in range(2)
    ]
    taken: list[float] = []
    deadline = time.monotonic() + 5
    while len(taken) < 40 and time.monotonic() < deadline:
        for bucket in buckets:
            now = time.monotonic()
            if bucket.delay(now) <= 0:
                bucket.take(now)
                taken.append(now)
        await asyncio.sleep(0.002)
    assert len(taken) == 40
    span = taken[-1] - taken[0]
    assert 39 * 0.020 * 0.9 <= span <= 39 * 0.020 * 1.3, span


@in_loop
async def test_a_shared_rate_uses_the_local_share_while_redis_is_down(
    link: RedisLink, redis_server: RedisServer
) -> None:
    bucket = SharedRates(link, lambda: 4, time.monotonic).bucket("x", "provider", parse_rate("4/s"))
    link.up = False
    now = time.monotonic()
    assert bucket.delay(now) == 0
    bucket.take(now)
    assert bucket.delay(now) == pytest.approx(1.0)  # 4/s over 4 nodes: one a second


async def _mailbox_takes(mailboxes: list[Any], seconds: float) -> list[float]:
    """Every node sends to one mailbox as soon as its rate allows, for `seconds`: the
    times their recipients were let through."""
    taken: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for mailbox in mailboxes:
            [wait] = await mailbox.admit(["same@x.test"], time.monotonic())
            if wait <= 0:
                taken.append(time.monotonic())
        await asyncio.sleep(0.005)
    return taken


@in_loop
async def test_two_nodes_never_send_to_a_mailbox_faster_than_its_rate_together(
    link: RedisLink, redis_server: RedisServer
) -> None:
    other = await _link(redis_server)
    rate = parse_rate("10/s")  # 100 ms apart
    nodes = [
        SharedRates(node_link, lambda: 2, time.monotonic).mailboxes("orange", rate)
        for node_link in (link, other)
    ]
    try:
        taken = await _mailbox_takes(nodes, 1.0)
        assert 8 <= len(taken) <= 11, taken  # 1 s at 10/s, not 10/s per node
        gaps = [b - a for a, b in itertools.pairwise(taken)]
        assert min(gaps) >= 0.1 * 0.8, gaps  # Redis's clock decides; ours sees jitter
        # a batch: each mailbox once, and the second recipient to one mailbox waits
        waits = await nodes[0].admit(["a@x.test", "b@x.test", "a@x.test"], time.monotonic())
        assert waits[:2] == [0, 0] and 0.05 < waits[2] <= 0.1, waits
        ttl = await link.client.pttl("relay:rate:orange:rcpt:a@x.test")
        assert 0 < ttl <= 1100  # gone a second after its time: nothing piles up
    finally:
        await other.close()


@in_loop
async def test_mailboxes_use_the_local_share_while_redis_is_down_and_remember_it(
    link: RedisLink, redis_server: RedisServer
) -> None:
    mailboxes = SharedRates(link, lambda: 2, time.monotonic).mailboxes("x", parse_rate("1/s"))
    redis_server.stop()
    assert not await link.probe()
    now = time.monotonic()
    assert await mailboxes.admit(["m@x.test"], now) == [0]
    [wait] = await mailboxes.admit(["m@x.test"], now)
    assert wait == pytest.approx(2.0)  # 1/s over 2 nodes: one every 2 s
    assert not mailboxes.idle(now)
    redis_server.start()
    assert await link.probe()
    # Redis never saw the outage's recipient: this node's own record is the floor
    [wait] = await mailboxes.admit(["m@x.test"], time.monotonic())
    assert 0.8 < wait <= 1.0, wait
    assert await link.client.get("relay:rate:x:rcpt:m@x.test") is None


@in_loop
async def test_mailboxes_fall_back_within_the_command_bound_when_redis_hangs(
    link: RedisLink, redis_server: RedisServer
) -> None:
    mailboxes = SharedRates(link, lambda: 3, time.monotonic).mailboxes("x", parse_rate("1/s"))
    redis_server.stop()
    hung = HungServer(redis_server.port)
    try:
        link.up = True  # as if it hung just after the last probe
        started = time.monotonic()
        assert await mailboxes.admit(["m@x.test"], started) == [0]
        assert time.monotonic() - started < 1.5
        assert not link.up
        [wait] = await mailboxes.admit(["m@x.test"], time.monotonic())
        assert wait == pytest.approx(3.0, abs=0.1)  # the local share, at once
    finally:
        hung.close()


def _account(rate: str, name: str = "app") -> Account:
    return Account(name, Secret("x"), ("*@example.org",), None, parse_rate(rate))


@in_loop
async def test_an_account_rate_is_one_budget_for_two_nodes(
    link: RedisLink, redis_server: RedisServer
) -> None:
    other = await _link(redis_server)
    nodes = [SharedAccountRates(LocalAccountRates(), node_link) for node_link in (link, other)]
    account = _account("10/min")  # a burst of 10, then one every 6 s
    try:
        allowed = [await nodes[i % 2].allow(account) for i in range(16)]
        assert allowed == [True] * 10 + [False] * 6
        assert await nodes[1].allow(_account("10/min", "other"))  # a budget of its own
        assert 0 < await link.client.pttl("relay:account-rate:app") <= 61_000
    finally:
        await other.close()


@in_loop
async def test_an_account_rate_uses_the_local_share_while_redis_is_down_or_hangs(
    link: RedisLink, redis_server: RedisServer
) -> None:
    rates = SharedAccountRates(LocalAccountRates(), link)
    rates.live_nodes = 3
    account = _account("10/min")
    redis_server.stop()
    assert not await link.probe()
    assert [await rates.allow(account) for _ in range(4)] == [True] * 3 + [False]  # 10 // 3
    hung = HungServer(redis_server.port)
    try:
        hungry = SharedAccountRates(LocalAccountRates(), link)
        hungry.live_nodes = 2
        link.up = True  # as if it hung just after the last probe
        for expected in (True,) * 5 + (False,):  # 10 // 2, decided here
            started = time.monotonic()
            assert await hungry.allow(account) is expected
            assert time.monotonic() - started < 0.2  # the 50 ms budget, not the link's 1 s
    finally:
        hung.close()


class Sink:
    def __init__(self) -> None:
        self.events: list[LaneEvent] = []
        self.changed = asyncio.Event()

    def apply_shared(self, event: LaneEvent) -> None:
        self.events.append(event)
        self.changed.set()


@in_loop
async def test_lane_events_reach_the_other_nodes_and_are_read_back_later(
    link: RedisLink, redis_server: RedisServer
) -> None:
    other = await _link(redis_server)
    here, there = SharedLanes(link, "a"), SharedLanes(other, "b")
    sink, own = Sink(), Sink()
    tasks = [
        asyncio.create_task(there.follow(sink)),
        asyncio.create_task(here.follow(own)),
    ]
    try:
        await asyncio.sleep(0.3)  # subscribed
        now = time.time()
        here.announce(LaneEvent("orange", "suspend", now, now + 60, "550 ofr_506"))
        await asyncio.wait_for(sink.changed.wait(), 1.0)
        assert [(e.lane, e.kind, e.node) for e in sink.events] == [("orange", "suspend", "a")]
        assert own.events == []  # its own event is not applied back
        late_link = await _link(redis_server)
        late, late_sink = SharedLanes(late_link, "c"), Sink()
        await late.reread(late_sink)
        await late_link.close()
        assert [e.kind for e in late_sink.events] == ["suspend"]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await other.close()


@in_loop
async def test_auth_failures_lock_an_ip_out_on_every_node(
    link: RedisLink, redis_server: RedisServer
) -> None:
    here = SharedAuthFailures(LocalAuthFailures(), link)
    other = await _link(redis_server)
    there = SharedAuthFailures(LocalAuthFailures(), other)
    for _ in range(IP_LOCKOUT_AFTER):
        assert await here.attempt("192.0.2.7", "webapp")
        await here.failed("192.0.2.7", "webapp")
    await asyncio.sleep(0.2)  # the counts are added in the background
    assert not await there.attempt("192.0.2.7", "other")
    assert await there.attempt("192.0.2.8", "other")
    await other.close()
    link.up = False  # down: the local count decides alone, at once
    started = time.monotonic()
    assert not await here.attempt("192.0.2.7", "webapp")
    assert await here.attempt("192.0.2.9", "webapp")
    assert time.monotonic() - started < 0.1


@in_loop
async def test_heartbeats_count_live_nodes_and_remember_silent_ones(
    link: RedisLink, redis_server: RedisServer
) -> None:
    a = Nodes(link, "a", "a.test:25", None)
    b = Nodes(link, "b", "b.test:25", None)
    await a.beat()
    await b.beat()
    await a.beat()
    assert a.last_live == 2
    await link.client.delete("relay:node:b")  # b stopped beating and its TTL ran out
    await a.beat()
    assert a.last_live == 1
    records = {r.node: r for r in await a.records()}
    assert records["a"].live and not records["b"].live
    assert records["b"].address == "b.test:25" and records["b"].age < 5


@in_loop
async def test_a_lock_has_one_holder_and_a_growing_fencing_token(
    link: RedisLink, redis_server: RedisServer
) -> None:
    a, b = Locks(link, "a"), Locks(link, "b")
    held = await a.acquire("takeover:c", 5)
    assert held is not None
    assert await b.acquire("takeover:c", 5) is None
    assert await a.keep(held, 5)
    await a.release(held)
    again = await b.acquire("takeover:c", 5)
    assert again is not None and again.token == held.token + 1
    assert not await a.keep(held, 5)


def test_a_single_node_never_imports_redis() -> None:
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, relay.app, relay.cli, relay.listener.worker; "
            "print('redis' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.stdout.strip() == "False", probe.stderr


def test_the_cluster_block_is_read_and_checked(tmp_path: Path) -> None:
    from relay.config.loader import load_config
    from relay.errors import ConfigError

    def load(cluster: dict[str, Any]) -> Any:
        path = tmp_path / "relay.yaml"
        path.write_text(yaml.safe_dump({"spool": {"path": str(tmp_path)}, "cluster": cluster}))
        return load_config(str(path))

    config = load({"redis": "redis://127.0.0.1:6379/0", "node": "relay-a", "lease": "10s"})
    assert (config.cluster.node, config.cluster.lease) == ("relay-a", 10.0)
    assert "6379" not in repr(config.cluster)  # the URL may carry a password
    with pytest.raises(ConfigError) as error:
        load({"redis": "10.0.0.5:6379", "node": "a b", "lease": "1s"})
    problems = "\n".join(error.value.problems)
    assert "cluster.redis: expected a URL" in problems
    assert "cluster.node:" in problems
    assert "cluster.lease: must be at least 3s" in problems


@in_loop
async def test_an_event_older_than_the_stored_one_is_not_kept(
    link: RedisLink, redis_server: RedisServer
) -> None:
    """A node's outbox can deliver an event late: the hash keeps the latest by `at`."""
    here = SharedLanes(link, "a")
    now = time.time()
    here.announce(LaneEvent("orange", "suspend", now, now + 60, "later"))
    await asyncio.sleep(0.3)
    other = await _link(redis_server)
    try:
        SharedLanes(other, "b").announce(LaneEvent("orange", "resume", now - 5, 0.0, ""))
        await asyncio.sleep(0.3)
        late, sink = SharedLanes(other, "c"), Sink()
        await late.reread(sink)
        assert [(e.kind, e.reason) for e in sink.events] == [("suspend", "later")]
    finally:
        await other.close()
