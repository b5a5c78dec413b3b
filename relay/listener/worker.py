"""The listener process: SMTP sessions and spool writes, on a core of their own.

The main process binds the sockets, starts this process (`python -m
relay.listener.worker FD`, FD its end of a socketpair) and sends ("start", config,
{listener name: [socket fds]}, accounts the account guard refuses, the cluster's live
nodes last seen). From then on this process reports each durable message ("accepted",
envelope, body offset, arrival) before its client hears 250, each refusal ("rejected",
reason), each refused AUTH ("auth_failed",) and each message of a DKIM signing domain
("dkim_signed", domain, "signed" or "failed"); it asks admission of RCPTs of capped
classes (relay.listener.admission) and reads the answers at any time, even while
draining. It takes ("config", config) on reload, ("guard", accounts) when the accounts
the account guard refuses change, ("nodes", count) when a cluster's live nodes change
(its share of the account rates while Redis is down), and ("drain", grace) at
shutdown, after which it exits once its sessions are done. If the main process dies,
so does this one (PR_SET_PDEATHSIG), and an end of file on the socketpair means the
same.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any

from relay import eventloop, logs
from relay.config.model import Config
from relay.dkim import Signer
from relay.dns.resolver import Resolver
from relay.errors import RelayError
from relay.history.events import Arrival
from relay.listener import ipc
from relay.listener.abuse import AccountRates, AuthFailures, LocalAccountRates, LocalAuthFailures
from relay.listener.admission import AdmissionClient
from relay.listener.server import Listeners
from relay.spool.records import Envelope
from relay.spool.store import Spool
from relay.tasks import spawn
from relay.tls import listener_context

if TYPE_CHECKING:
    from relay.cluster.accountrates import SharedAccountRates

log = logging.getLogger("relay.listener")

_PR_SET_PDEATHSIG = 1


class _Reporter:
    """ListenerEvents sent to the main process."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    def accepted(self, envelope: Envelope, body_offset: int, arrival: Arrival) -> None:
        self._writer.write(ipc.frame("accepted", envelope, body_offset, arrival))

    def rejected(self, reason: str) -> None:
        self._writer.write(ipc.frame("rejected", reason))

    def auth_failed(self) -> None:
        self._writer.write(ipc.frame("auth_failed"))

    def dkim_signed(self, domain: str, result: str) -> None:
        self._writer.write(ipc.frame("dkim_signed", domain, result))


class _Shares:
    """Where the live-node count goes in this process: the account rates of a cluster
    (nothing on a single node)."""

    def __init__(self) -> None:
        self.rates: SharedAccountRates | None = None

    def live_nodes(self, count: int) -> None:
        if self.rates is not None:
            self.rates.live_nodes = max(1, count)


def _die_with_parent(parent: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the end of file on the socketpair still stops us
    if os.getppid() != parent:
        os._exit(1)


async def _serve(channel: socket.socket) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=channel)
    start = await ipc.receive(reader)
    if start is None:
        return
    _, config, fds, refused, live_nodes = start
    assert isinstance(config, Config)
    sockets = {name: [socket.socket(fileno=fd) for fd in numbers] for name, numbers in fds.items()}
    spool = Spool(config.spool_path, writer=1)
    spool.open()
    admission = AdmissionClient(writer)
    tasks: set[asyncio.Task[Any]] = set()
    auth_failures: AuthFailures | None = None
    account_rates: AccountRates | None = None
    shares = _Shares()
    link = None
    if config.cluster is not None:
        # AUTH failures and account rates counted by the whole cluster (SPEC §9),
        # through a link of this process's own; it only ever delays an AUTH or a MAIL
        # by its short timeout, never a 250 for DATA.
        from relay.cluster.accountrates import SharedAccountRates
        from relay.cluster.authfail import SharedAuthFailures
        from relay.cluster.link import RedisLink

        link = RedisLink(str(config.cluster.redis))
        spawn(link.watch(), tasks, "redis probe")
        auth_failures = SharedAuthFailures(LocalAuthFailures(), link)
        shared_rates = SharedAccountRates(LocalAccountRates(), link)
        shares.rates = shared_rates
        account_rates = shared_rates
    shares.live_nodes(live_nodes)
    listeners = Listeners(
        config,
        spool,
        listener_context(config),
        _Reporter(writer),
        Resolver(config.dns),
        admission,
        auth_failures,
        account_rates,
    )
    listeners.policy.refused = frozenset(refused)
    await listeners.start(sockets)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        # Sent to the whole group (a terminal's ^C, systemd's stop): stop taking new
        # sessions at once; the main process says when to go.
        loop.add_signal_handler(signum, listeners.drain)
    writer.write(ipc.frame("ready"))
    commands: asyncio.Queue[tuple[Any, ...] | None] = asyncio.Queue()
    reading = asyncio.create_task(_read(reader, admission, commands), name="commands")
    while (message := await commands.get()) is not None:
        await _command(listeners, shares, message)
        if message[0] == "drain":
            break
    reading.cancel()
    await asyncio.gather(reading, return_exceptions=True)
    await listeners.close()
    for task in tasks:
        task.cancel()
    if link is not None:
        await link.close()
    writer.close()


async def _read(
    reader: asyncio.StreamReader,
    admission: AdmissionClient,
    commands: asyncio.Queue[tuple[Any, ...] | None],
) -> None:
    """Answers go to the sessions waiting for them at once; commands wait their turn
    (a drain waits for sessions that may themselves wait for an answer)."""
    try:
        while (message := await ipc.receive(reader)) is not None:
            if message[0] == "admitted":
                admission.answered(message[1], message[2])
            else:
                commands.put_nowait(message)
    finally:
        commands.put_nowait(None)


async def _command(listeners: Listeners, shares: _Shares, message: tuple[Any, ...]) -> None:
    if message[0] == "config":
        config: Config = message[1]
        resolver = listeners.resolver
        if config.dns != resolver.config:
            resolver = Resolver(config.dns)
        try:
            context = listener_context(config)
        except (RelayError, OSError) as exc:  # checked by the main process; changed since?
            log.error("listener TLS not reloaded: %s", exc)
            context = listeners.tls_context
        listeners.reconfigure(config, context, resolver)
        # Keys are read again at each reload, so a key replaced in place is picked up.
        # One that cannot be read leaves its domain's mail answered 451 until it is
        # fixed: sent unsigned, it would fail DMARC where the domain publishes it.
        signer = Signer.load(config.dkim)
        for problem in signer.keys.problems:
            log.error("DKIM key not loaded: %s; its domain's mail is refused with 451", problem)
        for handler in listeners.handlers:
            handler.signer = signer
        log.info(
            "listener reconfigured; DKIM keys: %s",
            ", ".join(f"{k.domain} {k.selector} {k.algorithm}" for k in signer.keys.keys) or "none",
        )
    elif message[0] == "guard":
        listeners.policy.refused = frozenset(message[1])
    elif message[0] == "nodes":
        shares.live_nodes(message[1])
    elif message[0] == "drain":
        listeners.drain()
        try:
            await asyncio.wait_for(listeners.wait_idle(), timeout=message[1])
        except TimeoutError:
            log.warning("listener: sessions still open after %.0fs; closing them", message[1])


def main() -> None:
    channel_fd, parent, fmt, level = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:5]
    _die_with_parent(parent)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reload comes from the main process
    logs.setup(fmt, level)
    eventloop.run(_serve(socket.socket(fileno=channel_fd)))


if __name__ == "__main__":
    main()
