"""`relay queue …`, `relay provider …`, `relay account …`, `relay cluster status`,
`relay reload`: clients of the admin API."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

from relay.admin.client import AdminClient, AdminError, AdminTimeout, endpoint_from_config
from relay.admin.explain import limit_phrase, local_clock, span
from relay.config.units import parse_duration
from relay.history.text import finished_lines, history_table, timeline_lines
from relay.shaping.adaptive import CLEAN_STEP


def _client(args: argparse.Namespace, config_path: str) -> AdminClient:
    endpoint = endpoint_from_config(config_path)
    if args.token:
        return AdminClient(args.admin_url or endpoint.url, args.token, "--token")
    return AdminClient(args.admin_url or endpoint.url, endpoint.token, endpoint.token_from)


def _messages(client: AdminClient, args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    after = None
    while True:
        page = client.call(
            "GET",
            "/api/queue",
            query={
                "provider": args.provider or "",
                "class": args.class_name or "",
                "state": args.state or "",
                "after": after or "",
                "limit": "1000",
            },
        )
        yield from page["messages"]
        after = page.get("next")
        if not after:
            return


def _mailq(messages: list[dict[str, Any]]) -> str:
    """Postfix mailq layout: ID (* active, ! held), size, arrival, sender; then recipients."""
    if not messages:
        return "Mail queue is empty"
    lines = ["-Queue ID-       --Size-- ----Arrival Time---- -Sender/Recipient-------"]
    total = 0
    for message in messages:
        states = {r["state"] for r in message["recipients"]}
        mark = "!" if message["held"] else "*" if "active" in states else " "
        arrival = time.strftime("%a %b %d %H:%M:%S", time.localtime(message["arrival"]))
        lines.append(
            f"{message['id']}{mark:1s} {message['size']:>8d} {arrival}  "
            f"{message['sender'] or 'MAILER-DAEMON'}"
        )
        for r in message["recipients"]:
            if r.get("last_reply"):
                lines.append(f"({r['last_reply'][:200]})")
            note = (
                f"[{r['provider']}, {r['state']}"
                + (f", attempt {r['attempts']}" if r["attempts"] else "")
                + "]"
            )
            lines.append(f"{'':42s}{r['address']}  {note}")
        lines.append("")
        total += message["size"]
    count, plural = len(messages), "s" if len(messages) != 1 else ""
    lines.append(f"-- {max(1, total // 1024)} Kbytes in {count} Request{plural}.")
    return "\n".join(lines)


def _show(message: dict[str, Any]) -> str:
    arrival = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(message["arrival"]))
    held = ""
    if message["held"]:
        held = (
            "  (held by the account guard)" if message.get("hold_reason") == "guard" else "  (held)"
        )
    lines = [
        f"id:       {message['id']}{held}",
        f"sender:   <{message['sender']}>",
        f"account:  {message['account']}",
        f"class:    {message['class']}",
        f"size:     {message['size']}",
        f"arrival:  {arrival}",
    ]
    if message.get("envid"):
        lines.append(f"envid:    {message['envid']}")
    lines.append("recipients:")
    for r in message["recipients"]:
        when = ""
        if r.get("next_attempt"):
            when = " next " + time.strftime("%H:%M:%S", time.localtime(r["next_attempt"]))
        lines.append(
            f"  <{r['address']}> {r['state']} provider={r['provider']} "
            f"attempts={r['attempts']}{when}"
        )
        if r.get("last_reply"):
            lines.append(f"      last reply: {r['last_reply']}")
    lines += timeline_lines(message.get("timeline") or [])
    lines += ["headers:", *("  " + line for line in message.get("headers", "").splitlines())]
    return "\n".join(lines)


def _peer_password(user: str) -> str:
    """$RELAY_PEER_PASSWORD, else asked for (or read from stdin when it is not a
    terminal): never on the command line, where `ps` would show it."""
    if os.environ.get("RELAY_PEER_PASSWORD"):
        return os.environ["RELAY_PEER_PASSWORD"]
    if sys.stdin.isatty():
        return getpass.getpass(f"password of {user} on the peer: ")
    return sys.stdin.readline().rstrip("\r\n")


def _transfer(client: AdminClient, args: argparse.Namespace) -> int:
    """Waits for the end of the transfer: the daemon answers with the counts."""
    try:
        timeout = parse_duration(args.timeout)
    except ValueError as exc:
        raise AdminError(f"--timeout: {exc}") from None
    body: dict[str, Any] = {"to": args.to, "provider": args.provider}
    if args.user:
        body |= {"user": args.user, "password": _peer_password(args.user)}
    try:
        report = client.call("POST", "/api/queue/transfer", body=body, timeout=timeout)
    except AdminTimeout as exc:
        raise AdminError(
            f"{exc}; the transfer goes on in the daemon, whose log has its progress "
            "and final count (a longer --timeout waits for it)"
        ) from None
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"{report['transferred']} messages ({report['recipients']} recipients) "
            f"transferred to {report['to']}; {report['failed']} refused, "
            f"{report['left']} left here"
        )
        for reason, count in report["reasons"].items():
            print(f"  {count:6d}  {reason}")
        if report["stopped"]:
            print(f"stopped: {report['stopped']}")
    return 1 if report["failed"] or report["stopped"] else 0


def cmd_queue(args: argparse.Namespace, config_path: str) -> int:
    client = _client(args, config_path)
    action = args.queue_action
    if action == "list":
        messages = list(_messages(client, args))
        print(json.dumps(messages, indent=2) if args.json else _mailq(messages))
    elif action == "show":
        message = client.call("GET", f"/api/queue/{args.id}")
        print(json.dumps(message, indent=2) if args.json else _show(message))
    elif action == "flush":
        if args.id:
            result = client.call("POST", f"/api/queue/{args.id}/flush")
        else:
            result = client.call("POST", "/api/queue/flush", body={"provider": args.provider})
        print(f"{result['flushed']} deferred recipients are due now")
    elif action == "transfer":
        return _transfer(client, args)
    elif action == "delete":
        for message_id in args.ids:
            client.call("DELETE", f"/api/queue/{message_id}")
            print(f"{message_id}: deleted")
    else:  # hold, release, bounce
        done = {"hold": "held", "release": "released", "bounce": "bounced"}[action]
        for message_id in args.ids:
            client.call("POST", f"/api/queue/{message_id}/{action}")
            print(f"{message_id}: {done}")
    return 0


def cmd_history(args: argparse.Namespace, config_path: str) -> int:
    """Finished messages: one by ID with its timeline, or those to or from an address."""
    if args.id and (args.to or args.sender):
        raise AdminError("give an ID, or --to/--from, not both")
    if not (args.id or args.to or args.sender):
        raise AdminError("say which messages: an ID, --to ADDRESS or --from ADDRESS")
    client = _client(args, config_path)
    if args.id:
        found = client.call("GET", f"/api/history/{args.id}")
        print(json.dumps(found, indent=2) if args.json else "\n".join(finished_lines(found)))
        return 0
    query = {
        "to": args.to or "",
        "from": args.sender or "",
        "since": args.since or "",
        "limit": str(args.limit),
    }
    messages = client.call("GET", "/api/history", query=query)["messages"]
    print(json.dumps(messages, indent=2) if args.json else "\n".join(history_table(messages)))
    return 0


def provider_lines(shown: dict[str, Any], now: float | None = None) -> list[str]:
    """Each queue of a provider, its state, and each limit in force with its cause."""
    now = time.time() if now is None else now
    lines = []
    for queue in shown["queues"]:
        if queue["suspended"]:
            until = queue["suspended_until"]
            left = f" until {local_clock(until)} ({span(until - now)} left)" if until else ""
            state = f"suspended{left}: {queue['suspended']}"
        else:
            state = "active"
        open_now = queue["connections"]
        lines.append(
            f"{queue['queue']} (egress {queue['egress']}): {state}; "
            f"{open_now} connection{'' if open_now == 1 else 's'} open"
        )
        for limit in queue["limits"]:
            lines.append("  " + limit_phrase(limit, now))
        if not queue["adaptive"]:
            lines.append("  adaptive limits: off")
        elif any(limit["why"] == "adaptive" for limit in queue["limits"]):
            lines.append(
                f"  adaptive limits: {queue['clean_transactions']} of {CLEAN_STEP} clean "
                "transactions toward the next step back up"
            )
        else:
            lines.append("  adaptive limits: on, nothing cut")
    return lines


def cmd_provider(args: argparse.Namespace, config_path: str) -> int:
    client = _client(args, config_path)
    if args.provider_action == "list":
        rows = client.call("GET", "/api/providers")["providers"]
        if args.json:
            print(json.dumps(rows, indent=2))
        for row in [] if args.json else rows:
            state = (
                f"suspended ({row['suspended']})"
                if row["suspended"]
                else ("paused" if row["paused"] else "active")
            )
            print(
                f"{row['queue']:32s} {state:40s} batches={row['pending_batches']} "
                f"max_connections={row['max_connections']}"
            )
    elif args.provider_action == "show":
        shown = client.call("GET", f"/api/providers/{urllib.parse.quote(args.name, safe='')}")
        print(json.dumps(shown, indent=2) if args.json else "\n".join(provider_lines(shown)))
    elif args.provider_action == "suspend":
        client.call("POST", f"/api/providers/{args.name}/suspend", body={"for": args.duration})
        print(f"{args.name}: suspended for {args.duration}")
    else:
        client.call("POST", f"/api/providers/{args.name}/resume")
        print(f"{args.name}: resumed")
    return 0


def cluster_table(status: dict[str, Any]) -> list[str]:
    """`relay cluster status` for people: Redis, the nodes and their heartbeats, and the
    connection slots leased per provider or site, by node."""
    lines = [
        f"node {status['node']}: Redis {status['redis']}, {status['live_nodes']} live nodes "
        f"(lease {status['lease']:g}s)"
    ]
    nodes = status.get("nodes")
    if nodes is None:
        lines.append("nodes: unknown while Redis is down")
    else:
        lines.append(f"{'NODE':20s} {'ADDRESS':32s} {'HEARTBEAT':>10s}  STATE")
        for row in nodes:
            state = "live" if row["live"] else "silent"
            lines.append(f"{row['node']:20s} {row['address']:32s} {row['age']:9.1f}s  {state}")
    leases = status.get("leases")
    held_here = status.get("held_here") or {}
    if leases is None:
        lines.append("leases held here: " + (", ".join(f"{k}={v}" for k, v in held_here.items())))
    elif not leases:
        lines.append("no connection slots leased")
    else:
        lines.append(f"{'PROVIDER/SITE':32s} {'LEASES':>6s}  BY NODE")
        for lane, per_node in sorted(leases.items()):
            by_node = ", ".join(f"{n}={c}" for n, c in sorted(per_node.items()))
            lines.append(f"{lane:32s} {sum(per_node.values()):6d}  {by_node}")
    return lines


def cmd_cluster(args: argparse.Namespace, config_path: str) -> int:
    status = _client(args, config_path).call("GET", "/api/cluster")
    print(json.dumps(status, indent=2) if args.json else "\n".join(cluster_table(status)))
    return 0


def _accounts_table(rows: list[dict[str, Any]]) -> str:
    """The account guard's figures, one account a line; a tripped one says since when
    and why on the next line."""
    if not rows:
        return "no accounts"
    lines = [
        f"{'ACCOUNT':20s} {'STATE':8s} {'ACTION':6s} {'LAST HOUR':>9s} {'BASELINE/H':>10s} "
        f"{'LIMIT':>7s}  BOUNCES (LAST HOUR)"
    ]
    for row in rows:
        baseline = "-" if row["baseline"] is None else f"{row['baseline']:.0f}"
        if row["finished"]:
            bounces = f"{row['bounce_ratio']:.0%} of {row['finished']}"
        else:
            bounces = "none finished"
        if row["finished"] and row["finished"] < row["min_outcomes"]:
            bounces += f" (judged from {row['min_outcomes']})"
        lines.append(
            f"{row['account']:20s} {row['state']:8s} {row['action']:6s} {row['volume']:>9d} "
            f"{baseline:>10s} {row['limit']:>7.0f}  {bounces}"
        )
        if row["since"]:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["since"]))
            lines.append(f"{'':20s} since {since}: {row['reason']}")
    return "\n".join(lines)


def cmd_account(args: argparse.Namespace, config_path: str) -> int:
    client = _client(args, config_path)
    if args.account_action == "list":
        rows = client.call("GET", "/api/accounts")["accounts"]
        print(json.dumps(rows, indent=2) if args.json else _accounts_table(rows))
    else:
        name = urllib.parse.quote(args.name, safe="")
        result = client.call("POST", f"/api/accounts/{name}/release")
        print(f"{args.name}: released; {result['released']} held messages go out")
    return 0


def cmd_reload(args: argparse.Namespace, config_path: str) -> int:
    _client(args, config_path).call("POST", "/api/reload")
    print("configuration reloaded")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        help="YAML file to find the admin API in (default: $RELAY_CONFIG or config/relay.yaml)",
    )
    common.add_argument("--admin-url", help="e.g. http://127.0.0.1:9025 (overrides the config)")
    common.add_argument(
        "--token",
        help="admin bearer token (default: $RELAY_ADMIN_TOKEN, admin.token, or the token "
        "the daemon generated in <spool.path>/admin.token)",
    )

    queue = sub.add_parser("queue", help="inspect and act on the mail queue")
    qsub = queue.add_subparsers(dest="queue_action", required=True)
    listing = qsub.add_parser("list", parents=[common], help="like mailq")
    listing.add_argument("--provider")
    listing.add_argument("--class", dest="class_name")
    listing.add_argument("--state", choices=("ready", "deferred", "held", "active"))
    listing.add_argument("--json", action="store_true")
    show = qsub.add_parser("show", parents=[common], help="one message in detail")
    show.add_argument("id")
    show.add_argument("--json", action="store_true")
    flush = qsub.add_parser("flush", parents=[common], help="deferred mail due now")
    flush.add_argument("id", nargs="?")
    flush.add_argument("--provider")
    transfer = qsub.add_parser(
        "transfer",
        parents=[common],
        help="move queued mail to another relay node over SMTP; each message leaves "
        "this spool only once the peer said 250",
    )
    transfer.add_argument("--to", required=True, metavar="HOST:PORT", help="the peer's listener")
    transfer.add_argument("--provider", help="only recipients queued for this provider")
    transfer.add_argument(
        "--user",
        help="AUTH on the peer as this account (its senders must allow the mail's senders); "
        "password from $RELAY_PEER_PASSWORD or asked for",
    )
    transfer.add_argument(
        "--timeout", default="1h", help="how long to wait for the final count (1h)"
    )
    transfer.add_argument("--json", action="store_true")
    for action, text in (
        ("hold", "keep from delivery until released"),
        ("release", "deliver again"),
        ("delete", "remove without a DSN"),
        ("bounce", "return to the sender with a DSN"),
    ):
        parser = qsub.add_parser(action, parents=[common], help=text)
        parser.add_argument("ids", nargs="+", metavar="ID")
    queue.set_defaults(func=cmd_queue)

    history = sub.add_parser(
        "history",
        parents=[common],
        help="finished messages (kept history.retain): by ID, or to or from an address",
    )
    history.add_argument("id", nargs="?", help="a queue ID: that message and its timeline")
    history.add_argument("--to", help="messages to this address (any case)")
    history.add_argument("--from", dest="sender", help="messages from this envelope sender")
    history.add_argument("--since", help='finished within this long, e.g. "24h"')
    history.add_argument("--limit", type=int, default=100, help="at most this many (100)")
    history.add_argument("--json", action="store_true")
    history.set_defaults(func=cmd_history)

    provider = sub.add_parser(
        "provider", help="see a provider's limits; suspend or resume delivery to it"
    )
    psub = provider.add_subparsers(dest="provider_action", required=True)
    plist = psub.add_parser("list", parents=[common], help="queues with their state")
    plist.add_argument("--json", action="store_true")
    pshow = psub.add_parser(
        "show", parents=[common], help="every limit in force on a provider, and why"
    )
    pshow.add_argument("name", help="provider name, <provider>@<source> or default:<site>")
    pshow.add_argument("--json", action="store_true")
    suspend = psub.add_parser("suspend", parents=[common])
    suspend.add_argument("name", help='provider name, or "default:<domain>"')
    suspend.add_argument("--for", dest="duration", required=True, help='e.g. "1h"')
    resume = psub.add_parser("resume", parents=[common])
    resume.add_argument("name")
    provider.set_defaults(func=cmd_provider)

    cluster = sub.add_parser("cluster", help="the cluster as this node sees it")
    csub = cluster.add_subparsers(dest="cluster_action", required=True)
    cstatus = csub.add_parser(
        "status", parents=[common], help="Redis, nodes, heartbeat ages, leases per provider"
    )
    cstatus.add_argument("--json", action="store_true")
    cluster.set_defaults(func=cmd_cluster)
    account = sub.add_parser("account", help="the account guard: figures, trips, release")
    asub = account.add_subparsers(dest="account_action", required=True)
    alist = asub.add_parser(
        "list", parents=[common], help="each account's last hour, baseline, bounces, state"
    )
    alist.add_argument("--json", action="store_true")
    release = asub.add_parser(
        "release", parents=[common], help="untrip an account: its held mail goes out"
    )
    release.add_argument("name")
    account.set_defaults(func=cmd_account)

    reload = sub.add_parser(
        "reload", parents=[common], help="re-read the daemon's YAML (like SIGHUP)"
    )
    reload.set_defaults(func=cmd_reload)
