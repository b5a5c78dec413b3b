"""Three `relay serve` processes sharing one real redis-server, delivering to recording MX
servers on loopback (SPEC §9): limits are the cluster's (connections, rates, a mailbox's
rate, an account's rate), a suspension on one node holds on all, a dead node's slots
come back, and a Redis that stops or hangs changes neither submission nor the safety of
the limits."""

from __future__ import annotations

import contextlib
import smtplib
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import providers as p
from tests.dnsserver import DnsServer
from tests.mxserver import MxFarm
from tests.redisserver import HungServer, RedisServer
from tests.relayproc import RelayProcess, base_config, environ_without_proxy, make_message
from tests.support import route, scrape, submit_many, wait_until

LEASE = "3s"


@pytest.fixture
def cluster(
    tmp_path: Path,
    dns_server: DnsServer,
    mx_farm: MxFarm,
    password_hash: str,
    redis_server: RedisServer,
) -> Iterator[Callable[..., list[RelayProcess]]]:
    """Start three nodes (a, b, c) with the same extra config, each with its own spool."""
    started: list[RelayProcess] = []

    def make(**extra: Any) -> list[RelayProcess]:
        nodes = []
        for name in ("a", "b", "c"):
            workdir = tmp_path / name
            workdir.mkdir()
            config = base_config(
                workdir,
                dns_server.port,
                mx_farm.port,
                password_hash,
                cluster={"redis": redis_server.url, "node": name, "lease": LEASE},
                **extra,
            )
            node = RelayProcess(workdir, config)
            started.append(node)
            nodes.append(node)
        for node in nodes:
            node.start()
        for node in nodes:
            assert wait_until(lambda n=node: _gauge(n, "relay_cluster_nodes") == 3, 10)
        return nodes

    yield make
    for node in started:
        node.stop()


def _gauge(node: RelayProcess, name: str) -> float:
    return scrape(node)[name].get((), -1.0)


def _spread(nodes: list[RelayProcess], domain: str, count: int) -> None:
    """`count` messages to `domain`, submitted over the three nodes at once."""
    threads = [
        threading.Thread(
            target=submit_many,
            args=(node, lambda i, k=k: [f"u{k}-{i}@{domain}"], count // len(nodes)),
            kwargs={"threads": 2},
        )
        for k, node in enumerate(nodes)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)


def test_three_nodes_never_open_more_than_max_connections_together(cluster, dns_server, mx_farm):
    route(dns_server, "orange.fr", "127.0.0.20")
    mx = mx_farm.server("127.0.0.20")
    nodes = cluster(
        providers={
            "orange": {
                "domains": ["orange.fr"],
                "max_connections": 2,
                # short sessions: slots change hands between nodes all along
                "max_messages_per_connection": 10,
            }
        }
    )
    _spread(nodes, "orange.fr", 600)
    mx.wait_messages(600, timeout=90)
    assert mx.max_open <= 2, mx.max_open
    assert mx.connections >= 60  # the sessions really were short
    status = nodes[0].api("GET", "/api/cluster")[1]
    assert {n["node"] for n in status["nodes"] if n["live"]} == {"a", "b", "c"}
    printed = subprocess.run(
        [sys.executable, "-m", "relay", "cluster", "status", "-c", str(nodes[1].config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        env=environ_without_proxy(),
    )
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.startswith("node b: Redis up, 3 live nodes (lease 3s)")
    assert all(f"\n{name} " in printed.stdout for name in "abc"), printed.stdout
    for node in nodes:
        assert "Redis is up" in node.log()


def test_a_cluster_rate_is_one_budget(cluster, dns_server, mx_farm):
    """The issue asks 300/min over 60 s; for CI time this is 1200/min (20/s) over ~12 s
    of a 240-message backlog spread over the three nodes: 5 % is then 1 message a second,
    still well above what the measurement can resolve (arrival times at the MX)."""
    route(dns_server, "paced.test", "127.0.0.21")
    mx = mx_farm.server("127.0.0.21")
    nodes = cluster(
        providers={"paced": {"domains": ["paced.test"], "rate": "1200/min", "max_connections": 3}}
    )
    _spread(nodes, "paced.test", 240)
    messages = mx.wait_messages(240, timeout=60)
    times = sorted(m.time for m in messages)
    # Inside the backlog: skip the first and last 20 (submission still arriving, tail).
    window = times[20:-20]
    rate = (len(window) - 1) / (window[-1] - window[0])
    assert abs(rate - 20.0) <= 1.0, rate


def _rate_waits(node: RelayProcess, message_id: str) -> int:
    """How often the message's recipients were held back by their mailbox's rate."""
    status, body = node.api("GET", f"/api/queue/{message_id}")
    if status != 200:
        return 0
    return sum(1 for e in body["timeline"] if e.get("reason") == "recipient rate")


def test_a_mailbox_rate_is_one_budget_for_the_cluster(cluster, dns_server, mx_farm):
    route(dns_server, "target.test", "127.0.0.25")
    mx = mx_farm.server("127.0.0.25")
    nodes = cluster(providers={"target": {"domains": ["target.test"], "recipient_rate": "2/min"}})
    sent = [
        (node, node.send("app@example.org", ["same@target.test"], make_message(f"{k}-{i}")))
        for k, node in enumerate(nodes)
        for i in range(2)
    ]
    # Every node tried its mail to the mailbox: one went, the five others wait for the
    # cluster's next slot, 30 s on (per node, three would have gone at once).
    assert wait_until(lambda: sum(_rate_waits(n, i) > 0 for n, i in sent) == 5, 15)
    mx.wait_messages(1, timeout=5)
    time.sleep(0.5)  # anything sent meanwhile would arrive now
    assert len(mx.messages) == 1, [m.time for m in mx.messages]


def test_an_account_rate_is_one_budget_for_the_cluster(cluster, dns_server, password_hash):
    route(dns_server, "example.test", "127.0.0.28")
    account = {"name": "app", "password": password_hash, "senders": ["*@example.org"]}
    nodes = cluster(accounts=[{**account, "rate": "10/min"}])  # a burst of 10, then 1 / 6 s
    replies: list[tuple[int, bytes]] = []
    with contextlib.ExitStack() as stack:
        clients: list[smtplib.SMTP] = [stack.enter_context(node.client()) for node in nodes]
        started = time.monotonic()
        for i in range(18):
            smtp = clients[i % 3]
            code, reply = smtp.mail("app@example.org")
            replies.append((code, reply))
            if code == 250:
                assert smtp.rcpt("x@example.test")[0] == 250
                assert smtp.data(make_message(f"r{i}"))[0] == 250
        elapsed = time.monotonic() - started
    assert elapsed < 5.0  # no refill meanwhile: the budget is exactly the burst
    assert [code for code, _ in replies] == [250] * 10 + [450] * 8, replies
    for _, reply in replies[10:]:
        assert reply.startswith(b"4.7.1") and b"over its sending rate" in reply, reply


def test_an_account_rate_is_shared_out_while_redis_is_down(
    cluster, dns_server, password_hash, redis_server
):
    """Each node's listener process was told of 3 live nodes: with Redis gone, each allows
    its share, 10 // 3, at once, and MAIL is not slowed."""
    route(dns_server, "example.test", "127.0.0.29")
    account = {"name": "app", "password": password_hash, "senders": ["*@example.org"]}
    nodes = cluster(accounts=[{**account, "rate": "10/min"}])
    redis_server.stop()
    for node in nodes:
        node.wait_log("Redis is down", timeout=3)
    for node in nodes:
        with node.client() as smtp:
            codes = []
            for _ in range(5):
                started = time.monotonic()
                code, _ = smtp.mail("app@example.org")
                assert time.monotonic() - started < 0.5
                codes.append(code)
                smtp.rset()
        assert codes == [250] * 3 + [450] * 2, (node.workdir, codes)


def test_a_suspension_on_one_node_stops_all_three_within_a_second(cluster, dns_server, mx_farm):
    route(dns_server, "orange.fr", "127.0.0.22")
    mx = mx_farm.server("127.0.0.22")
    mails: list[float] = []
    fired: list[float] = []
    lock = threading.Lock()

    def mail(_: str) -> None:
        with lock:
            mails.append(time.monotonic())

    def rcpt(_: str) -> str | None:
        with lock:
            if fired or len(mails) < 30:
                return None
            fired.append(time.monotonic())  # once: the other nodes must learn it from it
            return p.ORANGE_OFR_506

    mx.mail_hook = mail  # type: ignore[assignment]
    mx.rcpt_hook = rcpt
    nodes = cluster(
        providers={
            "orange": {
                "domains": ["orange.fr"],
                "max_connections": 3,
                "rate": "1800/min",  # a steady stream from every node, not a burst
                "rules": [{"match": "ofr_506", "action": "suspend", "for": "30s"}],
            }
        }
    )
    _spread(nodes, "orange.fr", 150)
    assert mx.wait_for(lambda: bool(fired), 30)
    time.sleep(3)  # watch what still arrives
    with lock:
        late = [t - fired[0] for t in mails if t > fired[0] + 1.0]
    assert late == [], late
    for node in nodes:
        node.wait_log("suspended for", timeout=2)


def test_a_killed_nodes_slots_are_used_by_the_others_within_the_lease(cluster, dns_server, mx_farm):
    route(dns_server, "orange.fr", "127.0.0.23")
    mx = mx_farm.server("127.0.0.23")
    mx.stall_data()  # every transaction stays in flight: its connection holds its slot
    a, b, c = cluster(providers={"orange": {"domains": ["orange.fr"], "max_connections": 2}})
    submit_many(a, lambda i: [f"a{i}@orange.fr"], 4, threads=1)
    assert mx.wait_for(lambda: mx.stalled() == 2, 20)
    status = b.api("GET", "/api/cluster")[1]
    assert status["leases"] == {"orange": {"a": 2}}, status
    submit_many(b, lambda i: [f"b{i}@orange.fr"], 2, threads=1)
    submit_many(c, lambda i: [f"c{i}@orange.fr"], 2, threads=1)
    before = mx.connections
    a.kill()
    killed = time.monotonic()
    assert mx.wait_for(lambda: mx.connections >= before + 2, 10)
    with mx.farm.cond:
        reused = sorted(t - killed for t in mx.connect_times[before:])
    assert reused[1] <= 3.0 + 1.0, reused  # lease + 1 s
    assert mx.max_open <= 2
    mx.release()


def _submit_timed(node: RelayProcess, stop: threading.Event, out: list[tuple[float, float]]):
    """One session and one message at a time, until `stop`: (start, latency) each."""
    i = 0
    while not stop.is_set() and i < 2000:
        started = time.monotonic()
        node.send("app@example.org", [f"t{i}@orange.fr"], make_message(f"t{i}"))
        out.append((started, time.monotonic() - started))
        i += 1
        time.sleep(0.02)


def test_redis_stopped_then_hung_changes_neither_submission_nor_safe_limits(
    cluster, dns_server, mx_farm, redis_server
):
    route(dns_server, "orange.fr", "127.0.0.24")
    mx = mx_farm.server("127.0.0.24")
    nodes = cluster(providers={"orange": {"domains": ["orange.fr"], "max_connections": 3}})
    stop = threading.Event()
    timings: list[list[tuple[float, float]]] = [[] for _ in nodes]
    errors: list[BaseException] = []

    def run(node: RelayProcess, out: list[tuple[float, float]]) -> None:
        try:
            _submit_timed(node, stop, out)
        except BaseException as exc:  # a refused or failed submission
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(n, t)) for n, t in zip(nodes, timings, strict=True)
    ]
    for thread in threads:
        thread.start()
    try:
        time.sleep(4)
        outage = time.monotonic()
        redis_server.stop()
        for node in nodes:
            node.wait_log("Redis is down", timeout=3)
        assert all(_gauge(n, "relay_cluster_redis_up") == 0 for n in nodes)
        time.sleep(3)
        hung = HungServer(redis_server.port)
        time.sleep(4)
        hung.close()
        redis_server.start()
        back = time.monotonic()
        assert wait_until(lambda: all(_gauge(n, "relay_cluster_redis_up") == 1 for n in nodes), 5)
        shared = time.monotonic() - back
        time.sleep(3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert errors == []
    assert shared <= 5.0
    latencies = [t for out in timings for t in out]
    before = [lat for out in timings for start, lat in out if start < outage]
    during = [lat for out in timings for start, lat in out if outage <= start < back]
    assert len(before) > 30 and len(during) > 60, (len(before), len(during))
    # medians: one slow fsync on a busy CI machine must not decide
    slower = statistics.median(during) / statistics.median(before)
    assert slower <= 1.10, (statistics.median(before), statistics.median(during))
    mx.wait_messages(len(latencies), timeout=60)
    assert mx.max_open <= 3, mx.max_open
    for node in nodes:
        assert "limits are shared again" in node.log()


def test_an_account_tripped_on_one_node_is_refused_on_all(
    cluster, dns_server, mx_farm, password_hash
):
    """Account guards are cluster-wide (SPEC §9): a trip on one node refuses the
    account's MAIL on every node, and a release on any node lifts it everywhere."""
    route(dns_server, "customers.test", "127.0.0.26")
    mx_farm.server("127.0.0.26")
    app = {
        "name": "app",
        "password": password_hash,
        "senders": ["*@example.org"],
        "guard": {"action": "refuse", "min_volume": 20},
    }
    a, b, c = cluster(accounts=[app])
    with a.client() as smtp:
        for i in range(21):
            smtp.sendmail("app@example.org", [f"c{i}@customers.test"], make_message(f"m{i}"))
    a.wait_log("tripped the account guard")

    def mail_code(node: RelayProcess) -> int:
        with node.client() as smtp:
            return smtp.mail("app@example.org")[0]

    started = time.monotonic()
    assert wait_until(lambda: mail_code(b) == 450 and mail_code(c) == 450, timeout=10)
    told = time.monotonic() - started
    assert told < 3, told
    assert "tripped the account guard on node a" in b.log()
    released = b.cli("account", "release", "app")
    assert released.returncode == 0, released.stderr
    assert wait_until(lambda: mail_code(a) == 250 and mail_code(c) == 250, timeout=10)
    assert "released from the account guard on node b" in a.log()
