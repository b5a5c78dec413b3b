"""A message's timeline: what happened to it and why, one event a line.

Each event is a JSON object with at least `time` (wall clock) and `event` (its kind);
the other keys depend on the kind (`recipients` names at most 20, and `more` counts the
others):

- `received`: `account`, `client` (its IP), `helo`, `tls` (true: the session was
  encrypted), `listener`, `sender`, `recipients` (a count), `size`, `class`, `dkim` (the
  signing domain, or null)
- `created`: a DSN relay wrote itself: `about` (the original's ID), `kind`, `size`, `class`
- `routed`: `domain`, `recipients`, `provider`, `queue`, `site`, `reason` (why: the
  domain glob, the MX pattern, or default)
- `wait`: `reason` (`site backoff`, `provider suspended`, `recipient rate`, `account
  guard`), `detail`, `until`, `recipients`
- `attempt`: `recipients`, `attempt`, `status`, `reply`, `mx`, `ip`, `relay`, `policy`,
  `tls`, `duration`, `next_attempt`
- `rule`: `match`, `action`, `for`, `rate`, `max_connections`, `reply`, `recipients`
- `dsn`: `kind` (`non-delivery`, `delay`, `success`), `id` (the DSN's own), `recipients`
- `admin`: `action` (`hold`, `release`, `flush`, `bounce`, `delete`)
- `transfer`: `peer` (HOST:PORT), `relay` (the peer as connected to), `reply` (the
  peer's, naming its own queue ID), `recipients`: handed to another relay node
- `finished`: `outcome`, and a count per final status

Events are for people (`relay queue show`, `relay history`), never state: the queue does
not read them back, so they are written without fsync, by a thread of their own
(writer.py), and records.py says what a crash may cost. They are put in time order when
read: an event handed over late (the listener's `received`, reported with the message)
still reads first.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from relay.config.model import Rule
from relay.delivery.classify import classify
from relay.spool.records import RecipientStatus

if TYPE_CHECKING:
    from relay.queue.models import Attempt, QueuedMessage
    from relay.routing.router import Destination
    from relay.spool.records import Envelope

log = logging.getLogger("relay.history")

Event = dict[str, Any]  # {"time": float, "event": str, ...}: one line of a timeline

MAX_READ = 1 << 20  # a timeline longer than this is shown up to here


class Arrival(NamedTuple):
    """How a message came in, as the listener process saw the session: reported with
    the message (it is not in the envelope, which every queued message keeps in
    memory), for its `received` event. A NamedTuple: it crosses the process boundary
    with every message, and a tuple unpickles several times faster than a dataclass."""

    client: str  # the client's IP address
    helo: str
    tls: bool  # the session was encrypted
    listener: str
    dkim: str | None  # the domain it was signed for


class FinalRecipient(NamedTuple):
    address: str
    status: str  # delivered, bounced, expired, transferred, deleted
    attempts: int
    reply: str


class Finished(NamedTuple):
    """A message that has left the queue, as history keeps it (made in the writer's
    thread, from the message handed over: the event loop only hands it over)."""

    id: str
    sender: str
    account: str
    class_name: str
    size: int
    received_at: float
    finished_at: float
    outcome: str
    recipients: tuple[FinalRecipient, ...]
    last: tuple[Event, ...]  # the final events, not yet in the file


class Recorder(Protocol):
    """Where the queue records: append events, and hand a message over once it has left
    the queue (`status` overrides its recipients' own, as an admin's delete does; `last`
    are its final events). Both return at once; neither may fail delivery. A finished
    message is no longer changed by anyone, so it is handed over as it is."""

    def record(self, message_id: str, *events: Event) -> None: ...

    def finish(
        self,
        message: QueuedMessage,
        now: float,
        status: str | None = None,
        last: tuple[Event, ...] = (),
    ) -> None: ...


class NoRecorder:
    """Records nothing (unit tests of the queue alone)."""

    def record(self, message_id: str, *events: Event) -> None:
        pass

    def finish(
        self,
        message: QueuedMessage,
        now: float,
        status: str | None = None,
        last: tuple[Event, ...] = (),
    ) -> None:
        pass


NO_RECORDER = NoRecorder()


# the file


# One encoder for every event: json.dumps() with options builds a new one per call.
ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def encode(event: Event) -> bytes:
    return ENCODER.encode(event).encode() + b"\n"


def decode(raw: bytes) -> list[Event]:
    """The events of a file, in time order. A line cut short by a crash, or zeros left
    by a power cut before the filesystem wrote the data, is skipped."""
    events: list[Event] = []
    for line in raw.split(b"\n"):
        if not line.strip(b"\0 \t\r"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and isinstance(event.get("time"), int | float):
            if isinstance(event.get("event"), str):
                events.append(event)
    events.sort(key=lambda e: float(e["time"]))  # stable: same-time events keep file order
    return events


def read(path: str) -> list[Event]:
    try:
        with open(path, "rb") as handle:
            return decode(handle.read(MAX_READ))
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("timeline %s not readable: %s", path, exc.strerror)
        return []


# the events, as the queue records them

NAMED = 20  # recipients an event names; past it, `more` counts the others


def _named(addresses: list[str]) -> dict[str, Any]:
    """`recipients`, and `more` when there are too many to name: a fan-out's waits and
    routes would otherwise repeat thousands of addresses in every event (the history's
    recipients table keeps each one's outcome)."""
    if len(addresses) <= NAMED:
        return {"recipients": addresses}
    return {"recipients": addresses[:NAMED], "more": len(addresses) - NAMED}


def received(envelope: Envelope, arrival: Arrival) -> Event:
    return {
        "time": envelope.received_at,
        "event": "received",
        "account": envelope.account,
        "client": arrival.client,
        "helo": arrival.helo,
        "tls": arrival.tls,
        "listener": arrival.listener,
        "sender": envelope.sender,
        "recipients": len(envelope.recipients),
        "size": envelope.size,
        "class": envelope.class_name,
        "dkim": arrival.dkim,
    }


def created(now: float, envelope: Envelope, about: str, kind: str) -> Event:
    return {
        "time": now,
        "event": "created",
        "about": about,
        "kind": kind,
        "size": envelope.size,
        "class": envelope.class_name,
    }


def routed(now: float, domain: str, recipients: list[str], destination: Destination) -> Event:
    return {
        "time": now,
        "event": "routed",
        "domain": domain,
        **_named(recipients),
        "provider": destination.queue.provider,
        "queue": destination.queue.key,
        "site": destination.site.key,
        "reason": destination.reason,
    }


def waiting(
    now: float, reason: str, recipients: list[str], until: float | None, detail: str | None
) -> Event:
    return {
        "time": now,
        "event": "wait",
        "reason": reason,
        "detail": detail,
        "until": until,
        **_named(recipients),
    }


def notice(now: float, kind: str, dsn_id: str, recipients: list[str]) -> Event:
    return {"time": now, "event": "dsn", "kind": kind, "id": dsn_id, **_named(recipients)}


def admin(now: float, action: str) -> Event:
    return {"time": now, "event": "admin", "action": action}


def transferred(now: float, peer: str, relay: str, reply: str, recipients: list[str]) -> Event:
    return {
        "time": now,
        "event": "transfer",
        "peer": peer,
        "relay": relay,
        "reply": reply,
        **_named(recipients),
    }


def _split_relay(relay: str | None) -> tuple[str | None, str | None]:
    """ "mx.example.org[192.0.2.1]:25" → host and address."""
    if not relay:
        return None, None
    host, _, rest = relay.partition("[")
    return host or None, rest.partition("]")[0] or None


_NAMES = {status: status.name.lower() for status in RecipientStatus}


def attempts(
    now: float,
    done: Sequence[Attempt],
    relay: str | None,
    started: float | None,
    global_rules: tuple[Rule, ...],
) -> list[Event]:
    """One `attempt` event per outcome of a transaction (its recipients grouped), and a
    `rule` event per reply a rule matched. Called once the outcome is recorded, so each
    recipient's status and reply are what the log line says (expiry included). The rule
    is found as the lane found it: classify.py, provider's rules first, then the global.
    On the event loop, once per transaction: kept lean."""
    if not done:
        return []
    mx, ip = _split_relay(relay)
    # Only a session's transaction has a duration of its own; a site that could not be
    # reached was tried before its mail was taken.
    duration = round(now - started, 3) if started and relay else None
    groups: dict[tuple[Any, ...], list[str]] = {}
    matched: dict[str, tuple[Rule, list[str]]] = {}
    rules: tuple[Rule, ...] | None = None
    for attempt in done:
        recipient = attempt.recipient
        hop = attempt.hop
        status = recipient.status
        key = (
            status,
            recipient.last_reply,
            recipient.attempts,
            recipient.next_attempt if status is RecipientStatus.DEFERRED else None,
            id(hop),  # one Hop per session: identity, not its (Python-level) hash
        )
        group = groups.get(key)
        if group is None:
            groups[key] = [recipient.address]
        else:
            group.append(recipient.address)
        reply = attempt.reply
        if not reply.is_success:
            text = str(reply)
            if text in matched:
                matched[text][1].append(recipient.address)
                continue
            if rules is None:
                destination = recipient.destination
                own = destination.queue.shaping.rules if destination else ()
                rules = own + global_rules
            rule = classify(reply, rules).rule
            if rule is not None:
                matched[text] = (rule, [recipient.address])
    hops = {id(a.hop): a.hop for a in done}
    events: list[Event] = []
    for (status, reply_text, count, later, hop_id), addresses in groups.items():
        hop = hops[hop_id]
        events.append(
            {
                "time": now,
                "event": "attempt",
                **_named(addresses),
                "attempt": count,
                "status": _NAMES[status],
                "reply": reply_text,
                "mx": mx,
                "ip": ip,
                "relay": relay,
                "policy": hop.policy if hop else None,
                "tls": hop.tls if hop else None,
                "duration": duration,
                "next_attempt": later,
            }
        )
    for text, (rule, addresses) in matched.items():
        events.append(
            {
                "time": now,
                "event": "rule",
                "match": rule.pattern.pattern,
                "action": rule.action,
                "for": rule.duration,
                "rate": str(rule.rate) if rule.rate else None,
                "max_connections": rule.max_connections,
                "reply": text,
                **_named(addresses),
            }
        )
    return events


def finished(
    message: QueuedMessage, now: float, status: str | None = None, last: Iterable[Event] = ()
) -> Finished:
    """The history record of a message that left the queue (in the writer's thread);
    `status` overrides the recipients' own (an admin's delete), and the `finished`
    event is added to `last`."""
    recipients = tuple(
        FinalRecipient(
            r.address,
            _NAMES[r.status] if status is None or r.status.is_final else status,
            r.attempts,
            r.last_reply,
        )
        for r in message.recipients
    )
    counts: dict[str, int] = {}
    for final in recipients:
        counts[final.status] = counts.get(final.status, 0) + 1
    outcome = next(iter(counts)) if len(counts) == 1 else "mixed"
    envelope = message.envelope
    end: Event = {"time": now, "event": "finished", "outcome": outcome, **counts}
    return Finished(
        id=envelope.id,
        sender=envelope.sender,
        account=envelope.account,
        class_name=envelope.class_name,
        size=envelope.size,
        received_at=envelope.received_at,
        finished_at=now,
        outcome=outcome,
        recipients=recipients,
        last=(*last, end),
    )
