"""The spool: durable store, progress log, recovery, quarantine of damaged entries."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable

from relay.spool import Envelope, EnvelopeRecipient, RecipientStatus, Spool, StateRecord, store


def envelope(spool: Spool, body: bytes, recipients: int = 3) -> Envelope:
    return Envelope(
        id=spool.new_id(),
        sender="a@example.org",
        recipients=tuple(EnvelopeRecipient(f"r{i}@example.test") for i in range(recipients)),
        received_at=1.0,
        size=len(body),
        class_name="transactional",
        account="app",
    )


def test_store_record_recover_remove(tmp_path):
    spool = Spool(str(tmp_path))
    spool.open()
    body = b"Subject: x\r\n\r\nhello\r\n"
    env = envelope(spool, body)

    async def go() -> None:
        offset = await spool.store(env, body)
        assert spool.read_message(env.id, offset) == body
        await spool.record(
            env.id,
            [
                StateRecord((0,), RecipientStatus.DELIVERED, 1, 0, "250 ok"),
                StateRecord((1, 2), RecipientStatus.DEFERRED, 1, 99.0, "451"),
            ],
        )
        [recovered] = list(spool.recover(stale_before=time.time()))
        assert recovered.envelope == env
        assert [r.indices for r in recovered.records] == [(0,), (1, 2)]
        await spool.remove(env.id)
        assert list(spool.recover(stale_before=time.time())) == []

    asyncio.run(go())


def _append(path: str, data: bytes) -> None:
    with open(path, "ab") as handle:
        handle.write(data)


def test_torn_state_line_is_ignored(tmp_path):
    spool = Spool(str(tmp_path))
    spool.open()
    env = envelope(spool, b"x\r\n", recipients=2)

    async def go() -> None:
        await spool.store(env, b"x\r\n")
        await spool.record(env.id, [StateRecord((0,), RecipientStatus.DELIVERED, 1, 0, "ok")])
        torn = spool.message_path(env.id) + ".st"
        await asyncio.to_thread(_append, torn, b'[[1],1,1,0,"par')  # crash mid-append
        [recovered] = list(spool.recover(stale_before=time.time()))
        assert [r.indices for r in recovered.records] == [(0,)]

    asyncio.run(go())


def test_damaged_entries_are_quarantined_and_temp_files_dropped(tmp_path):
    spool = Spool(str(tmp_path))
    spool.open()
    good, bad = envelope(spool, b"good\r\n"), envelope(spool, b"bad body\r\n")

    async def go() -> None:
        await spool.store(good, b"good\r\n")
        await spool.store(bad, b"bad body\r\n")

    asyncio.run(go())
    with open(spool.message_path(bad.id), "r+b") as handle:  # truncate the body
        handle.truncate(os.path.getsize(spool.message_path(bad.id)) - 3)
    directory = os.path.dirname(spool.message_path(good.id))
    with open(os.path.join(directory, ".tmp-unfinished"), "wb") as handle:
        handle.write(b"half a message")
    recovered = list(spool.recover(stale_before=time.time()))
    assert [r.envelope.id for r in recovered] == [good.id]
    assert os.listdir(spool.quarantine_dir) == [bad.id]
    assert not os.path.exists(os.path.join(directory, ".tmp-unfinished"))


def test_ids_are_unique_and_sortable(tmp_path):
    spool = Spool(str(tmp_path))
    ids = [spool.new_id() for _ in range(2000)]
    assert len(set(ids)) == 2000


class DirectorySyncs:
    """Stands in for the spool's directory fsync: records what each sync covered (the
    names in the directory when it ran) and can hold one sync until released."""

    def __init__(self, real: Callable[[str], None]) -> None:
        self.real = real
        self.synced: list[tuple[str, set[str]]] = []
        self.hold_next = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, directory: str) -> None:
        if self.hold_next:
            self.hold_next = False
            self.entered.set()
            assert self.release.wait(10), "the held directory sync was never released"
        self.synced.append((directory, set(os.listdir(directory))))
        self.real(directory)


def test_new_progress_log_has_its_directory_synced(tmp_path, monkeypatch):
    syncs = DirectorySyncs(store._fsync_dir)
    monkeypatch.setattr(store, "_fsync_dir", syncs)
    spool = Spool(str(tmp_path))
    spool.open()
    env = envelope(spool, b"x\r\n", recipients=2)
    directory = os.path.dirname(spool.message_path(env.id))
    state_name = env.id + ".st"

    async def go() -> None:
        await spool.store(env, b"x\r\n")
        syncs.synced.clear()
        await spool.record(env.id, [StateRecord((0,), RecipientStatus.DELIVERED, 1, 0, "ok")])
        # The log's name is durable: a sync of its directory ran after it was created.
        assert [d for d, names in syncs.synced if state_name in names] == [directory]
        syncs.synced.clear()
        await spool.record(env.id, [StateRecord((1,), RecipientStatus.DEFERRED, 1, 9, "451")])
        assert syncs.synced == []  # appending to it makes no new name: no directory sync

    asyncio.run(go())


def test_append_racing_the_creation_waits_for_its_directory_sync(tmp_path, monkeypatch):
    syncs = DirectorySyncs(store._fsync_dir)
    monkeypatch.setattr(store, "_fsync_dir", syncs)
    spool = Spool(str(tmp_path))
    spool.open()
    env = envelope(spool, b"x\r\n", recipients=2)

    async def go() -> None:
        await spool.store(env, b"x\r\n")
        syncs.hold_next = True
        first = asyncio.ensure_future(
            spool.record(env.id, [StateRecord((0,), RecipientStatus.DELIVERED, 1, 0, "ok")])
        )
        try:
            assert await asyncio.to_thread(syncs.entered.wait, 10)
            # The log exists now, its directory sync is held: a second record for another
            # recipient (another lane) appends to it and must not return before a sync.
            second = asyncio.ensure_future(
                spool.record(env.id, [StateRecord((1,), RecipientStatus.BOUNCED, 1, 0, "550")])
            )
            done, _ = await asyncio.wait({second}, timeout=0.5)
            assert not done, "an append returned while the log's name was not yet durable"
        finally:
            syncs.release.set()
        await asyncio.wait_for(asyncio.gather(first, second), 10)
        [recovered] = list(spool.recover(stale_before=time.time()))
        assert sorted(r.indices for r in recovered.records) == [(0,), (1,)]

    asyncio.run(go())


def test_take_over_moves_each_message_once_whatever_stops_it(tmp_path):
    """Another node's spool becomes ours (SPEC §9 takeover): ID, progress, hold mark and
    timeline kept; the original gone. The message file is renamed across last, so a move
    cut short leaves the original whole and nothing that recovery would queue here, and
    of two nodes racing for a message only one gets it."""
    ours, theirs, third = (Spool(str(tmp_path / n)) for n in ("a", "b", "c"))
    for spool in (ours, theirs, third):
        spool.open()
    body = b"Subject: x\r\n\r\nhello\r\n"
    first, second, raced = (envelope(theirs, body) for _ in range(3))

    async def fill() -> None:
        for env in (first, second, raced):
            await theirs.store(env, body)
        await theirs.record(first.id, [StateRecord((0,), RecipientStatus.DELIVERED, 1, 0, "250")])
        await theirs.set_held(second.id, True)

    asyncio.run(fill())
    with open(theirs.events_path(first.id), "wb") as handle:
        handle.write(b"timeline\n")
    # A move cut short before its rename: the side files are here, the message is not.
    os.makedirs(os.path.dirname(ours.message_path(first.id)), exist_ok=True)
    with open(ours.message_path(first.id) + ".st", "wb") as handle:
        handle.write(b"garbage")
    os.utime(ours.message_path(first.id) + ".st", (1.0, 1.0))
    assert first.id not in {e.envelope.id for e in ours.recover(time.time())}
    assert not os.path.exists(ours.message_path(first.id) + ".st")  # dropped, stale

    entries = {e.envelope.id: e for e in theirs.recover(time.time())}
    assert third.take_over(theirs, entries[raced.id])  # another node got this one first
    moved = {i: ours.take_over(theirs, e) for i, e in entries.items()}
    assert moved == {first.id: True, second.id: True, raced.id: False}
    assert not os.path.exists(ours.message_path(raced.id) + ".st")  # the loser's copies go
    assert list(theirs.recover(time.time())) == []
    assert not os.listdir(os.path.dirname(theirs.message_path(first.id)))
    recovered = {e.envelope.id: e for e in ours.recover(time.time())}
    assert set(recovered) == {first.id, second.id}
    assert [r.indices for r in recovered[first.id].records] == [(0,)]
    assert recovered[second.id].held and not recovered[first.id].held
    with open(ours.events_path(first.id), "rb") as handle:
        assert handle.read() == b"timeline\n"
    assert [e.envelope.id for e in third.recover(time.time())] == [raced.id]


def test_recovery_keeps_a_fresh_log_whose_message_is_on_its_way(tmp_path):
    """A take-over writes the progress log before the message: recovery running beside it
    must not take the log for an orphan and delete it."""
    spool = Spool(str(tmp_path))
    spool.open()
    started = time.time() - 5
    path = spool.message_path("27KFZZZZZZZZZZZZ") + ".st"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(b"")
    assert list(spool.recover(stale_before=started)) == []
    assert os.path.exists(path)
