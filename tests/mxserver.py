"""Recording destination SMTP servers (aiosmtpd) on 127.0.0.x, in one background loop.

Each server records every transaction with the connection it came on, counts
concurrent connections, and can be told to misbehave by replacing one hook.

Connections are counted at the socket level, as the destination sees them: open from the
transport's connection_made until the client's FIN (eof_received) or the transport's
connection_lost, whichever comes first. A client that frees its slot only once its socket
is closed can never make `max_open` exceed its limit; one that opens the next connection
before the previous one's FIN is out is caught.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass
class Received:
    connection: int
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str] = field(default_factory=list)
    tls: bool = False
    time: float = 0.0
    peer: str = ""  # the client's address: which egress source it left from
    helo: str = ""  # the name it greeted with


class MxServer:
    """One destination host. Hooks return a reply line to refuse, or None to accept."""

    def __init__(
        self, farm: MxFarm, host: str, port: int, tls_context: ssl.SSLContext | None = None
    ) -> None:
        self.farm = farm
        self.tls_context = tls_context
        self.host = host
        self.port = port
        self.messages: list[Received] = []
        self.connections = 0  # accepted in total
        self.open = 0  # open now
        self.open_ids: set[int] = set()
        self.max_open = 0  # the most open at once (since reset_max_open)
        self.transactions: dict[int, int] = {}  # connection id → transactions carried
        self.connect_times: list[float] = []
        self.greeting_delay = 0.0  # seconds between accepting TCP and sending the 220
        self._sessions: asyncio.Semaphore | None = None  # see serve_at_most
        self._stall: asyncio.Event | None = None  # see stall_data
        self.mail_hook: Callable[[str], str | None] = lambda sender: None
        self.rcpt_hook: Callable[[str], str | None] = lambda address: None
        self.data_hook: Callable[[Received], str | None] = lambda message: None
        self.greeting: str | None = None  # e.g. "421 4.3.2 busy": refuse at connect
        # Refuse a connection at connect with `crowd_reply` while more than `crowd_limit`
        # are open, as Postfix's smtpd_client_connection_count_limit does; `crowded` holds
        # the time of each refusal.
        self.crowd_limit: int | None = None
        self.crowd_reply = "421 4.7.0 Trop de connexions"
        self.crowded: list[float] = []
        self.smtputf8 = True  # False: SMTPUTF8 is not offered (RFC 6531)
        self.refuse_peer: dict[str, str] = {}  # client address → reply to each RCPT
        self.open_by_peer: dict[str, int] = {}
        self.max_open_by_peer: dict[str, int] = {}  # the most open at once per client address
        self._peers: dict[int, str] = {}
        self._stalled = 0
        self._server: asyncio.Server | None = None
        self._transports: dict[int, asyncio.BaseTransport] = {}  # by connection: vanish

    # called in the farm's loop

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Protocol(self), host=self.host, port=self.port, reuse_address=True
        )

    async def close(self) -> None:
        if self._stall is not None:
            self._stall.set()
        if self._server is not None:
            self._server.close()

    def _opened(self, conn: int, peer: str = "") -> None:
        with self.farm.cond:
            self._peers[conn] = peer
            self.open_by_peer[peer] = self.open_by_peer.get(peer, 0) + 1
            self.max_open_by_peer[peer] = max(
                self.max_open_by_peer.get(peer, 0), self.open_by_peer[peer]
            )
            self.connections += 1
            self.open += 1
            self.open_ids.add(conn)
            self.max_open = max(self.max_open, self.open)
            self.connect_times.append(time.monotonic())
            self.transactions[conn] = 0
            self.farm.cond.notify_all()

    def _closed(self, conn: int) -> None:
        with self.farm.cond:
            if conn in self.open_ids:
                self.open_ids.discard(conn)
                self.open -= 1
                peer = self._peers.pop(conn, "")
                self.open_by_peer[peer] = self.open_by_peer.get(peer, 1) - 1
                self.farm.cond.notify_all()

    def _record(self, message: Received) -> None:
        message.time = time.monotonic()
        with self.farm.cond:
            self.messages.append(message)
            self.transactions[message.connection] += 1
            self.farm.cond.notify_all()

    # called from tests

    def serve_at_most(self, sessions: int) -> None:
        """Like postscreen in front of a few smtpd processes: accept every TCP connection at
        once, but greet only `sessions` at a time; the others wait for their 220."""
        self._sessions = asyncio.Semaphore(sessions)

    def stall_data(self) -> None:
        """Take the content of every DATA, then answer nothing until `release` (or close):
        each transaction stays in flight on the client's side."""
        self._stall = asyncio.Event()

    def release(self) -> None:
        """End `stall_data`: the stalled transactions and the later ones are accepted."""
        stall = self._stall
        if stall is not None:
            self.farm.loop.call_soon_threadsafe(stall.set)

    def vanish(self) -> None:
        """The host is gone: it stops listening, and every open connection is reset
        (transactions stalled by `stall_data` never get their reply)."""

        async def go() -> None:
            if self._server is not None:
                self._server.close()
            for transport in list(self._transports.values()):
                transport.abort()

        asyncio.run_coroutine_threadsafe(go(), self.farm.loop).result(10)

    def stalled(self) -> int:
        """Transactions waiting for their final reply under `stall_data`."""
        with self.farm.cond:
            return self._stalled

    def open_connections(self) -> set[int]:
        """Ids of the connections open now."""
        with self.farm.cond:
            return set(self.open_ids)

    def reset_max_open(self) -> None:
        """Start counting `max_open` afresh from the connections open now."""
        with self.farm.cond:
            self.max_open = self.open

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 20) -> bool:
        with self.farm.cond:
            return self.farm.cond.wait_for(predicate, timeout)

    def wait_messages(self, count: int, timeout: float = 20) -> list[Received]:
        assert self.wait_for(lambda: len(self.messages) >= count, timeout), (
            f"{self.host}: {len(self.messages)} messages after {timeout}s, expected {count}"
        )
        return list(self.messages)

    def recipients(self) -> list[str]:
        with self.farm.cond:
            return [r for m in self.messages for r in m.rcpt_tos]


class _Handler:
    def __init__(self, server: MxServer, conn: int) -> None:
        self.server = server
        self.conn = conn

    async def handle_MAIL(
        self, smtp: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        refusal = self.server.mail_hook(address)
        if refusal:
            return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, smtp: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        refusal = self.server.rcpt_hook(address) or self.server.refuse_peer.get(session.peer[0])
        if refusal:
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, smtp: SMTP, session: Session, envelope: Envelope) -> str:
        message = Received(
            self.conn,
            envelope.mail_from,
            list(envelope.rcpt_tos),
            envelope.original_content or b"",
            list(envelope.mail_options),
            tls=session.ssl is not None,
            peer=session.peer[0],
            helo=session.host_name or "",
        )
        refusal = self.server.data_hook(message)
        if refusal:
            return refusal
        stall = self.server._stall
        if stall is not None and not stall.is_set():
            with self.server.farm.cond:
                self.server._stalled += 1
                self.server.farm.cond.notify_all()
            try:
                await stall.wait()
            finally:
                with self.server.farm.cond:
                    self.server._stalled -= 1
        self.server._record(message)
        return "250 2.0.0 OK queued"


class _Protocol(SMTP):
    def __init__(self, server: MxServer) -> None:
        self.conn = next(server.farm.ids)
        self.mx = server
        super().__init__(
            _Handler(server, self.conn),
            hostname=f"mx-{server.host}",
            enable_SMTPUTF8=server.smtputf8,
            tls_context=server.tls_context,
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # aiosmtpd calls this again after STARTTLS, on the same connection: count the first.
        if self.transport is None:
            peer = transport.get_extra_info("peername")
            self.mx._opened(self.conn, peer[0] if peer else "")
            self.mx._transports[self.conn] = transport
        refusal = self.mx.greeting
        limit = self.mx.crowd_limit
        if self.transport is None and limit is not None and self.mx.open > limit:
            refusal = self.mx.crowd_reply
            with self.mx.farm.cond:
                self.mx.crowded.append(time.monotonic())
        if refusal and self.transport is None:
            transport.write(refusal.encode() + b"\r\n")
            transport.close()
            self.mx._closed(self.conn)
            self._refused = True
            return
        self._refused = False
        super().connection_made(transport)

    def eof_received(self) -> bool | None:
        # The client's FIN: from here on it has closed the connection, whatever our side does.
        self.mx._closed(self.conn)
        return super().eof_received()

    def connection_lost(self, error: Exception | None) -> None:
        self.mx._closed(self.conn)
        self.mx._transports.pop(self.conn, None)
        if self._refused:
            return
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        # aiosmtpd's session task, which sends the 220 first thing: a greeting delay or a
        # busy "process" holds it back. A client that leaves meanwhile cancels the task
        # (eof_received, connection_lost); aiosmtpd closes its side only once inside.
        try:
            if self.mx.greeting_delay:
                await asyncio.sleep(self.mx.greeting_delay)
            sessions = self.mx._sessions
            if sessions is not None:
                await sessions.acquire()
        except asyncio.CancelledError:
            self._writer.close()
            raise
        try:
            await super()._handle_client()
        finally:
            if sessions is not None:
                sessions.release()


class MxFarm:
    """Destination servers sharing one delivery port on distinct loopback addresses."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cond = threading.Condition()
        self.ids = itertools.count(1)
        self.servers: dict[str, MxServer] = {}
        self.blackholes: list[Blackhole] = []
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="mx")
        self._thread.start()

    def server(self, host: str, tls_context: ssl.SSLContext | None = None) -> MxServer:
        server = MxServer(self, host, self.port, tls_context)
        asyncio.run_coroutine_threadsafe(server.start(), self.loop).result(10)
        self.servers[host] = server
        return server

    def stop(self) -> None:
        for server in self.servers.values():
            asyncio.run_coroutine_threadsafe(server.close(), self.loop).result(10)
        for hole in self.blackholes:
            asyncio.run_coroutine_threadsafe(hole.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


class Blackhole:
    """Accepts TCP connections and never says a word (a hung MX)."""

    def __init__(self, farm: MxFarm, host: str) -> None:
        self.connections = 0
        self._writers: list[asyncio.StreamWriter] = []

        async def start() -> asyncio.Server:
            return await asyncio.start_server(self._accept, host, farm.port, reuse_address=True)

        self._server = asyncio.run_coroutine_threadsafe(start(), farm.loop).result(10)
        farm.blackholes.append(self)

    async def close(self) -> None:
        self._server.close()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for w in self._writers), return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
