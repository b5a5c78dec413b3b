"""Provider emulators: each quirk with the exact reply text seen in production (SPEC §1),
and the shipped presets from config/relay.yaml with their durations shortened for tests."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import yaml

from tests.mxserver import MxServer

ROOT = Path(__file__).resolve().parent.parent

ORANGE_OFR_506 = "550 5.2.0 Mail rejete. Mail rejected. ofr_506"
LAPOSTE_BUSY = "421 4.3.2 All server ports are busy"
LAPOSTE_LATER = (
    "550 5.5.0 Service refuse. Veuillez essayer plus tard. service refused, "
    "please try later. LPN007_510"
)
FREE_TOO_MANY_ERRORS = "451 too many errors from your ip"
FACEBOOK_POL_P4 = "554 5.7.1 POL-P4 Connection refused"
MAILBOX_FULL = "452 4.2.2 Mailbox full"
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections from your host"


def shipped(duration: str = "2s") -> dict[str, Any]:
    """providers and rules of the shipped config, every rule's `for` set to `duration`,
    and provider rates lifted (tests measure etiquette, not patience)."""
    config = yaml.safe_load((ROOT / "config" / "relay.yaml").read_text())
    for provider in config["providers"].values():
        provider.pop("rate", None)
        for rule in provider.get("rules", []):
            if "for" in rule:
                rule["for"] = duration
    for rule in config.get("rules", []):
        if "for" in rule:
            rule["for"] = duration
    return {"providers": config["providers"], "rules": config["rules"]}


class Quirk:
    """A reply given while on; switched off by the test (or after `times` uses)."""

    def __init__(self, reply: str, times: int | None = None) -> None:
        self.reply = reply
        self.times = times
        self.on = True
        self.used = 0
        self._lock = threading.Lock()

    def __call__(self, *_: object) -> str | None:
        with self._lock:
            if not self.on:
                return None
            self.used += 1
            if self.times is not None and self.used >= self.times:
                self.on = False
            return self.reply

    def off(self) -> None:
        with self._lock:
            self.on = False


def at_greeting(server: MxServer, reply: str) -> None:
    server.greeting = reply
