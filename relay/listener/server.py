"""The configured listeners, in our own event loop (not aiosmtpd's threaded Controller).

Owns the listening sockets and the sessions' shared state: reload hands every handler
the new config; drain turns new sessions away with 421 and closes the idle ones. The
sockets are bound by `bind_sockets` in the main process, so that a busy port fails the
start with a clear message, and served here in the listener process.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import time
from functools import partial
from typing import Any

from relay.config.model import Config, Listener
from relay.dns.resolver import Resolver
from relay.errors import RelayError
from relay.listener.abuse import AccountRates, AuthFailures
from relay.listener.admission import AdmissionClient
from relay.listener.handler import ListenerEvents, SubmissionHandler
from relay.listener.policy import ConnectionGate, Policy
from relay.listener.session import Submission
from relay.spool.store import Spool
from relay.tls import certificate_files, load_into

log = logging.getLogger("relay.listener")

BIND_WAIT = 3.0
HANDSHAKE_TIMEOUT = 30.0  # seconds, for implicit TLS; asyncio's own default is 60


def bind_sockets(config: Config) -> dict[str, list[socket.socket]]:
    """Listening sockets for every listener (all addresses its host name has).

    Raises RelayError naming the listener when an address cannot be bound.
    """
    bound: dict[str, list[socket.socket]] = {}
    try:
        for listener in config.listeners:
            bound[listener.name] = []
            infos = socket.getaddrinfo(
                listener.address or None,
                listener.port,
                type=socket.SOCK_STREAM,
                flags=socket.AI_PASSIVE,
            )
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                bound[listener.name].append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                _bind(sock, address)
                sock.listen(1024)
                sock.setblocking(False)
    except OSError as exc:
        for sockets in bound.values():
            for sock in sockets:
                sock.close()
        raise RelayError(
            f"listener {listener.name}: cannot listen on "
            f"{listener.address}:{listener.port}: {exc.strerror or exc}"
        ) from exc
    return bound


def _bind(sock: socket.socket, address: tuple[Any, ...]) -> None:
    """Bind, waiting up to BIND_WAIT seconds for a port still held by a listener process
    of a relay that was just killed: the kernel ends it with its parent, a moment later."""
    deadline = time.monotonic() + BIND_WAIT
    while True:
        try:
            sock.bind(address)
            return
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _socket_key(listener: Listener) -> tuple[str, int, str]:
    return (listener.address, listener.port, listener.tls)


class Listeners:
    def __init__(
        self,
        config: Config,
        spool: Spool,
        tls_context: ssl.SSLContext | None,
        events: ListenerEvents,
        resolver: Resolver,
        admission: AdmissionClient,
        auth_failures: AuthFailures | None = None,  # a cluster's (SPEC §9); else local
        account_rates: AccountRates | None = None,  # the same
    ) -> None:
        self.resolver = resolver
        self.config = config
        self.tls_context = tls_context  # read at each new connection: reload swaps it
        self.policy = Policy(config, resolver, auth_failures, account_rates)
        self.gate = ConnectionGate(
            config.limits.max_connections, config.limits.max_connections_per_ip
        )
        self._spool = spool
        self._events = events
        self._admission = admission
        self.handlers: list[SubmissionHandler] = []
        self.servers: list[asyncio.Server] = []

    async def start(self, sockets: dict[str, list[socket.socket]]) -> None:
        """Serve the sockets `bind_sockets` made, by listener name."""
        loop = asyncio.get_running_loop()
        for listener in self.config.listeners:
            handler = SubmissionHandler(
                self.config,
                listener,
                self.policy,
                self.gate,
                self._spool,
                self._events,
                self._admission,
            )
            self.handlers.append(handler)
            for sock in sockets[listener.name]:
                # No ssl= even for implicit TLS: the session runs the handshake itself,
                # once the connection is counted (see Submission._start_implicit_tls).
                self.servers.append(
                    await loop.create_server(partial(self._session, handler), sock=sock)
                )
            log.info(
                "listening on %s:%d (%s, tls=%s, auth=%s)",
                listener.address,
                listener.port,
                listener.name,
                listener.tls,
                listener.auth,
            )

    def _session(self, handler: SubmissionHandler) -> Submission:
        config, listener = handler.config, handler.listener
        return Submission(
            handler,
            implicit_tls=self.tls_context if listener.tls == "implicit" else None,
            # A handshake is a few round trips; one that takes longer holds a connection
            # slot, so it gets no more than a command would (and at most HANDSHAKE_TIMEOUT).
            handshake_timeout=min(config.limits.idle_timeout, HANDSHAKE_TIMEOUT),
            hostname=config.hostname,
            ident="relay",
            data_size_limit=config.limits.max_message_size,
            enable_SMTPUTF8=True,
            tls_context=self.tls_context if listener.tls == "starttls" else None,
            # On an implicit-TLS listener the whole session is encrypted already.
            auth_require_tls=not (listener.tls == "implicit" or config.tls.allow_plain_auth),
            timeout=config.limits.idle_timeout,
        )

    def reconfigure(
        self, config: Config, tls_context: ssl.SSLContext | None, resolver: Resolver
    ) -> None:
        """New limits, accounts, classes and certificate for new sessions. Sockets stay:
        a changed address, port or TLS mode takes effect at the next restart."""
        if [_socket_key(x) for x in config.listeners] != [
            _socket_key(x) for x in self.config.listeners
        ]:
            log.warning(
                "listener addresses, ports or TLS modes changed: "
                "they take effect at the next restart"
            )
        by_name = {listener.name: listener for listener in config.listeners}
        self.resolver = resolver
        for handler in self.handlers:
            handler.config = config
            new = by_name.get(handler.listener.name)
            if new is not None and _socket_key(new) == _socket_key(handler.listener):
                handler.listener = new
        self.config = config
        if self.tls_context is None or tls_context is None:
            self.tls_context = tls_context
        else:
            # Load the new certificate into the context sessions already hold, so that
            # a session between its accept and its handshake gets the new one too.
            cert, key = certificate_files(config.tls, config.spool_path, config.hostname)
            load_into(self.tls_context, cert, key)
        self.policy.reconfigure(config, resolver)
        self.gate.total = config.limits.max_connections
        self.gate.per_ip = config.limits.max_connections_per_ip

    def drain(self) -> None:
        self.gate.draining = True
        for handler in self.handlers:
            for session in list(handler.sessions):
                session.close_for_shutdown()

    async def wait_idle(self) -> None:
        """Until every session has ended (each ends itself after its transaction)."""
        await self.gate.idle.wait()

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for handler in self.handlers:
            for session in list(handler.sessions):
                session.hang_up()
        for server in self.servers:
            await server.wait_closed()
