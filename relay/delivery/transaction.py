"""One transaction on an open connection: the batch's message, sent, and each recipient's
attempt classified. Nothing here touches the queue: the lane hands the attempts back."""

from __future__ import annotations

import datetime
import email.utils
from collections.abc import Iterable
from dataclasses import dataclass, field

from relay.config.model import Config, Rule
from relay.delivery.classify import classify
from relay.delivery.client import Connection
from relay.errors import TransientDeliveryError
from relay.queue.models import Attempt, Batch, Hop
from relay.reply import Reply


@dataclass(slots=True)
class Result:
    attempts: list[Attempt]
    replies: list[Reply]  # what the server said, once each (for the reply counter)
    fired: list[tuple[Rule, Reply]] = field(default_factory=list)  # rules to act on, once each


def egress_trace(config: Config, connection: Connection, queue_id: str) -> bytes:
    """A `Received:` line naming the sending source this hop leaves from (SPEC §14), so
    that a receiver's postmaster, or ours, can tell which identity carried it. Trace
    fields are not DKIM-signed (RFC 6376 §5.4.1), so the signature stays valid."""
    source = config.egress.get(connection.site.source)
    name = source.ehlo if source is not None else config.hostname
    stamp = email.utils.format_datetime(datetime.datetime.now(datetime.UTC))
    return (
        f"Received: from {config.hostname} by {name} (relay egress {connection.site.source} "
        f"[{connection.local or 'unbound'}]) id {queue_id};\r\n\t{stamp}\r\n"
    ).encode()


async def transact(
    connection: Connection, batch: Batch, message: bytes, rules: tuple[Rule, ...], hop: Hop
) -> Result:
    fallback: Reply | None = None
    try:
        replies = await connection.send(batch.message.envelope, batch.recipients, message)
    except TransientDeliveryError as exc:
        replies, fallback = {}, exc.reply
        # Left to the lane's close, which resets a session that failed midway: the
        # peer may have stopped reading, and a graceful close would never reach it.
        connection.busy = True
    result = Result([], _distinct(replies.values()))
    fired: dict[int, tuple[Rule, Reply]] = {}
    for recipient in batch.recipients:
        reply = (
            replies.get(recipient.index)
            or fallback
            or Reply.local(451, "4.4.2", f"{connection.description} closed the session before RCPT")
        )
        verdict = classify(reply, rules)
        result.attempts.append(Attempt(recipient, reply, verdict.verdict, hop))
        if verdict.rule is not None:
            fired.setdefault(id(verdict.rule), (verdict.rule, reply))
    result.fired = list(fired.values())
    return result


def _distinct(replies: Iterable[Reply]) -> list[Reply]:
    seen: dict[int, Reply] = {}
    for reply in replies:
        if reply.remote:
            seen.setdefault(id(reply), reply)
    return list(seen.values())
