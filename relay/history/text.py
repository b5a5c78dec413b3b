"""A timeline and history as a person reads them in a terminal (`relay queue show`,
`relay history`): one line per event, local time, the facts that explain it.

It works on the admin API's JSON answers (plain dicts), since the CLI is a client of
the API; an event kind it does not know is shown with its keys as they are.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

Event = dict[str, Any]


def span(seconds: float) -> str:
    """1800 → "30m", 86400 → "1d", 90 → "90s": the units of the configuration."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _clock(when: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(when))


def _stamp(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) + f".{int(when % 1 * 1000):03d}"


def _who(e: Event) -> str:
    addresses: list[str] = e.get("recipients") or []
    shown = ", ".join(f"<{a}>" for a in addresses[:5])
    more = len(addresses) - 5 + int(e.get("more") or 0)
    return shown + (f" and {more} more" if more > 0 else "")


def _received(e: Event) -> str:
    tls = ", TLS" if e.get("tls") else ""
    count = e.get("recipients", 0)
    return (
        f"from {e.get('client') or 'a local process'} (helo {e.get('helo') or '-'}{tls}) on "
        f"{e.get('listener')}, account {e.get('account')}: <{e.get('sender')}>, {count} "
        f"recipient{'s' if count != 1 else ''}, {e.get('size')} bytes, class {e.get('class')}, "
        f"DKIM {e.get('dkim') or 'unsigned'}"
    )


def _created(e: Event) -> str:
    return f"{e.get('kind')} notification about {e.get('about')}, {e.get('size')} bytes"


def _routed(e: Event) -> str:
    return (
        f"{e.get('domain')} → queue {e.get('queue')} (provider {e.get('provider')}, "
        f"site {e.get('site') or '-'}) by {e.get('reason')}: {_who(e)}"
    )


def _wait(e: Event) -> str:
    until = f" until {_clock(e['until'])}" if e.get("until") else ""
    detail = f" ({e['detail']})" if e.get("detail") else ""
    return f"{e.get('reason')}{until}{detail}: {_who(e)}"


def _attempt(e: Event) -> str:
    via = f" via {e['relay']}" if e.get("relay") else ""
    tls = f" tls={e.get('tls') or 'none'} policy={e['policy']}" if e.get("policy") else ""
    took = ""
    if e.get("duration") is not None:
        seconds = float(e["duration"])
        took = f" in {seconds * 1000:.0f} ms" if seconds < 1 else f" in {seconds:.1f}s"
    later = f"; next attempt {_clock(e['next_attempt'])}" if e.get("next_attempt") else ""
    return (
        f"#{e.get('attempt')} {e.get('status')}: {_who(e)}{via}{tls}{took}: {e.get('reply')}{later}"
    )


def _rule(e: Event) -> str:
    action = str(e.get("action"))
    if e.get("for"):
        action += f" for {span(float(e['for']))}"
    limits = [f"{k}={e[k]}" for k in ("rate", "max_connections") if e.get(k)]
    if limits:
        action += " (" + ", ".join(limits) + ")"
    return f"'{e.get('match')}' matched: {action}; reply {e.get('reply')}"


def _dsn(e: Event) -> str:
    about = _who(e)
    return f"{e.get('kind')} notification {e.get('id')} queued for the sender about {about}"


def _admin(e: Event) -> str:
    return f"{e.get('action')} by the administrator"


def _transfer(e: Event) -> str:
    return f"transferred to {e.get('peer')} ({e.get('relay')}): {_who(e)}: {e.get('reply')}"


def _finished(e: Event) -> str:
    counts = {k: v for k, v in e.items() if k not in ("time", "event", "outcome")}
    detail = ", ".join(f"{k} {v}" for k, v in counts.items())
    return f"{e.get('outcome')}" + (f" ({detail})" if detail else "")


_DESCRIBE: dict[str, Callable[[Event], str]] = {
    "received": _received,
    "created": _created,
    "routed": _routed,
    "wait": _wait,
    "attempt": _attempt,
    "rule": _rule,
    "dsn": _dsn,
    "admin": _admin,
    "transfer": _transfer,
    "finished": _finished,
}


def describe(event: Event) -> str:
    """One event in words, without its time."""
    known = _DESCRIBE.get(str(event.get("event")))
    if known is not None:
        return known(event)
    return " ".join(f"{k}={v}" for k, v in event.items() if k not in ("time", "event"))


def timeline_lines(timeline: list[Event]) -> list[str]:
    """`timeline:` and one line per event: the first with its date, each with the time
    since the first, so waits stand out."""
    if not timeline:
        return ["timeline: (none recorded)"]
    lines = ["timeline:"]
    first = float(timeline[0]["time"])
    for n, event in enumerate(timeline):
        when = float(event["time"])
        shown = _stamp(when) if n == 0 else f"{'':11s}{_clock(when)}.{int(when % 1 * 1000):03d}"
        lines.append(f"  {shown} +{when - first:8.3f}s {event['event']:9s} {describe(event)}")
    return lines


def finished_lines(message: dict[str, Any]) -> list[str]:
    """A finished message from history: its envelope, recipients, and whole timeline."""
    lines = [
        f"id:       {message['id']}",
        f"sender:   <{message['sender']}>",
        f"account:  {message['account']}",
        f"class:    {message['class']}",
        f"size:     {message['size']}",
        f"arrival:  {_stamp(message['arrival'])}",
        f"finished: {_stamp(message['finished'])}  {message['outcome']}",
        "recipients:",
    ]
    for r in message["recipients"]:
        lines.append(f"  <{r['address']}> {r['status']} attempts={r['attempts']}")
        if r.get("last_reply"):
            lines.append(f"      last reply: {r['last_reply']}")
    return lines + timeline_lines(message.get("timeline") or [])


def history_table(messages: list[dict[str, Any]]) -> list[str]:
    """Finished messages, newest first, mailq-like: one line each, then its recipients."""
    if not messages:
        return ["No finished message matches (history keeps history.retain)."]
    lines = ["-Finished----------- -Queue ID-------- -Outcome- -Sender/Recipient-------"]
    for m in messages:
        finished = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["finished"]))
        lines.append(f"{finished} {m['id']:17s} {m['outcome']:9s} <{m['sender']}>")
        for r in m["recipients"]:
            reply = f" ({r['last_reply']})" if r.get("last_reply") else ""
            lines.append(f"{'':48s}<{r['address']}> {r['status']}{reply}")
    return lines
