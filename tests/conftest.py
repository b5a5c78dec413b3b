"""Fixtures: a DNS server, a farm of destination MX servers, and the relay as users run it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.passwords import hash_password
from tests.dnsserver import DnsServer
from tests.mxserver import MxFarm
from tests.redisserver import RedisServer
from tests.relayproc import PASSWORD, RelayProcess, base_config, free_port


@pytest.fixture(scope="session")
def password_hash() -> str:
    return hash_password(PASSWORD)


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    server = DnsServer().start()
    # The senders' domain must be routable (the listener checks it); nothing listens at
    # this address unless a test asks for example_org.
    server.add("example.org", "A", "127.0.0.9")
    yield server
    server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, stopped after the test."""
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def mx_farm() -> Iterator[MxFarm]:
    farm = MxFarm(free_port())
    yield farm
    farm.stop()


@pytest.fixture
def relay_factory(
    tmp_path: Path, dns_server: DnsServer, mx_farm: MxFarm, password_hash: str
) -> Iterator[Callable[..., RelayProcess]]:
    """Build (and later stop) relays; keyword arguments are merged into the test config.
    `node` names a directory of its own, for a test with several relays."""
    started: list[RelayProcess] = []

    def make(
        start: bool = True, args: tuple[str, ...] = (), node: str | None = None, **extra: Any
    ) -> RelayProcess:
        workdir = tmp_path / node if node else tmp_path
        workdir.mkdir(exist_ok=True)
        config = base_config(workdir, dns_server.port, mx_farm.port, password_hash, **extra)
        relay = RelayProcess(workdir, config, args)
        started.append(relay)
        return relay.start() if start else relay

    yield make
    for relay in started:
        relay.stop()


@pytest.fixture
def example_org(dns_server: DnsServer, mx_farm: MxFarm):  # type: ignore[no-untyped-def]
    """The senders' own domain, so DSNs have somewhere to go."""
    dns_server.mx("example.org", (10, "mx.example.org"))
    dns_server.add("mx.example.org", "A", "127.0.0.9")
    return mx_farm.server("127.0.0.9")
