"""`relay replay --config NEW.yaml LOGFILE...`; relay/cli.py registers it and exits."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from relay.config import load_config
from relay.errors import ConfigError
from relay.replay.judge import replay
from relay.replay.output import as_json, render


def add_parser(sub: Any) -> None:
    """Register `replay` on the CLI's subparsers action."""
    parser = sub.add_parser(
        "replay",
        help="judge the replies recorded in JSON delivery logs under another config",
        description="Read delivery logs written by `relay serve --log-format json` and show, "
        "per provider, how each recorded reply would be judged under CONFIG: verdicts that "
        "change, rules that would match, suspensions and throttles that would start. "
        "Offline: no DNS, no daemon.",
    )
    parser.add_argument("-c", "--config", required=True, help="the YAML to judge by")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("logfile", nargs="+", help="JSON log files (.gz read as gzip; - stdin)")
    parser.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    try:
        # The loader alone, not serve's checks: the DKIM key files and source addresses
        # of the production host need not exist where the replay runs.
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"relay: invalid configuration {args.config}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    try:
        report = replay(config, args.config, args.logfile)
    except OSError as exc:
        where = exc.filename or "a log file"
        print(f"relay: cannot read {where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    try:
        if args.json:
            json.dump(as_json(report), sys.stdout, indent=2, ensure_ascii=False)
            print()
        else:
            render(report, sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:
        # `relay replay … | head`: the reader has had enough. Python's own recipe (the
        # signal module's notes on SIGPIPE): point stdout at /dev/null so the flush at
        # exit does not fail a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return 0
