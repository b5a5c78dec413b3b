"""Refusals that need the whole configuration, made by `relay serve` before it binds.

The shipped `config/relay.yaml` carries an account whose password ("change-me") is
printed in that file and in the README. On loopback it is a harmless local trial; on an
address others can reach it is an open door to a relay that signs and delivers as us.
"""

from __future__ import annotations

import errno
import socket

from relay.config.model import Config
from relay.config.values import is_loopback

# The hash of "change-me" in config/relay.yaml (tests/test_config.py keeps the two equal).
EXAMPLE_PASSWORD_HASH = (
    "scrypt:16384:8:1:0mnVaVulK2oHoMjYFLd9IA==:b74rHpM3cV9Mhkx+rIIdZvD7UArYgCoAIqMg+b14CrA="
)


def example_password_exposed(config: Config) -> str | None:
    """One sentence when an account still has the example password and a listener is on
    an address other hosts can reach (a wildcard counts); None otherwise.

    Only the documented hash is recognised: checking every hash against "change-me" would
    cost a deliberate scrypt per account at each start.
    """
    accounts = [
        f"accounts[{i}] ({a.name})"
        for i, a in enumerate(config.accounts)
        if a.password == EXAMPLE_PASSWORD_HASH
    ]
    exposed = [
        f"listeners[{i}] ({x.address})"
        for i, x in enumerate(config.listeners)
        if not is_loopback(x.address)
    ]
    if not accounts or not exposed:
        return None
    return (
        f"{', '.join(accounts)}: the password is still the example of config/relay.yaml "
        f'("change-me", published), refused while {", ".join(exposed)} is not on loopback; '
        'put a hash from "relay passwd" there'
    )


def egress_not_local(config: Config) -> list[str]:
    """One sentence per source address this machine does not have: binding to it would
    fail at every connection, so it stops `check-config` and the start instead."""
    problems = []
    for source in config.egress.values():
        for address in source.addresses:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                try:
                    probe.bind((address, 0))
                except OSError as exc:
                    why = (
                        "is not an address of this machine"
                        if exc.errno == errno.EADDRNOTAVAIL
                        else f"cannot be bound: {exc.strerror}"
                    )
                    key = (
                        "delivery.source_address"
                        if not config.egress_named
                        else (f"egress.{source.name}.source_address")
                    )
                    problems.append(f"{key}: {address} {why}")
    return problems
