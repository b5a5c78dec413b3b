"""A message's timeline and the history of finished mail (SPEC §12 "Timeline").

The daemon runs as users run it (`relay serve`, real MX and DNS servers on loopback);
`relay queue show` and `relay history` are run as commands. The writer and the database
are also checked alone, on a temporary directory, for what a daemon cannot easily show:
ordering across writers, a torn line, a crash between import and removal."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.config import parse_config
from relay.errors import ConfigError
from relay.history import db, events
from relay.history.events import Arrival, FinalRecipient, Finished
from relay.history.text import describe, timeline_lines
from relay.history.writer import Writer
from relay.queue.models import QueuedMessage
from relay.routing.router import Destination, Queue, Site
from relay.spool.records import Envelope, EnvelopeRecipient, RecipientStatus, encode_header
from relay.spool.store import Spool
from tests.relayproc import RelayProcess, make_message
from tests.support import route, wait_until

TOKEN = "history-test-token"


def cli(relay: RelayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return relay.cli(*args, token=TOKEN)


def api(relay: RelayProcess, path: str) -> tuple[int, Any]:
    return relay.api("GET", path, token=TOKEN)


def finished(relay: RelayProcess, message_id: str, timeout: float = 20) -> dict[str, Any]:
    """The message's history record, once the writer has imported it."""
    answer: dict[str, Any] = {}

    def found() -> bool:
        status, body = api(relay, f"/api/history/{message_id}")
        answer.update(body if status == 200 else {})
        return status == 200

    assert wait_until(found, timeout), f"{message_id} never reached history"
    return answer


def kinds(timeline: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in timeline]


# the daemon


def test_a_finished_message_tells_its_whole_story(relay_factory, dns_server, mx_farm, example_org):
    """Received (with client, TLS, account), routed and why, each attempt with its MX,
    address, TLS and duration, the DSN for the refused recipient, the outcome; findable
    by ID, by recipient and by sender, and its timeline file is gone from the spool."""
    route(dns_server, "example.test", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    mx.rcpt_hook = lambda a: "550 5.1.1 no such user" if a.startswith("nobody") else None
    relay = relay_factory(admin={"token": TOKEN})
    before = time.time()
    message_id = relay.send(
        "app@example.org", ["Bob@example.test", "nobody@example.test"], make_message("story")
    )
    mx.wait_messages(1)
    example_org.wait_messages(1)  # the DSN for nobody@
    record = finished(relay, message_id)

    assert record["outcome"] == "mixed"
    statuses = {r["address"]: r["status"] for r in record["recipients"]}
    assert statuses == {"Bob@example.test": "delivered", "nobody@example.test": "bounced"}
    timeline = record["timeline"]
    assert kinds(timeline)[:2] == ["received", "routed"]
    assert kinds(timeline)[-1] == "finished"
    assert all(isinstance(e["time"], float) for e in timeline)
    assert [e["time"] for e in timeline] == sorted(e["time"] for e in timeline)
    received = timeline[0]
    assert received["client"] == "127.0.0.1" and received["account"] == "app"
    assert received["tls"] is True and received["class"] == "transactional"
    assert received["recipients"] == 2 and received["time"] >= before
    routed = timeline[1]
    assert routed["provider"] == "default" and routed["reason"] == "default"
    assert routed["site"] == "mx.example.test"
    attempts = {e["status"]: e for e in timeline if e["event"] == "attempt"}
    delivered, bounced = attempts["delivered"], attempts["bounced"]
    assert delivered["recipients"] == ["Bob@example.test"]
    assert delivered["mx"] == "mx.example.test" and delivered["ip"] == "127.0.0.2"
    assert delivered["policy"] == "opportunistic" and delivered["attempt"] == 1
    assert 0 <= delivered["duration"] < 20
    assert bounced["reply"].startswith("550 5.1.1")
    [dsn] = [e for e in timeline if e["event"] == "dsn"]
    assert dsn["kind"] == "non-delivery" and dsn["recipients"] == ["nobody@example.test"]
    assert timeline[-1] == {**timeline[-1], "outcome": "mixed", "delivered": 1, "bounced": 1}
    assert not list(Path(relay.config["spool"]["path"]).rglob(f"{message_id}*"))

    # The DSN relay wrote has its own story, starting with its creation.
    dsn_record = finished(relay, dsn["id"])
    assert kinds(dsn_record["timeline"])[0] == "created"
    assert dsn_record["timeline"][0]["about"] == message_id

    shown = cli(relay, "history", message_id)
    assert shown.returncode == 0, shown.stderr
    for words in ("received", "from 127.0.0.1", "by default", "via mx.example.test[127.0.0.2]"):
        assert words in shown.stdout, (words, shown.stdout)
    assert "non-delivery notification" in shown.stdout and "finished" in shown.stdout

    by_to = cli(relay, "history", "--to", "bob@EXAMPLE.test", "--since", "1h", "--json")
    assert by_to.returncode == 0, by_to.stderr
    assert [m["id"] for m in json.loads(by_to.stdout)] == [message_id]
    by_from = cli(relay, "history", "--from", "app@example.org")
    assert message_id in by_from.stdout and "delivered" in by_from.stdout
    nobody = cli(relay, "history", "--to", "someone-else@example.test")
    assert nobody.returncode == 0 and "No finished message" in nobody.stdout
    both = cli(relay, "history", message_id, "--to", "bob@example.test")
    assert both.returncode == 1 and "not both" in both.stderr
    missing = cli(relay, "history", "NOSUCHID")
    assert missing.returncode == 1 and "no finished message" in missing.stderr


def test_queue_show_explains_why_mail_waits(relay_factory, dns_server, mx_farm):
    """A rule that suspends the provider, the waits it causes for the next message, and
    a site that cannot be reached: each with its reason, in `relay queue show`."""
    route(dns_server, "orange.test", "127.0.0.3")
    orange = mx_farm.server("127.0.0.3")
    orange.rcpt_hook = lambda a: "550 5.2.0 Mail rejete. Mail rejected. ofr_506"
    dns_server.mx("dead.test", (10, "mx.dead.test"))
    dns_server.add("mx.dead.test", "A", "127.0.0.4")  # nothing listens there
    relay = relay_factory(
        admin={"token": TOKEN},
        providers={
            "orange": {
                "domains": ["orange.test"],
                "rules": [{"match": "ofr_506", "action": "suspend", "for": "1h"}],
            }
        },
    )
    first = relay.send("app@example.org", ["a@orange.test"], make_message("first"))
    relay.wait_log("suspended for 3600s")
    second = relay.send("app@example.org", ["b@orange.test"], make_message("second"))
    dead = relay.send("app@example.org", ["c@dead.test"], make_message("dead"))

    status, shown = api(relay, f"/api/queue/{first}")
    assert status == 200
    timeline = shown["timeline"]
    assert kinds(timeline)[:3] == ["received", "routed", "attempt"]
    assert all(isinstance(e["time"], float) and isinstance(e["event"], str) for e in timeline)
    [rule] = [e for e in timeline if e["event"] == "rule"]
    assert rule["match"] == "ofr_506" and rule["action"] == "suspend" and rule["for"] == 3600
    [attempt] = [e for e in timeline if e["event"] == "attempt"]
    assert attempt["status"] == "deferred" and attempt["next_attempt"] > attempt["time"]

    def waits(message_id: str) -> list[dict[str, Any]]:
        return [
            e for e in api(relay, f"/api/queue/{message_id}")[1]["timeline"] if e["event"] == "wait"
        ]

    assert wait_until(lambda: bool(waits(second)))
    [suspended] = waits(second)
    assert suspended["reason"] == "provider suspended" and "ofr_506" in suspended["detail"]
    assert wait_until(lambda: any(w["reason"] == "site backoff" for w in waits(dead)))
    backoff = next(w for w in waits(dead) if w["reason"] == "site backoff")
    assert backoff["recipients"] == ["c@dead.test"] and backoff["until"] > backoff["time"]

    printed = cli(relay, "queue", "show", first)
    assert printed.returncode == 0, printed.stderr
    assert "'ofr_506' matched: suspend for 1h" in printed.stdout
    assert "#1 deferred: <a@orange.test>" in printed.stdout
    printed = cli(relay, "queue", "show", second)
    assert "provider suspended" in printed.stdout
    gone = cli(relay, "queue", "show", "NOSUCHID")
    assert gone.returncode == 1 and "no message with ID NOSUCHID" in gone.stderr


def test_mail_already_ready_hears_of_a_suspension(relay_factory, dns_server, mx_farm):
    """Mail waiting in a lane (its rate spent) when an admin suspends the provider: its
    timeline says so at once, not only when it is placed again."""
    route(dns_server, "slow.test", "127.0.0.6")
    mx = mx_farm.server("127.0.0.6")
    relay = relay_factory(
        admin={"token": TOKEN}, providers={"slow": {"domains": ["slow.test"], "rate": "1/h"}}
    )
    relay.send("app@example.org", ["a@slow.test"], make_message("first"))
    mx.wait_messages(1)
    second = relay.send("app@example.org", ["b@slow.test"], make_message("second"))
    assert wait_until(
        lambda: api(relay, f"/api/queue/{second}")[1]["recipients"][0]["state"] == "ready"
    )
    suspended = cli(relay, "provider", "suspend", "slow", "--for", "1h")
    assert suspended.returncode == 0, suspended.stderr

    def waits() -> list[dict[str, Any]]:
        timeline = api(relay, f"/api/queue/{second}")[1]["timeline"]
        return [e for e in timeline if e["event"] == "wait"]

    assert wait_until(lambda: bool(waits()), timeout=10)
    [wait] = waits()
    assert wait["reason"] == "provider suspended"
    assert wait["detail"] == "slow: suspended by the administrator"
    assert wait["recipients"] == ["b@slow.test"]


def test_timeline_and_history_survive_a_crash_and_retain_prunes(relay_factory, dns_server, mx_farm):
    """A message that waits has its events in a file beside it within seconds: after
    kill -9 they are still there, and the restarted daemon goes on appending. History
    is in SQLite in the spool: kept over a restart, forgotten past history.retain."""
    route(dns_server, "example.test", "127.0.0.5")
    mx = mx_farm.server("127.0.0.5")
    mx.rcpt_hook = lambda a: "451 4.3.0 try later" if a.startswith("later") else None
    relay = relay_factory(admin={"token": TOKEN}, retry={"initial": "1h", "max": "2h"})
    done = relay.send("app@example.org", ["now@example.test"], make_message("done"))
    waiting = relay.send("app@example.org", ["later@example.test"], make_message("waits"))
    finished(relay, done)
    spool = Spool(relay.config["spool"]["path"])
    assert wait_until(
        lambda: (
            kinds(events.read(spool.events_path(waiting)))[:3] == ["received", "routed", "attempt"]
        )
    )
    relay.kill()

    relay.start()
    status, shown = api(relay, f"/api/queue/{waiting}")
    assert status == 200
    assert kinds(shown["timeline"])[:3] == ["received", "routed", "attempt"]
    assert wait_until(
        lambda: kinds(api(relay, f"/api/queue/{waiting}")[1]["timeline"])[3:4] == ["routed"]
    )
    assert finished(relay, done)["outcome"] == "delivered"
    relay.stop()

    time.sleep(1.1)  # the one wait on the wall clock: retain is counted in it
    relay.config["history"] = {"retain": "1s"}
    relay.config_path.write_text(yaml.safe_dump(relay.config))
    relay.start()
    assert wait_until(lambda: api(relay, f"/api/history/{done}")[0] == 404)
    assert api(relay, f"/api/queue/{waiting}")[0] == 200  # queued mail is not history's


# the parts alone


def _envelope(message_id: str, *to: str, at: float = 1_700_000_000.0) -> Envelope:
    return Envelope(
        id=message_id,
        sender="app@example.org",
        recipients=tuple(EnvelopeRecipient(a) for a in to),
        received_at=at,
        size=10,
        class_name="transactional",
        account="app",
    )


def _finished(message_id: str, at: float, address: str = "bob@example.test") -> Finished:
    return Finished(
        id=message_id,
        sender="app@example.org",
        account="app",
        class_name="transactional",
        size=10,
        received_at=at - 1,
        finished_at=at,
        outcome="delivered",
        recipients=(FinalRecipient(address, "delivered", 1, "250 ok"),),
        last=({"time": at, "event": "finished", "outcome": "delivered"},),
    )


def _received(message_id: str, at: float) -> dict[str, Any]:
    envelope = _envelope(message_id, "bob@example.test")
    arrival = Arrival("192.0.2.1", "app.test", False, "submission", "example.org")
    return {**events.received(envelope, arrival), "time": at}


def _message(message_id: str, received_at: float) -> QueuedMessage:
    """A message whose one recipient was delivered at its first attempt."""
    envelope = _envelope(message_id, "bob@example.test", at=received_at)
    message = QueuedMessage(envelope, 0)
    for recipient in message.recipients:
        recipient.status, recipient.attempts = RecipientStatus.DELIVERED, 1
        recipient.last_reply = "250 2.0.0 ok"
    return message


def test_writer_keeps_quick_messages_off_disk_and_spills_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message finished within `spill_after` goes to SQLite straight from memory: no
    file is made for it, nor looked for. One still queued has its events in its file, in
    time order whatever order they came in, a torn last line skipped; once finished, the
    file is read into its history row and removed."""
    spool = Spool(str(tmp_path))
    spool.open()
    database = str(tmp_path / db.FILE)
    db.connect(database).close()
    for message_id in ("QUICK1", "SLOW02"):
        os.makedirs(os.path.dirname(spool.events_path(message_id)), exist_ok=True)
    writer = Writer(spool.events_path, spill_after=0.5)
    writer.start(database)
    touched: list[str] = []
    real_open = os.open

    def watch(path: Any, flags: int, *rest: Any) -> int:
        touched.append(os.path.basename(str(path)))
        return real_open(path, flags, *rest)

    monkeypatch.setattr(os, "open", watch)  # io.open (the reads) goes through it too
    now = time.time()
    writer.record("QUICK1", _received("QUICK1", now))
    writer.finish(_message("QUICK1", now), now + 0.01)
    writer.record("SLOW02", events.admin(now + 2, "hold"))
    writer.record("SLOW02", _received("SLOW02", now + 1))  # reported late
    assert kinds(writer.pending("SLOW02")) == ["admin", "received"]
    assert wait_until(lambda: os.path.exists(spool.events_path("SLOW02")), 5)
    assert kinds(events.read(spool.events_path("SLOW02"))) == ["received", "admin"]
    with open(spool.events_path("SLOW02"), "ab") as handle:
        handle.write(b'{"time": %f, "event": "tor' % (now + 3))  # a crash mid-line
    writer.record("SLOW02", events.admin(now + 4, "release"))
    writer.finish(_message("SLOW02", now - 60), now + 5)
    writer.close()
    monkeypatch.undo()
    assert "QUICK1.ev" not in touched and "SLOW02.ev" in touched
    assert not os.path.exists(spool.events_path("SLOW02"))
    connection = db.connect(database)
    quick = db.get(connection, "QUICK1")
    assert quick is not None and kinds(quick["timeline"]) == ["received", "finished"]
    assert quick["outcome"] == "delivered" and quick["finished"] == now + 0.01
    assert quick["timeline"][0]["dkim"] == "example.org"
    assert quick["recipients"] == [
        {
            "address": "bob@example.test",
            "status": "delivered",
            "attempts": 1,
            "last_reply": "250 2.0.0 ok",
        }
    ]
    slow = db.get(connection, "SLOW02")
    assert slow is not None
    assert kinds(slow["timeline"]) == ["received", "admin", "admin", "finished"]
    # Finished again (a crash cut the removal short): the first, whole record stays.
    db.insert(connection, [(_finished("SLOW02", now + 9), "[]")])
    slow = db.get(connection, "SLOW02")
    assert slow is not None and len(slow["timeline"]) == 4
    assert slow["finished"] == now + 5


def test_history_finds_by_address_any_case_and_prunes_by_age(tmp_path: Path) -> None:
    connection = db.connect(str(tmp_path / db.FILE))
    db.insert(
        connection,
        [
            (_finished(f"ID{n}", 1_700_000_000.0 + n, f"User{n % 2}@Example.test"), "[]")
            for n in range(10)
        ],
    )
    found = db.find(connection, to="user1@example.TEST")
    assert [m["id"] for m in found] == ["ID9", "ID7", "ID5", "ID3", "ID1"]  # newest first
    assert [
        m["id"] for m in db.find(connection, to="user1@example.test", since=1_700_000_006.5)
    ] == ["ID9", "ID7"]
    assert len(db.find(connection, sender="APP@example.org", limit=3)) == 3
    assert db.prune(connection, 1_700_000_005.0) == 5
    assert sorted(m["id"] for m in db.find(connection, sender="app@example.org")) == [
        "ID5",
        "ID6",
        "ID7",
        "ID8",
        "ID9",
    ]
    left = connection.execute("SELECT COUNT(*) FROM recipients").fetchone()[0]
    assert left == 5
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_long_pruning_goes_a_chunk_at_a_time_until_done(tmp_path: Path) -> None:
    """Forgetting much history is done a transaction of PRUNE_CHUNK messages a round, so
    new history is written between them, and it goes on by itself to the end."""
    database = str(tmp_path / db.FILE)
    connection = db.connect(database)
    count = db.PRUNE_CHUNK * 2 + 100
    db.insert(connection, [(_finished(f"OLD{n}", 1_700_000_000.0 + n), "[]") for n in range(count)])
    db.insert(connection, [(_finished("NEW1", 1_800_000_000.0), "[]")])
    assert db.prune(connection, 1_750_000_000.0, chunks=1) == db.PRUNE_CHUNK
    writer = Writer(lambda message_id: str(tmp_path / message_id))
    writer.start(database)
    writer.prune(1_750_000_000.0)

    def left() -> int:
        return int(connection.execute("SELECT COUNT(*) FROM messages").fetchone()[0])

    assert wait_until(lambda: left() == 1, 10)
    writer.close()
    assert [m["id"] for m in db.find(connection, sender="app@example.org")] == ["NEW1"]
    assert connection.execute("SELECT COUNT(*) FROM recipients").fetchone()[0] == 1


def test_a_newer_history_file_is_refused_not_overwritten(tmp_path: Path) -> None:
    path = str(tmp_path / db.FILE)
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version={db.VERSION + 1}")
    raw.close()
    with pytest.raises(sqlite3.DatabaseError, match="newer relay"):
        db.connect(path)


def test_recovery_removes_a_timeline_whose_message_is_gone(tmp_path: Path) -> None:
    """A crash after the message was removed but before history took its timeline: the
    file is removed at the next start, never mistaken for a damaged message."""
    spool = Spool(str(tmp_path))
    spool.open()
    kept = _envelope("KEPT1", "bob@example.test")
    os.makedirs(os.path.dirname(spool.message_path("KEPT1")))
    with open(spool.message_path("KEPT1"), "wb") as handle:
        handle.write(encode_header(kept) + b"x" * kept.size)
    Path(spool.events_path("KEPT1")).write_bytes(events.encode(events.admin(1.0, "hold")))
    os.makedirs(os.path.dirname(spool.events_path("GONE2")), exist_ok=True)
    Path(spool.events_path("GONE2")).write_bytes(events.encode(events.admin(1.0, "hold")))
    recovered = list(spool.recover(time.time() + 60))
    assert [r.envelope.id for r in recovered] == ["KEPT1"]
    assert spool.quarantined == 0
    assert os.path.exists(spool.events_path("KEPT1"))
    assert not os.path.exists(spool.events_path("GONE2"))


def test_history_retain_is_a_duration_more_than_zero() -> None:
    assert parse_config({}).history.retain == 7 * 86400
    assert parse_config({"history": {"retain": "24h"}}).history.retain == 86400
    with pytest.raises(ConfigError) as refused:
        parse_config({"history": {"retain": "0s", "keep": 1}})
    assert refused.value.problems == [
        "history.keep: unknown key",
        "history.retain: must be more than 0s (how long finished mail is kept)",
    ]


def test_events_name_twenty_recipients_and_count_the_rest() -> None:
    """A fan-out's route and waits do not repeat thousands of addresses; the terminal
    says how many more there are, and shows an event kind it does not know as it is."""
    config = parse_config({"defaults": {"route": "127.0.0.1:25"}})
    destination = Destination(
        Queue("default:x", "default", config.defaults), Site("x", ("x",)), "default"
    )
    addresses = [f"user{n}@example.test" for n in range(25)]
    routed = events.routed(1.0, "example.test", addresses, destination)
    assert routed["recipients"] == addresses[:20] and routed["more"] == 5
    assert describe(routed).endswith("<user4@example.test> and 20 more")
    waiting = events.waiting(2.0, "recipient rate", addresses[:2], 3.0, None)
    assert "more" not in waiting and describe(waiting).endswith("<user1@example.test>")
    assert describe({"time": 4.0, "event": "guard", "account": "app"}) == "account=app"
    lines = timeline_lines([routed, waiting])
    assert lines[0] == "timeline:" and "+   1.000s wait" in lines[2]
