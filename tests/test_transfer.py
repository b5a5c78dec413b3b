"""Hand-off (SPEC §9): `relay queue transfer` moves queued mail to a peer relay over SMTP.

Two `relay serve` nodes on loopback, a recording MX behind them, real DNS: what node A
held arrives at the MX through node B, each message once; what the peer refuses, or
what was in flight when it vanished, stays on A and is delivered from there later.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any

from tests.load import MESSAGE_ID
from tests.relayproc import PASSWORD, RelayProcess, free_port, make_message
from tests.support import route, scrape, submit_many, wait_until

TOKEN = "test-admin-token"


def transfer(
    relay: RelayProcess, *args: str, env: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """`relay queue transfer ... --json` against `relay`: its exit status and report."""
    done = subprocess.run(
        [
            *(sys.executable, "-m", "relay", "queue", "transfer", *args, "--json"),
            *("-c", str(relay.config_path), "--token", TOKEN),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert done.stdout.strip(), done.stderr
    return done.returncode, json.loads(done.stdout)


def queued(relay: RelayProcess, provider: str = "") -> list[dict[str, Any]]:
    """Every queued message (of `provider`), through the API's pages."""
    found: list[dict[str, Any]] = []
    after = ""
    while True:
        status, page = relay.api("GET", f"/api/queue?limit=1000&provider={provider}&after={after}")
        assert status == 200, page
        found += page["messages"]
        after = page["next"]
        if not after:
            return found


def ids(messages: list[Any]) -> Counter[str]:
    """Message-ID header of each received message, counted."""
    found: Counter[str] = Counter()
    for m in messages:
        match = MESSAGE_ID.search(m.data)
        assert match is not None, m.data[:300]
        found[match.group(1).decode()] += 1
    return found


def received(relay: RelayProcess) -> float:
    return sum(scrape(relay)["relay_messages_received_total"].values())


def send_tagged(relay: RelayProcess, count: int, to: list[str], tag: str) -> set[str]:
    """`count` messages with Message-IDs tag-N@load.test; those IDs."""
    with relay.client() as smtp:
        for n in range(count):
            smtp.sendmail(
                "app@example.org",
                to,
                make_message(f"{tag} {n}", headers=f"Message-ID: <{tag}-{n}@load.test>\r\n"),
            )
    return {f"{tag}-{n}@load.test" for n in range(count)}


def node_a(relay_factory, **extra: Any) -> RelayProcess:
    return relay_factory(node="a", admin={"port": free_port(), "token": TOKEN}, **extra)


def node_b(relay_factory, trusted: bool = True, **extra: Any) -> RelayProcess:
    """The peer: node A may submit without AUTH (`trusted`), or must log in."""
    return relay_factory(
        node="b",
        hostname="relay-b.test",
        admin={"port": free_port(), "token": TOKEN},
        listeners=[
            {
                "name": "submission",
                "address": "127.0.0.1",
                "port": free_port(),
                "tls": "starttls",
                "auth": "required",
                "class": "transactional",
                "trusted_networks": ["127.0.0.1/32"] if trusted else [],
            }
        ],
        **extra,
    )


def test_a_thousand_messages_move_to_the_peer_none_lost_none_twice(
    relay_factory, dns_server, mx_farm
):
    route(dns_server, "dest.test", "127.0.0.2")
    route(dns_server, "keep.test", "127.0.0.3")
    mx = mx_farm.server("127.0.0.2")
    mx_farm.server("127.0.0.3")
    providers = {"dest": {"domains": ["dest.test"]}, "keep": {"domains": ["keep.test"]}}
    # A cannot reach any MX (nothing listens on its delivery port): all it has waits.
    a = node_a(
        relay_factory,
        providers=providers,
        delivery={"port": free_port(), "connect_timeout": "2s"},
        retry={"initial": "1h", "max": "1h", "lifetime": "5d"},
    )
    b = node_b(relay_factory, providers=providers)
    # B keeps keep.test mail, so its envelope can be read back from B's queue.
    assert b.api("POST", "/api/providers/keep/suspend", {"for": "1h"})[0] == 200

    submit_many(a, lambda i: [f"user{i}@dest.test"], 1000, headers="")
    with a.client() as smtp:
        for n in range(3):
            code, _ = smtp.docmd(f"MAIL FROM:<app@example.org> RET=HDRS ENVID=app+2Did+3D{n}")
            assert code == 250
            rcpt = (
                f"RCPT TO:<k{n}@keep.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;k{n}+2Bx@keep.test"
            )
            assert smtp.docmd(rcpt)[0] == 250
            assert smtp.data(make_message(f"dsn {n}"))[0] == 250
    assert wait_until(
        lambda: (
            sum(len(m["recipients"]) for m in queued(a)) == 1003
            and all(r["state"] == "deferred" for m in queued(a) for r in m["recipients"])
        ),
        timeout=60,
    ), queued(a)[:3]
    sent = {m["id"] for m in queued(a)}

    started = time.monotonic()
    status, report = transfer(a, "--to", f"127.0.0.1:{b.port}")
    took = time.monotonic() - started
    assert status == 0, report
    assert report == {
        "to": f"127.0.0.1:{b.port}",
        "provider": None,
        "transferred": 1003,
        "recipients": 1003,
        "failed": 0,
        "left": 0,
        "reasons": {},
        "stopped": None,
    }
    assert took < 60, took
    # A: nothing left, each message's way out on record.
    assert queued(a) == []
    assert wait_until(lambda: a.spool_files() == []), a.spool_files()[:5]
    assert scrape(a)["relay_spool_messages"][()] == 0
    log = a.log()
    assert log.count("status=transferred (transferred to 127.0.0.1:") == 1003
    assert "status=bounced" not in log and "notification" not in log
    some = sorted(sent)[0]
    assert wait_until(lambda: a.api("GET", f"/api/history/{some}")[0] == 200)
    status, history = a.api("GET", f"/api/history/{some}")
    assert history["outcome"] == "transferred"
    assert [e["event"] for e in history["timeline"]][-2:] == ["transfer", "finished"]

    # B took each once; the MX has each once, with both nodes' trace headers.
    assert received(b) == 1003
    mx.wait_messages(1000, timeout=60)
    # Settled on B: every delivery is over, so none can come after the count below.
    assert wait_until(lambda: queued(b, "dest") == [], timeout=30)
    got = list(mx.messages)
    counted = ids(got)
    assert len(got) == 1000 and len(counted) == 1000, Counter(counted.values())
    assert sorted(r for m in got for r in m.rcpt_tos) == sorted(
        f"user{i}@dest.test" for i in range(1000)
    )
    parsed = email.message_from_bytes(got[0].data, policy=email.policy.default)
    trace = [" ".join(str(h).split()) for h in parsed.get_all("Received")]
    assert "by relay-b.test (relay)" in trace[0] and "by relay.test (relay)" in trace[1], trace

    # The DSN parameters reached B: its queue has them as the sender gave them to A.
    kept = queued(b, "keep")
    assert len(kept) == 3
    envids = set()
    for message in kept:
        status, shown = b.api("GET", f"/api/queue/{message['id']}")
        assert status == 200
        assert shown["ret"] == "HDRS"
        envids.add(shown["envid"])
        [recipient] = shown["recipients"]
        n = recipient["address"][1]
        assert recipient["notify"] == "SUCCESS,FAILURE"
        assert recipient["orcpt"] == f"rfc822;k{n}+2Bx@keep.test"
    assert envids == {f"app-id={n}" for n in range(3)}


def test_a_peer_that_refuses_leaves_the_mail_here(relay_factory, dns_server, mx_farm):
    route(dns_server, "dest.test", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    peer = mx_farm.server("127.0.0.6")
    peer.mail_hook = lambda sender: "554 5.7.1 not from you"
    a = node_a(relay_factory, providers={"dest": {"domains": ["dest.test"]}})
    assert a.api("POST", "/api/providers/dest/suspend", {"for": "1h"})[0] == 200
    sent = send_tagged(a, 5, ["bob@dest.test"], "refused")
    held = queued(a)[0]["id"]
    assert a.api("POST", f"/api/queue/{held}/hold")[0] == 200  # held mail is not moved

    status, report = transfer(a, "--to", f"127.0.0.6:{mx_farm.port}")
    assert status == 1
    assert report["transferred"] == 0 and report["failed"] == 4 and report["left"] == 1
    assert report["reasons"] == {"554 5.7.1 not from you": 4, "held": 1}
    assert peer.messages == []
    assert len(queued(a)) == 5
    # Nothing was counted as an attempt: the mail waits as it did, and goes when it may.
    assert all(r["attempts"] == 0 for m in queued(a) for r in m["recipients"])
    assert a.api("POST", f"/api/queue/{held}/release")[0] == 200
    assert a.api("POST", "/api/providers/dest/resume")[0] == 200
    assert set(ids(mx.wait_messages(5))) == sent
    assert wait_until(lambda: a.spool_files() == [])


def test_a_peer_that_vanishes_mid_transfer_loses_nothing(relay_factory, dns_server, mx_farm):
    route(dns_server, "dest.test", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    peer = mx_farm.server("127.0.0.6")

    def twenty_then_hang(message: Any) -> None:
        if len(peer.messages) >= 20:
            peer.stall_data()  # this one and every later one gets no reply

    peer.data_hook = twenty_then_hang
    a = node_a(relay_factory, providers={"dest": {"domains": ["dest.test"]}})
    assert a.api("POST", "/api/providers/dest/suspend", {"for": "1h"})[0] == 200
    sent = send_tagged(a, 60, ["bob@dest.test"], "vanish")

    outcome: dict[str, Any] = {}

    def run() -> None:
        outcome["status"], outcome["report"] = transfer(a, "--to", f"127.0.0.6:{mx_farm.port}")

    running = threading.Thread(target=run)
    running.start()
    assert peer.wait_for(lambda: peer._stalled >= 1)
    peer.vanish()
    running.join(60)
    report = outcome["report"]
    assert outcome["status"] == 1, report
    assert report["transferred"] == 20 and report["recipients"] == 20
    assert 1 <= report["failed"] <= 4  # the transactions in flight when it went
    assert report["left"] == 60 - 20 - report["failed"]
    assert report["stopped"] and "127.0.0.6" in report["stopped"]
    took = set(ids(peer.messages))
    assert len(took) == 20
    # Exactly the rest stays on A, and A delivers it once it may.
    assert len(queued(a)) == 40
    assert a.api("POST", "/api/providers/dest/resume")[0] == 200
    delivered = ids(mx.wait_messages(40))
    assert set(delivered) == sent - took and max(delivered.values()) == 1


def test_transfer_of_one_provider_keeps_the_others_here(relay_factory, dns_server, mx_farm):
    route(dns_server, "dest.test", "127.0.0.2")
    route(dns_server, "other.test", "127.0.0.3")
    dest, other = mx_farm.server("127.0.0.2"), mx_farm.server("127.0.0.3")
    providers = {"dest": {"domains": ["dest.test"]}, "other": {"domains": ["other.test"]}}
    a = node_a(relay_factory, providers=providers)
    for name in providers:
        assert a.api("POST", f"/api/providers/{name}/suspend", {"for": "1h"})[0] == 200
    both = send_tagged(a, 4, ["bob@dest.test", "carol@other.test"], "both")
    only_other = send_tagged(a, 2, ["dave@other.test"], "other")
    # B asks for AUTH: node A logs in as an account allowed to send for example.org.
    b = node_b(relay_factory, trusted=False, providers=providers)

    status, report = transfer(
        a,
        "--to",
        f"127.0.0.1:{b.port}",
        "--provider",
        "dest",
        "--user",
        "app",
        env={"RELAY_PEER_PASSWORD": PASSWORD},
    )
    assert status == 0, report
    assert (report["transferred"], report["recipients"], report["failed"]) == (4, 4, 0)
    # B delivers the dest.test recipients only; A keeps other.test's.
    got = dest.wait_messages(4)
    assert set(ids(got)) == both and all(m.rcpt_tos == ["bob@dest.test"] for m in got)
    left = queued(a)
    assert len(left) == 6
    assert {r["address"] for m in left for r in m["recipients"]} == {
        "carol@other.test",
        "dave@other.test",
    }
    for name in providers:
        assert a.api("POST", f"/api/providers/{name}/resume")[0] == 200
    assert set(ids(other.wait_messages(6))) == both | only_other
    assert wait_until(lambda: a.spool_files() == [])  # A is done: it sent what it will
    assert received(b) == 4
    assert len(dest.messages) == 4  # A did not send the transferred ones too


def test_transfer_requests_are_checked(relay_factory, dns_server, mx_farm):
    a = node_a(relay_factory, providers={"dest": {"domains": ["dest.test"]}})
    for body, error in (
        ({}, "to: is required"),
        ({"to": "nowhere"}, "to: expected HOST:PORT"),
        ({"to": "127.0.0.1:0"}, "to: expected HOST:PORT"),
        ({"to": "bad host:25"}, "to: expected HOST:PORT"),
        ({"to": "127.0.0.1:25", "provider": "nosuch"}, "provider: no provider 'nosuch'"),
        ({"to": "127.0.0.1:25", "user": "app"}, "give both, or neither"),
    ):
        status, answer = a.api("POST", "/api/queue/transfer", body)
        assert status == 400 and error in answer["error"], (body, answer)
    # Nothing queued, and a peer that is not there: a clear count, not an error.
    status, answer = a.api("POST", "/api/queue/transfer", {"to": f"127.0.0.1:{free_port()}"})
    assert status == 200 and answer["transferred"] == 0 and answer["left"] == 0
    # The token is required, as for every mutation.
    assert a.api("POST", "/api/queue/transfer", {"to": "127.0.0.1:25"}, token=None)[0] == 401


def test_transfer_is_a_queue_verb_of_the_cli():
    done = subprocess.run(
        [sys.executable, "-m", "relay", "queue", "transfer", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert "--to HOST:PORT" in done.stdout and "--provider" in done.stdout


def test_shutdown_during_a_transfer_keeps_the_mail_here(relay_factory, dns_server, mx_farm):
    route(dns_server, "dest.test", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    peer = mx_farm.server("127.0.0.6")
    peer.stall_data()  # the peer reads every message and never answers
    a = node_a(relay_factory, providers={"dest": {"domains": ["dest.test"]}})
    assert a.api("POST", "/api/providers/dest/suspend", {"for": "1h"})[0] == 200
    sent = send_tagged(a, 10, ["bob@dest.test"], "sigterm")

    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            transfer(a, "--to", f"127.0.0.6:{mx_farm.port}")
        except AssertionError as exc:  # no report: the daemon went away
            outcome["error"] = str(exc)

    running = threading.Thread(target=run)
    running.start()
    assert peer.wait_for(lambda: peer._stalled >= 1)
    status, answer = a.api("POST", "/api/queue/transfer", {"to": f"127.0.0.1:{free_port()}"})
    assert status == 409 and "a transfer is running already" in answer["error"]
    assert a.stop() == 0
    running.join(60)
    assert "no answer from the relay daemon" in outcome["error"]
    log = a.log()
    assert "0 messages (0 recipients) transferred, 0 refused, 10 left here" in log, log[-2000:]
    assert "stopped: the daemon is shutting down" in log and "Traceback" not in log
    # Every message is still here after a restart, none counted as moved, and goes out.
    a.start()
    assert len(queued(a)) == 10
    assert a.api("POST", "/api/providers/dest/resume")[0] == 200
    assert set(ids(mx.wait_messages(10))) == sent
    assert peer.messages == []
