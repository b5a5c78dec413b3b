"""Finished messages in SQLite (`<spool>/history.sqlite`), for `relay history`.

One row per message with its whole timeline (a JSON array of its events, oldest first),
and one row per recipient, so that `--to ADDR` is an index lookup.
WAL mode: readers (the admin API, from worker threads) never wait for the writer, and
the writer (one thread, history/writer.py) never waits for them. `synchronous=NORMAL`:
a commit is not fsync'd, so a power cut may lose the last commits, never the file's
consistency; history is a record for people, and the mail itself is in the spool.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from relay.history.events import Finished

FILE = "history.sqlite"
VERSION = 1
PRUNE_CHUNK = 5000  # rows per delete transaction: readers and new rows get their turn

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    sender TEXT NOT NULL COLLATE NOCASE,
    account TEXT NOT NULL,
    class TEXT NOT NULL,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL,
    finished_at REAL NOT NULL,
    outcome TEXT NOT NULL,
    timeline TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_finished ON messages (finished_at);
CREATE INDEX IF NOT EXISTS messages_sender ON messages (sender, finished_at);
CREATE TABLE IF NOT EXISTS recipients (
    message_id TEXT NOT NULL,
    address TEXT NOT NULL COLLATE NOCASE,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    reply TEXT NOT NULL,
    finished_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS recipients_address ON recipients (address, finished_at);
CREATE INDEX IF NOT EXISTS recipients_message ON recipients (message_id);
"""


def connect(path: str) -> sqlite3.Connection:
    """A connection for the calling thread; the schema is made on first use."""
    connection = sqlite3.connect(path, timeout=30, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    if version > VERSION:
        connection.close()
        raise sqlite3.DatabaseError(f"{path} is of a newer relay (version {version})")
    if version < VERSION:
        connection.executescript(_SCHEMA)
        connection.execute(f"PRAGMA user_version={VERSION}")
    return connection


def insert(connection: sqlite3.Connection, rows: Sequence[tuple[Finished, str]]) -> None:
    """Finished messages with their timelines (JSON arrays), in one transaction. A
    message already there (finished again after a crash cut its removal short) keeps
    its first record, whose timeline is the whole one."""
    ids = [finished.id for finished, _ in rows]
    connection.execute("BEGIN")
    try:
        known: set[str] = set()
        for start in range(0, len(ids), 500):  # SQLite's limit on bound parameters
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT id FROM messages WHERE id IN ({marks})"
            known.update(found for (found,) in connection.execute(query, chunk))
        new: dict[str, tuple[Finished, str]] = {}
        for finished, timeline in rows:
            if finished.id not in known:
                new.setdefault(finished.id, (finished, timeline))
        _insert_rows(
            connection,
            "messages",
            [
                (
                    f.id,
                    f.sender,
                    f.account,
                    f.class_name,
                    f.size,
                    f.received_at,
                    f.finished_at,
                    f.outcome,
                    timeline,
                )
                for f, timeline in new.values()
            ],
        )
        _insert_rows(
            connection,
            "recipients",
            [
                (f.id, r.address, r.status, r.attempts, r.reply, f.finished_at)
                for f, _ in new.values()
                for r in f.recipients
            ],
        )
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


def _insert_rows(connection: sqlite3.Connection, table: str, rows: list[tuple[Any, ...]]) -> None:
    """Many rows per statement rather than executemany's one step per row: each step
    lets the event loop's thread take Python's lock back, and handing it to and fro is
    what a writer thread costs the loop."""
    if not rows:
        return
    width = len(rows[0])
    per = max(1, 30_000 // width)  # under SQLite's 32,766 bound parameters
    one = "(" + ",".join("?" * width) + ")"
    for start in range(0, len(rows), per):
        chunk = rows[start : start + per]
        connection.execute(
            f"INSERT INTO {table} VALUES " + ",".join([one] * len(chunk)),
            [value for row in chunk for value in row],
        )


def prune(connection: sqlite3.Connection, before: float, chunks: int | None = None) -> int:
    """Forget messages finished before `before`, a chunk per transaction, at most
    `chunks` of them (None: all); how many were forgotten."""
    removed = 0
    while chunks is None or chunks > 0:
        if chunks is not None:
            chunks -= 1
        connection.execute("BEGIN")
        try:
            ids = [
                message_id
                for (message_id,) in connection.execute(
                    f"SELECT id FROM messages WHERE finished_at < ? LIMIT {PRUNE_CHUNK}",
                    (before,),
                )
            ]
            connection.execute("CREATE TEMP TABLE IF NOT EXISTS doomed (id TEXT PRIMARY KEY)")
            connection.execute("DELETE FROM doomed")
            connection.executemany("INSERT INTO doomed VALUES (?)", [(i,) for i in ids])
            connection.execute("DELETE FROM recipients WHERE message_id IN (SELECT id FROM doomed)")
            connection.execute("DELETE FROM messages WHERE id IN (SELECT id FROM doomed)")
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        removed += len(ids)
        if len(ids) < PRUNE_CHUNK:
            break
    return removed


_COLUMNS = "id, sender, account, class, size, received_at, finished_at, outcome"


def _summary(connection: sqlite3.Connection, row: tuple[Any, ...]) -> dict[str, Any]:
    message_id, sender, account, class_name, size, received_at, finished_at, outcome = row
    recipients = connection.execute(
        "SELECT address, status, attempts, reply FROM recipients WHERE message_id = ?",
        (message_id,),
    ).fetchall()
    return {
        "id": message_id,
        "sender": sender,
        "account": account,
        "class": class_name,
        "size": size,
        "arrival": received_at,
        "finished": finished_at,
        "outcome": outcome,
        "recipients": [
            {"address": a, "status": s, "attempts": n, "last_reply": reply or None}
            for a, s, n, reply in recipients
        ],
    }


def get(connection: sqlite3.Connection, message_id: str) -> dict[str, Any] | None:
    row = connection.execute(
        f"SELECT {_COLUMNS}, timeline FROM messages WHERE id = ?", (message_id,)
    ).fetchone()
    if row is None:
        return None
    summary = _summary(connection, row[:-1])
    summary["timeline"] = json.loads(row[-1])
    return summary


def find(
    connection: sqlite3.Connection,
    *,
    to: str | None = None,
    sender: str | None = None,
    since: float | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Messages to or from an address (case-insensitive), newest first."""
    where, args = [], []
    if to is not None:
        where.append(
            "id IN (SELECT message_id FROM recipients WHERE address = ? AND finished_at >= ?)"
        )
        args += [to, since or 0.0]
    if sender is not None:
        where.append("sender = ?")
        args.append(sender)
    if since is not None:
        where.append("finished_at >= ?")
        args.append(since)
    clause = " AND ".join(where) or "1"
    rows = connection.execute(
        f"SELECT {_COLUMNS} FROM messages WHERE {clause} ORDER BY finished_at DESC LIMIT ?",
        (*args, limit),
    ).fetchall()
    return [_summary(connection, row) for row in rows]
