"""One submission session: aiosmtpd's SMTP with our MAIL, RCPT, DATA and AUTH.

aiosmtpd gives us the command loop, STARTTLS (with the RFC 3207 §4.2 buffer discard)
and AUTH framing. We replace MAIL and RCPT because aiosmtpd upper-cases parameter
values (which would corrupt ENVID and ORCPT) and refuses DSN parameters; and DATA,
to read in large chunks with the smuggling-safe terminator of `data.py`. Implicit TLS
(RFC 8314) is started here too, on a connection already counted, not by the server.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import ssl
from asyncio import sslproto
from base64 import b64decode
from typing import Any, cast

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword, syntax

from relay.listener.abuse import auth_delay
from relay.listener.address import PathError, normalized_mailbox, parse_params, split_path
from relay.listener.data import read_data
from relay.listener.fastdir import dispatch_names
from relay.listener.handler import SubmissionHandler, Transaction
from relay.listener.params import check_mail_params, check_rcpt_params
from relay.listener.policy import Client
from relay.spool.records import EnvelopeRecipient

log = logging.getLogger("relay.listener")


class Submission(SMTP):
    # The StreamReader pauses the socket past twice this many buffered bytes; 1001 (the
    # RFC line length aiosmtpd uses) would stall DATA every 2 KB.
    line_length_limit = 64 * 1024

    def __init__(
        self,
        handler: SubmissionHandler,
        *,
        implicit_tls: ssl.SSLContext | None = None,
        handshake_timeout: float = 30.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.handler = handler
        self.peer_ip = ""
        self.trusted = False
        self._admitted = False
        self._implicit_tls = implicit_tls
        self._handshake_timeout = handshake_timeout
        self._handshaking = False
        self.recipients: list[EnvelopeRecipient] = []
        self.mail_params: dict[str, str] = {}
        self.ticket = 0  # the transaction's admission ticket, taken at its first RCPT

    def __dir__(self) -> list[str]:
        return dispatch_names(type(self))

    # Connection lifecycle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._handshaking:  # implicit TLS is up: asyncio's SSLProtocol calls with its transport
            self._handshaking = False
            super().connection_made(transport)
            assert self.session is not None and self._tls_protocol is not None
            self.session.ssl = self._tls_protocol._extra
            return
        if self.transport is None:  # the first call; STARTTLS calls again
            peer = transport.get_extra_info("peername") or ("", 0)
            self.peer_ip = str(peer[0])
            if self.handler.gate.draining:
                self._refuse(transport, b"421 4.3.2 Service shutting down, try again later")
                return
            if not self.handler.gate.admit(self.peer_ip):
                log.warning("refused connection from %s: too many connections", self.peer_ip)
                self._refuse(transport, b"421 4.7.0 Too many connections, try again later")
                return
            self._admitted = True
            self.handler.sessions.add(self)
            self.trusted = self.handler.policy.trusted(self.handler.listener, self.peer_ip)
            if self._implicit_tls is not None:
                self._start_implicit_tls(transport, self._implicit_tls)
                return
        super().connection_made(transport)

    def _start_implicit_tls(
        self, transport: asyncio.BaseTransport, context: ssl.SSLContext
    ) -> None:
        """The TLS handshake of an implicit-TLS listener, on a connection admitted above.

        Given to create_server(ssl=...), asyncio would run the handshake before any
        protocol of ours saw the connection: stalled handshakes would escape
        max_connections and max_connections_per_ip, each held for asyncio's default 60 s.
        Here the slot is taken at accept and the handshake has our own deadline. The
        layering is the one aiosmtpd's STARTTLS uses; the session starts (greeting) when
        the SSLProtocol calls connection_made again with its transport.
        """
        waiter = self.loop.create_future()
        self._tls_protocol = sslproto.SSLProtocol(
            self.loop,
            self,
            context,
            waiter,
            server_side=True,
            # typeshed says int; asyncio takes any positive number of seconds
            ssl_handshake_timeout=cast(int, self._handshake_timeout),
        )
        self._original_transport = transport
        self._handshaking = True
        transport.set_protocol(self._tls_protocol)
        waiter.add_done_callback(self._handshake_done)
        self._tls_protocol.connection_made(transport)

    def _handshake_done(self, waiter: asyncio.Future[None]) -> None:
        """A failed or timed-out handshake never reaches connection_lost (the SSLProtocol
        only reports losses after it has called connection_made): free the slot here."""
        if not waiter.cancelled() and waiter.exception() is None:
            return
        error = None if waiter.cancelled() else waiter.exception()
        log.info("TLS handshake with %s failed: %s", self.peer_ip, error or "cancelled")
        self._handshaking = False
        if self._original_transport is not None:
            self._original_transport.close()
        self._release()

    def _refuse(self, transport: asyncio.BaseTransport, reply: bytes) -> None:
        """Say why and hang up. On an implicit-TLS connection before its handshake a
        plaintext reply would be garbage to the client (and a handshake just to refuse
        would cost what the cap protects): hang up only.

        (uvloop's transports do not derive from asyncio's WriteTransport classes,
        hence the cast rather than an isinstance check.)"""
        writer = cast(asyncio.WriteTransport, transport)
        if self._implicit_tls is None or self._tls_protocol is not None:
            writer.write(reply + b"\r\n")
        writer.close()

    def _release(self) -> None:
        if not self._admitted:
            return
        self._admitted = False
        self.handler.gate.release(self.peer_ip)
        self.handler.sessions.discard(self)

    def connection_lost(self, error: Exception | None) -> None:
        if not self._admitted:
            return
        self._release()
        self._end_transaction()
        super().connection_lost(error)

    @property
    def in_transaction(self) -> bool:
        return self.envelope is not None and self.envelope.mail_from is not None

    def close_for_shutdown(self) -> None:
        """Between transactions: say goodbye now. In one: after its reply (see DATA).

        A session already closing (its client vanished) is left to finish: writing to a
        TLS transport that has let go of its SSL protocol raises. One still in its
        implicit-TLS handshake has no transport yet; it ends by itself within the
        handshake timeout, or at `hang_up`.
        """
        transport = self.transport
        if transport is not None and not transport.is_closing() and not self.in_transaction:
            self._refuse(transport, b"421 4.3.2 Service shutting down, try again later")

    def hang_up(self) -> None:
        """Close the connection now, whatever stage it is at."""
        transport = self.transport or self._original_transport
        if transport is not None:
            transport.close()

    def _set_rset_state(self) -> None:
        super()._set_rset_state()  # type: ignore[no-untyped-call]
        self.recipients = []
        self.mail_params = {}
        self._end_transaction()

    def _end_transaction(self) -> None:
        """RSET, EHLO, DATA done or refused, the client gone: admission slots the
        transaction still holds are free (a queued message took its own already)."""
        if self.ticket:
            self.handler.admission.release(self.ticket)
            self.ticket = 0

    @property
    def tls_active(self) -> bool:
        return self._tls_protocol is not None or (
            self.transport is not None and self.transport.get_extra_info("sslcontext") is not None
        )

    def client(self) -> Client:
        """What the policy may know of this session, now."""
        session = self.session
        login = None
        if session is not None and session.authenticated:
            raw = getattr(session.auth_data, "login", b"")
            login = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else None
        return Client(
            listener=self.handler.listener,
            peer_ip=self.peer_ip,
            trusted=self.trusted,
            tls=self.tls_active,
            account=self.handler.policy.account(login),
        )

    async def handle_exception(self, error: Exception) -> str:
        """Any error in a session ends it. aiosmtpd's default answers 500 and reads the
        next line; at EOF that read fails again at once, without ever yielding, and the
        session spins (a traceback per turn) until its send buffer fills. Closing first
        makes the loop end at its next write."""
        if self.transport is not None:
            self.transport.close()
        if isinstance(error, asyncio.IncompleteReadError | ConnectionError):
            log.debug("session with %s ended mid-command: %s", self.peer_ip, error)
            return "421 4.4.2 Connection lost"
        log.error("session with %s failed; closing it", self.peer_ip, exc_info=error)
        return "421 4.3.0 Internal error, closing connection"

    # AUTH: credentials are checked off the event loop (scrypt is deliberately slow).

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        if self.handler.listener.auth == "none":
            # EHLO offers no AUTH here; a client that tries anyway must not get in by it
            # (a listener for trusted networks would otherwise take any account's mail).
            await self.push("503 5.5.1 Error: authentication not enabled")
            return
        await super().smtp_AUTH(arg)

    async def _check(self, login: bytes, password: bytes) -> AuthResult:
        failures = self.handler.policy.auth_failures
        name = login.decode("utf-8", "replace")
        # Counted before the check, so parallel guesses cannot all pass a "not locked
        # yet" test before the first of them has failed (see abuse.AuthFailures).
        if not await failures.attempt(self.peer_ip, name):
            log.warning("AUTH refused from %s for %r: too many failures", self.peer_ip, name[:64])
            self.handler.note_auth_failed()
            await self.push("454 4.7.0 Too many authentication failures, try again later")
            return AuthResult(success=False, handled=True)
        try:
            account = await self.handler.policy.authenticate(login, password)
        except BaseException:
            # A check cut short (the client hung up, the process stops) has spent its
            # attempt: hanging up must not be a way to guess for free.
            await asyncio.shield(failures.failed(self.peer_ip, name))
            raise
        if account is None:
            delay = auth_delay(await failures.failed(self.peer_ip, name))
            log.warning(
                "AUTH failed from %s for %r (answer delayed %.1fs)", self.peer_ip, name[:64], delay
            )
            self.handler.note_auth_failed()
            if delay:
                await asyncio.sleep(delay)  # each failure costs the guesser more time
            return AuthResult(success=False, handled=False)
        await failures.passed(self.peer_ip, name)
        return AuthResult(success=True, auth_data=LoginPassword(login, b""), message=None)

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if not isinstance(blob, bytes):
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = b64decode(args[1].encode(), validate=True)
            except binascii.Error:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        return await self._check(parts[1], parts[2])

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await self.challenge_auth(self.AuthLoginUsernameChallenge)
        else:
            try:
                login = b64decode(args[1].encode(), validate=True)
            except binascii.Error:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        if not isinstance(login, bytes):
            return AuthResult(success=False, handled=True)
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        return await self._check(login, password)

    # Envelope

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.session is not None and self.envelope is not None
        if self.handler.gate.draining:
            await self.push("421 4.3.2 Service shutting down, try again later")
            self.close_for_shutdown()
            return
        client = self.client()
        refusal = self.handler.policy.may_submit(client)
        if refusal:
            await self.push(self.handler.refuse(refusal))
            return
        if self.envelope.mail_from is not None:
            await self.push("503 5.5.1 Error: nested MAIL command")
            return
        parsed = await self._parse_path(arg, "FROM:")
        if parsed is None:
            return
        sender, params = parsed
        refusal = check_mail_params(params, self.handler.config.limits.max_message_size)
        if refusal:
            await self.push(self.handler.refuse(refusal))
            return
        utf8 = "SMTPUTF8" in params
        if sender:
            # Normalised before the policy sees it: an allowed-senders glob or a rate
            # must not be sidestepped by spelling the domain in full-width letters.
            normal = normalized_mailbox(sender, utf8)
            if normal is None:
                self.handler.note_rejected("syntax")
                await self.push("501 5.1.7 Bad sender address syntax")
                return
            sender = normal
        refusal = await self.handler.policy.check_sender(client, sender)
        if refusal:
            await self.push(self.handler.refuse(refusal))
            return
        self.envelope.mail_from = sender
        self.envelope.smtp_utf8 = utf8
        self.mail_params = params
        await self.push("250 2.1.0 Ok")

    async def _parse_path(self, arg: str | None, keyword: str) -> tuple[str, dict[str, str]] | None:
        """ "FROM:<a@b> K=V" → ("a@b", {"K": "V"}); a syntax error is answered here."""
        try:
            path, items = split_path(arg or "", keyword)
            return path, parse_params(items)
        except PathError as exc:
            verb = "MAIL FROM" if keyword == "FROM:" else "RCPT TO"
            await self.push(f"501 5.5.4 Syntax: {verb}:<address> ({exc})")
            return None

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None
        if self.envelope.mail_from is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        if len(self.recipients) >= self.handler.config.limits.max_recipients:
            self.handler.note_rejected("recipients")
            await self.push("452 4.5.3 Error: too many recipients")
            return
        parsed = await self._parse_path(arg, "TO:")
        if parsed is None:
            return
        address, params = parsed
        # The domain is normalised (SPEC §5) before it is stored, routed or limited; one
        # that does not normalise is a syntax error like any other.
        normal = normalized_mailbox(address, self.envelope.smtp_utf8) if address else None
        if normal is None:
            await self.push("501 5.1.3 Bad recipient address syntax")
            return
        refusal = check_rcpt_params(params)
        if refusal:
            await self.push(self.handler.refuse(refusal))
            return
        if not self.ticket:
            self.ticket = self.handler.admission.ticket()
        reply = await self.handler.admit(self.client(), self.ticket, normal)
        if reply is not None:
            await self.push(reply)
            return
        self.recipients.append(EnvelopeRecipient(normal, params.get("NOTIFY"), params.get("ORCPT")))
        self.envelope.rcpt_tos.append(normal)
        await self.push("250 2.1.5 Ok")

    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.session is not None and self.envelope is not None
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        if self.envelope.mail_from is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        if not self.recipients:
            await self.push("554 5.5.1 Error: no valid recipients")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        result = await read_data(
            self._reader, self.handler.config.limits.max_message_size, self._reset_timeout
        )
        if result.too_large:
            self.handler.note_rejected("size")
            reply = "552 5.3.4 Message size exceeds fixed maximum message size"
        else:
            reply = await self.handler.accept(self._transaction(), result.content)
        self._set_rset_state()
        await self.push(reply)
        if self.handler.gate.draining:
            self.close_for_shutdown()

    def _transaction(self) -> Transaction:
        assert self.session is not None and self.envelope is not None
        return Transaction(
            client=self.client(),
            helo=self.session.host_name or "",
            esmtp=bool(self.session.extended_smtp),
            sender=self.envelope.mail_from or "",
            recipients=tuple(self.recipients),
            envid=self.mail_params.get("ENVID"),
            ret=self.mail_params.get("RET"),
            smtputf8=bool(self.envelope.smtp_utf8),
            ticket=self.ticket,
        )
