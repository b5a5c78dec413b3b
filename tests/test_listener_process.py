"""The listener process: replaced when it dies, and serving while the spool is recovered."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

from relay.spool import Envelope, EnvelopeRecipient, Spool
from relay.spool.records import encode_header
from tests.load import received_ids
from tests.relayproc import make_message
from tests.support import depth, listener_pid, scrape, wait_until


def test_a_dead_listener_process_is_replaced_and_what_it_stored_is_delivered(
    relay_factory, dns_server, mx_farm
):
    dns_server.add("sink.test", "A", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    relay = relay_factory()
    relay.send(
        "app@example.org",
        ["a@sink.test"],
        make_message("before", headers="Message-ID: <before@test>\r\n"),
    )
    first = listener_pid(relay)
    assert first is not None
    # What a listener process leaves when it dies between its fsync and its report:
    # a complete message in the spool that the main process was never told about.
    spool = Spool(str(relay.workdir / "spool"), writer=1)
    body = make_message("orphan", headers="Message-ID: <orphan@test>\r\n")
    envelope = Envelope(
        id=spool.new_id(),
        sender="app@example.org",
        recipients=(EnvelopeRecipient("b@sink.test"),),
        received_at=time.time(),
        size=len(body),
        class_name="transactional",
        account="app",
    )
    asyncio.run(spool.store(envelope, body))
    os.kill(first, signal.SIGKILL)
    relay.wait_log("the listener process exited")
    assert wait_until(lambda: listener_pid(relay) not in (None, first))
    relay.send(
        "app@example.org",
        ["c@sink.test"],
        make_message("after", headers="Message-ID: <after@test>\r\n"),
    )
    expected = {"before@test", "orphan@test", "after@test"}
    assert mx.wait_for(lambda: expected <= set(received_ids(mx)))
    assert received_ids(mx) == {message_id: 1 for message_id in expected}
    relay.wait_log("adopted from the lost listener process 1 messages")
    assert relay.stop() == 0


def test_mail_is_taken_while_a_large_spool_is_recovered(relay_factory, dns_server, mx_farm):
    """Recovery runs beside the listener; what the listener reports is queued once."""
    dns_server.add("sink.test", "A", "127.0.0.2")
    mx = mx_farm.server("127.0.0.2")
    relay = relay_factory(start=False, providers={"held": {"domains": ["held.test"]}})
    queued = write_held_spool(relay.workdir / "spool", messages=2000, recipients=100)
    relay.start()
    live = {f"live{n}@test" for n in range(20)}
    for message_id in sorted(live):
        relay.send(
            "app@example.org",
            ["x@sink.test"],
            make_message("live", headers=f"Message-ID: <{message_id}>\r\n"),
        )
    assert mx.wait_for(lambda: live <= set(received_ids(mx)))
    relay.wait_log("recovered 2000 messages, 200000 recipients")
    assert received_ids(mx) == {message_id: 1 for message_id in live}
    assert wait_until(lambda: scrape(relay)["relay_spool_messages"][()] == 2000)
    assert depth(relay, "held", "deferred", "bulk") == queued


def write_held_spool(path: Path, messages: int, recipients: int) -> int:
    """Mail to a suspended provider, written in the spool's format (no fsync: test setup)."""
    spool = Spool(str(path))
    spool.open()
    body = make_message("queued")
    now = time.time()
    for n in range(messages):
        envelope = Envelope(
            id=spool.new_id(),
            sender="app@example.org",
            recipients=tuple(
                EnvelopeRecipient(f"user{n}-{i}@held.test") for i in range(recipients)
            ),
            received_at=now,
            size=len(body),
            class_name="bulk",
            account="app",
        )
        directory = Path(spool.message_path(envelope.id)).parent
        directory.mkdir(parents=True, exist_ok=True)
        (directory / envelope.id).write_bytes(encode_header(envelope) + body)
    state = path / "state"
    state.mkdir(exist_ok=True)
    (state / "suspensions.json").write_text(
        json.dumps({"held": {"until": now + 3600, "reason": "test: provider suspended"}})
    )
    return messages * recipients
