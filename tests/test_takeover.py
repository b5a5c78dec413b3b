"""Takeover (SPEC §9): two `relay serve` nodes with their spools on one shared directory
and one real redis-server. A node killed with mail queued is adopted by the other, which
delivers every message once; the killed node, back, delivers none of them; a node that
finds its directory being adopted waits until it is released."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.dnsserver import DnsServer
from tests.mxserver import MxFarm
from tests.redisserver import RedisServer
from tests.relayproc import RelayProcess, base_config, make_message
from tests.support import route, scrape, submit_many, wait_until

TAKEOVER_AFTER = 5.0
DEFERRED = (("class", "transactional"), ("provider", "default"), ("state", "deferred"))


def _node(
    tmp_path: Path,
    name: str,
    dns_server: DnsServer,
    mx_farm: MxFarm,
    password_hash: str,
    redis_server: RedisServer,
    **extra: Any,
) -> RelayProcess:
    workdir = tmp_path / name
    workdir.mkdir(exist_ok=True)
    config = base_config(
        workdir,
        dns_server.port,
        mx_farm.port,
        password_hash,
        cluster={
            "redis": redis_server.url,
            "node": name,
            "lease": "3s",
            "shared_spool": str(tmp_path / "shared"),
            "takeover_after": f"{TAKEOVER_AFTER:g}s",
        },
        **{"retry": {"initial": "1s", "max": "2s", "lifetime": "1h"}, **extra},
    )
    return RelayProcess(workdir, config)


def _messages(directory: Path) -> list[Path]:
    root = directory / "messages"
    if not root.exists():
        return []
    return [p for p in root.rglob("*") if p.is_file() and not p.suffix and "." not in p.name]


@pytest.fixture
def nodes(tmp_path, dns_server, mx_farm, password_hash, redis_server):
    made: list[RelayProcess] = []

    def make(name: str, **extra: Any) -> RelayProcess:
        node = _node(tmp_path, name, dns_server, mx_farm, password_hash, redis_server, **extra)
        made.append(node)
        return node

    yield make
    for node in made:
        node.stop()


def test_a_killed_nodes_mail_is_delivered_once_by_a_peer(tmp_path, nodes, dns_server, mx_farm):
    route(dns_server, "example.test", "127.0.0.31")
    mx = mx_farm.server("127.0.0.31")
    refusing = True
    mx.rcpt_hook = lambda address: "451 4.3.0 try again later" if refusing else None
    a, b = nodes("a").start(), nodes("b").start()
    count = 500
    submit_many(a, lambda i: [f"user{i}@example.test"], count, threads=4)
    shared_a = tmp_path / "shared" / "a"
    assert len(_messages(shared_a)) == count
    assert wait_until(lambda: mx.connections > 0, 10)

    a.kill()
    killed = time.monotonic()
    refusing = False
    b.wait_log("cluster: adopted ", timeout=TAKEOVER_AFTER + 20)
    adopted = time.monotonic() - killed
    received = mx.wait_messages(count, timeout=60)
    time.sleep(2)  # anything sent twice would arrive now
    counts = Counter(r for m in mx.messages for r in m.rcpt_tos)
    assert len(counts) == count and set(counts.values()) == {1}, counts.most_common(3)
    assert len(received) == count
    assert TAKEOVER_AFTER <= adopted <= TAKEOVER_AFTER + 10, adopted
    assert _messages(shared_a) == []
    assert json.loads((shared_a / "adopted").read_text())["done"] is True
    assert f"adopted {shared_a}: {count} messages" in b.log()

    a.start()  # back: its directory is empty, it delivers none of them again
    assert "was adopted by b while this node was away" in a.log()
    assert not (shared_a / "adopted").exists()
    assert wait_until(lambda: scrape(a)["relay_cluster_nodes"].get((), 0) == 2, 10)
    a.send("app@example.org", ["later@example.test"], make_message("after"))
    mx.wait_messages(count + 1, timeout=20)
    time.sleep(1)
    assert len(mx.messages) == count + 1


def test_a_node_whose_directory_is_being_adopted_waits(tmp_path, nodes, redis_server):
    """The adopter's lock held and its marker in the directory: the node's start waits,
    and goes on once the marker is gone."""
    client = redis.Redis.from_url(redis_server.url)
    client.set("relay:lock:spool:a", "b", px=60_000)
    directory = tmp_path / "shared" / "a"
    directory.mkdir(parents=True)
    (directory / "adopted").write_text(json.dumps({"by": "b", "token": 7, "at": time.time()}))
    a = nodes("a")
    log = open(a.log_path, "ab")
    a.proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "-c", str(a.config_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=a.workdir,
    )
    log.close()
    a.wait_log("is being adopted by b; waiting until it is released")
    time.sleep(2)
    assert "recovered" not in a.log() and "listening" not in a.log().lower()
    (directory / "adopted").unlink()
    a.wait_log("released; starting")
    assert wait_until(lambda: "recovered" in a.log(), 10)


def test_a_marker_left_by_an_adopter_that_died_is_taken_back(tmp_path, nodes):
    directory = tmp_path / "shared" / "a"
    directory.mkdir(parents=True)
    (directory / "adopted").write_text(json.dumps({"by": "b", "token": 3, "at": time.time()}))
    a = nodes("a").start()  # no lock held: the adopter is gone
    assert "who stopped; taking it back" in a.log()
    assert not (directory / "adopted").exists()


def test_a_node_adopted_while_frozen_starts_no_delivery_when_it_wakes(
    tmp_path, nodes, dns_server, mx_farm
):
    """A node frozen past takeover_after is declared dead and adopted. Woken with its
    mail made due at once (a flush waiting in its admin socket), it tries none of it:
    it finds the adoption marker first and drains. (Its files are gone anyway: it could
    not have sent a message it had not loaded before it froze.)"""
    route(dns_server, "example.test", "127.0.0.32")
    mx = mx_farm.server("127.0.0.32")
    refusing = True
    mx.rcpt_hook = lambda address: "451 4.3.0 try again later" if refusing else None
    slow = {"retry": {"initial": "1h", "max": "1h", "lifetime": "1d"}}
    a, b = nodes("a", **slow).start(), nodes("b", **slow).start()
    count = 50
    submit_many(a, lambda i: [f"user{i}@example.test"], count, threads=2)
    assert mx.wait_for(lambda: len(mx.open_ids) == 0 and mx.connections > 0, 40)
    assert wait_until(lambda: scrape(a)["relay_queue_depth"].get(DEFERRED, 0) == count, 20)
    assert a.proc is not None
    a.proc.send_signal(signal.SIGSTOP)
    woken: list[tuple[int, Any]] = []
    try:
        refusing = False
        b.wait_log("cluster: adopted ", timeout=TAKEOVER_AFTER + 20)
        assert b.cli("queue", "flush").returncode == 0  # adopted mail keeps its schedule
        mx.wait_messages(count, timeout=30)
        flush = threading.Thread(target=lambda: woken.append(a.api("POST", "/api/queue/flush", {})))
        flush.start()
        time.sleep(0.5)  # the request waits in the frozen node's socket
    finally:
        a.proc.send_signal(signal.SIGCONT)
    flush.join(20)
    a.wait_log("stopping delivery and shutting down", timeout=10)
    assert a.proc.wait(timeout=30) == 75  # EX_TEMPFAIL: a supervisor starts it again
    time.sleep(1)
    counts = Counter(r for m in mx.messages for r in m.rcpt_tos)
    assert len(counts) == count and set(counts.values()) == {1}, counts.most_common(3)
    assert "status=delivered" not in a.log()
    assert "cannot be read from the spool" not in a.log()  # not even tried
