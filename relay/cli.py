"""Command line: the only place that exits. `relay serve | check-config | passwd | dkim`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import os
import resource
import signal
import sys
import urllib.parse

from relay import __version__, eventloop, logs
from relay.config import load_config
from relay.config.checks import egress_not_local, example_password_exposed
from relay.config.model import Config
from relay.errors import ConfigError, RelayError
from relay.routing.egress import choose as choose_egress

DEFAULT_CONFIG = "config/relay.yaml"


def _config_path(args: argparse.Namespace) -> str:
    return args.config or os.environ.get("RELAY_CONFIG") or DEFAULT_CONFIG


def _load(path: str) -> Config:
    try:
        config = load_config(path)
        # A DKIM key is a file the YAML only names: read and checked here, so that
        # check-config and serve both refuse one that cannot sign.
        from relay.dkim import load_keys

        problems = [*load_keys(config.dkim).problems, *egress_not_local(config)]
        if problems:
            raise ConfigError(list(problems))
        return config
    except ConfigError as exc:
        print(f"relay: invalid configuration {path}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        raise SystemExit(1) from None


def _raise_file_limit() -> None:
    """A descriptor per session and per delivery connection, and a thousand queues may
    each hold connections: take the hard limit, as Go's runtime and nginx do."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


EX_TEMPFAIL = 75  # sysexits.h: try again later


def cmd_serve(args: argparse.Namespace) -> int:
    from relay.app import Relay
    from relay.notify import Notifier

    config = _load(_config_path(args))
    exposed = example_password_exposed(config)
    if exposed is not None:
        print(f"relay: refusing to start: {exposed}", file=sys.stderr)
        return 1
    logs.setup(args.log_format, args.log_level)
    _raise_file_limit()  # the listener process inherits it

    async def main() -> int:
        relay = Relay(config, notifier=Notifier.from_environ())
        stop, urgent = asyncio.Event(), asyncio.Event()
        reloads: set[asyncio.Task[list[str]]] = set()

        def on_stop() -> None:
            (urgent if stop.is_set() else stop).set()  # a second signal: stop now

        def on_hup() -> None:
            task = asyncio.get_running_loop().create_task(relay.reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_stop)
        loop.add_signal_handler(signal.SIGHUP, on_hup)
        await relay.run(stop, urgent, grace=args.grace)
        # Fenced off (another node adopted this spool): not a clean stop, so that a
        # supervisor starts it again, and the new start waits for the adopter.
        return EX_TEMPFAIL if relay.fenced else 0

    try:
        return eventloop.run(main())
    except (RelayError, OSError) as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.file)
    print(f"{args.file}: valid")
    print(f"hostname: {config.hostname}")
    print(f"spool: {config.spool_path}")
    cluster = config.cluster
    if cluster is not None:
        # The URL may hold a password: only where it points is printed.
        redis = urllib.parse.urlsplit(str(cluster.redis))
        takeover = (
            f"shared_spool={cluster.shared_spool} takeover_after={cluster.takeover_after:g}s"
            if cluster.shared_spool
            else "no shared_spool (no takeover)"
        )
        print(
            f"cluster: node {cluster.node}, redis {redis.scheme}://{redis.hostname}:"
            f"{redis.port or 6379}, lease {cluster.lease:g}s, {takeover}"
        )
    for listener in config.listeners:
        print(
            f"listener {listener.name}: {listener.address}:{listener.port} tls={listener.tls} "
            f"auth={listener.auth} class={listener.class_name} trusted="
            f"{','.join(map(str, listener.trusted_networks)) or '-'}"
        )
    print("classes:")
    for cls in sorted(config.classes.values(), key=lambda c: -c.priority):
        print(
            f"  {cls.name}: priority={cls.priority} rate={cls.rate or '-'} "
            f"detect={','.join(cls.detect) or '-'} max_queued={cls.max_queued or '-'}"
        )
    print("providers:")
    rows = [
        (p.name, p.shaping, ",".join(p.domains) or "-", ",".join(p.mx) or "-")
        for p in config.providers
    ]
    rows.append(("default", config.defaults, "(any other domain, one queue each)", "-"))
    for name, s, domains, mx in rows:
        route = f" route={s.route[0]}:{s.route[1]}" if s.route else ""
        print(
            f"  {name}: domains={domains} mx={mx} max_connections={s.max_connections} "
            f"max_messages_per_connection={s.max_messages_per_connection} "
            f"max_recipients_per_message={s.max_recipients_per_message} "
            f"rate={s.rate or '-'} tls={s.tls} rules={len(s.rules)}{route}"
        )
    print("queues (class, provider):")
    for class_name in sorted(config.classes, key=lambda c: -config.classes[c].priority):
        print("  " + "  ".join(f"({class_name}, {name})" for name, *_ in rows))
    print(f"global rules: {len(config.rules)}")
    if not config.egress_named:
        only = config.egress[config.default_egress]
        where = ",".join(only.addresses) or "any local address"
        print(f"egress: one source [{where}] ehlo={only.ehlo}")
    else:
        print("egress (class, provider) → source:")
    for class_name in sorted(config.classes, key=lambda c: -config.classes[c].priority):
        for name, *_ in rows if config.egress_named else ():
            source = choose_egress(config, None, class_name, name)
            where = ",".join(source.addresses)
            print(f"  ({class_name}, {name}) → {source.name} [{where}] ehlo={source.ehlo}")
    pinned = [a for a in config.accounts if a.egress]
    for account in pinned:
        print(f"  account {account.name} → {account.egress} (over its class)")
    from relay.dkim import load_keys

    keys = load_keys(config.dkim).keys
    print("dkim keys:" if keys else "dkim keys: none (mail leaves unsigned)")
    for key in keys:
        size = f" {key.bits} bits" if key.algorithm == "rsa" else ""
        print(f"  {key.domain}: selector={key.selector} algorithm={key.algorithm}{size} {key.path}")
    return 0


def cmd_passwd(args: argparse.Namespace) -> int:
    from relay.passwords import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if password != getpass.getpass("Again: "):
            print("relay: passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("relay: empty password refused", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


def cmd_dkim_keygen(args: argparse.Namespace) -> int:
    from relay.dkim.keygen import keygen, zone_record

    try:
        key = keygen(args.domain, args.selector, args.algorithm, args.bits, args.out)
    except ValueError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    except FileExistsError as exc:
        print(f"relay: {exc.filename} exists; a published record may name it", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"relay: cannot write {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"relay: wrote {key.path} (mode 0600); publish in DNS:", file=sys.stderr)
    print(zone_record(key))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description="Outbound SMTP relay.")
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the daemon")
    serve.add_argument(
        "-c", "--config", help=f"YAML file (default: $RELAY_CONFIG or {DEFAULT_CONFIG})"
    )
    serve.add_argument("--log-format", choices=("text", "json"), default="text")
    serve.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    serve.add_argument(
        "--grace",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM, time for sessions and deliveries in flight to finish "
        "(default 30; a second signal stops at once)",
    )
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser("check-config", help="validate a config and show what it resolves to")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)
    passwd = sub.add_parser("passwd", help="hash a password for accounts[].password")
    passwd.set_defaults(func=cmd_passwd)
    dkim = sub.add_parser("dkim", help="DKIM signing keys").add_subparsers(
        dest="dkim_command", required=True
    )
    keygen = dkim.add_parser(
        "keygen", help="write a new signing key and print the DNS TXT record to publish"
    )
    keygen.add_argument("--domain", required=True, help="signing domain (the d= tag)")
    keygen.add_argument("--selector", required=True, help="selector (the s= tag), e.g. s2026")
    keygen.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa")
    keygen.add_argument("--bits", type=int, help="RSA modulus size (default 2048)")
    keygen.add_argument("--out", help="key file (default ./SELECTOR.DOMAIN.pem; never replaced)")
    keygen.set_defaults(func=cmd_dkim_keygen)
    from relay.admin.cli import add_parsers

    add_parsers(sub)
    from relay.replay.cli import add_parser as add_replay

    add_replay(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("queue", "provider", "account", "reload", "history", "cluster"):
            return int(args.func(args, _config_path(args)))
        return int(args.func(args))
    except RelayError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
