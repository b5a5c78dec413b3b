"""Acknowledged means durable: kill -9 mid-submission, restart, everything acked arrives."""

from __future__ import annotations

import email
import email.policy
import random
import time
from pathlib import Path

from tests.load import MESSAGE_ID, Load, received_ids
from tests.relayproc import make_message
from tests.support import scrape

ROUNDS = 20


def test_kill_9_during_submission_loses_no_acknowledged_message(relay_factory, dns_server, mx_farm):
    dns_server.add("sink.test", "A", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    relay = relay_factory(defaults={"max_connections": 4})
    load = Load(relay, "kill", clients=10, per_client=100).start()  # 1,000 messages
    assert load.wait_acked(300), f"only {len(load.acked)} messages acknowledged"
    relay.kill()
    acknowledged = load.stop()
    relay.start()
    mx.wait_for(lambda: acknowledged <= set(received_ids(mx)), timeout=60)
    counts = received_ids(mx)
    missing = acknowledged - set(counts)
    assert not missing, f"{len(missing)} acknowledged messages lost: {sorted(missing)[:5]}"
    duplicates = sum(c - 1 for c in counts.values() if c > 1)
    # At-least-once: only deliveries in flight at the kill may repeat (≤ one per connection).
    assert duplicates <= 4, f"{duplicates} duplicates"


def refused_recipient(message_id: str) -> bool:
    """Whether the crash loop's message had gone@sink.test (every fifth of a client's)."""
    number = int(message_id.partition("-m")[2].partition("@")[0])
    return number % 5 == 0


def test_crash_loop(relay_factory, dns_server, mx_farm, example_org):
    """20 rounds of load with kill -9 at a random moment: nothing acknowledged is lost,
    nothing half-written is delivered, repeats only for deliveries in flight."""
    dns_server.add("sink.test", "A", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    mx.rcpt_hook = lambda a: "550 5.1.1 no such user" if a.startswith("gone") else None
    relay = relay_factory(start=False, defaults={"max_connections": 4})
    rng = random.Random(20261122)
    expected: set[str] = set()
    for round_number in range(ROUNDS):
        relay.start()
        load = Load(
            relay,
            f"r{round_number}",
            recipients=lambda n, i: (
                [f"user{n}@sink.test"] + (["gone@sink.test"] if i % 5 == 0 else [])
            ),
        ).start()
        # the random moment of the kill: this sleep chooses it, it waits for nothing
        time.sleep(rng.uniform(0.2, 1.2))
        relay.kill()
        expected |= load.stop()
    relay.start()
    mx.wait_for(lambda: expected <= set(received_ids(mx)), timeout=120)
    counts = received_ids(mx)
    lost = expected - set(counts)
    assert not lost, f"{len(lost)} acknowledged messages lost, e.g. {sorted(lost)[:3]}"
    assert max(counts.values()) <= 2, "a message was delivered more than twice"
    for received in list(mx.messages):  # nothing half-written was ever delivered
        message_id = MESSAGE_ID.search(received.data).group(1).decode()
        assert received.data.endswith(f"END {message_id}\r\n".encode()), message_id
    # Every acknowledged message with the refused recipient is reported to its sender: the
    # DSN is stored before the failure is recorded, so a kill may repeat one, never lose it.
    refused = {message_id for message_id in expected if refused_recipient(message_id)}
    assert refused, "no acknowledged message had the refused recipient"
    reported: set[str] = set()
    read = 0

    def all_reported() -> bool:  # called under the farm's lock: the list is stable
        nonlocal read
        for dsn in example_org.messages[read:]:
            # the DSN's own Message-ID, then the returned message's
            reported.update(m.decode() for m in MESSAGE_ID.findall(dsn.data))
        read = len(example_org.messages)
        return refused <= reported

    assert example_org.wait_for(all_reported, timeout=60), (
        f"{len(refused - reported)} refused recipients never reported, "
        f"e.g. {sorted(refused - reported)[:3]}"
    )
    returned = {m for m in reported if m.endswith("@load.test")}
    assert all(refused_recipient(m) for m in returned), "a DSN for a message nobody refused"
    for dsn in list(example_org.messages):  # nor a half-written DSN
        parsed = email.message_from_bytes(dsn.data, policy=email.policy.default)
        assert parsed.get_content_type() == "multipart/report"
        assert len(list(parsed.iter_parts())) == 3


def test_damaged_spool_entries_are_quarantined_at_startup(relay_factory, dns_server, mx_farm):
    dns_server.add("sink.test", "A", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    mx.rcpt_hook = lambda a: "451 4.3.0 later"
    relay = relay_factory(retry={"initial": "1s", "max": "1s"})
    good = relay.send("app@example.org", ["a@sink.test"], make_message("good"))
    bad = relay.send("app@example.org", ["b@sink.test"], make_message("bad"))
    relay.kill()
    spool = Path(relay.workdir) / "spool"
    damaged = next(spool.rglob(bad))
    damaged.write_bytes(damaged.read_bytes()[:-20])  # truncated body
    garbage = damaged.parent / "27ZZZZZZZZZZZZZ"
    garbage.write_bytes(b"\x00\xffnot a spool file")
    mx.rcpt_hook = lambda a: None
    relay.start()
    [delivered] = mx.wait_messages(1)
    assert delivered.rcpt_tos == ["a@sink.test"] and good.encode() in delivered.data
    relay.wait_log("recovered 1 messages")  # the scan is over: the damage was seen
    # the damaged message goes with its progress log, if its first attempt left one
    quarantined = sorted(p.name for p in (spool / "quarantine").iterdir())
    assert [name for name in quarantined if not name.endswith(".st")] == sorted([bad, garbage.name])
    assert [name for name in quarantined if name.endswith(".st")] in ([], [f"{bad}.st"])
    assert scrape(relay)["relay_spool_quarantined_total"][()] == 2
    assert f"spool: quarantined {bad}" in relay.log()
