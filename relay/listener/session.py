"""One submission session: aiosmtpd's SMTP with our MAIL, RCPT, DATA and AUTH.

aiosmtpd gives us the command loop, STARTTLS (with the RFC 3207 §4.2 buffer discard)
and AUTH framing. We replace MAIL and RCPT because aiosmtpd upper-cases parameter
values (which would corrupt ENVID and ORCPT) and refuses DSN parameters; and DATA,
to read in large chunks with the smuggling-safe terminator of `data.py`.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
from base64 import b64decode
from typing import Any, cast

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from relay.listener.address import PathError, decode_xtext, parse_params, split_path, valid_mailbox
from relay.listener.data import read_data
from relay.listener.fastdir import dispatch_names
from relay.listener.handler import SubmissionHandler
from relay.spool.records import EnvelopeRecipient

log = logging.getLogger("relay.listener")


class Submission(SMTP):
    # The StreamReader pauses the socket past twice this many buffered bytes; 1001 (the
    # RFC line length aiosmtpd uses) would stall DATA every 2 KB.
    line_length_limit = 64 * 1024

    def __init__(self, handler: SubmissionHandler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.handler = handler
        self.peer_ip = ""
        self.trusted = False
        self._admitted = False
        self.recipients: list[EnvelopeRecipient] = []
        self.mail_params: dict[str, str] = {}

    def __dir__(self) -> list[str]:
        return dispatch_names(type(self))

    # Connection lifecycle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
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
        super().connection_made(transport)

    @staticmethod
    def _refuse(transport: asyncio.BaseTransport, reply: bytes) -> None:
        """Say why and hang up. (uvloop's transports do not derive from asyncio's
        WriteTransport classes, hence the cast rather than an isinstance check.)"""
        writer = cast(asyncio.WriteTransport, transport)
        writer.write(reply + b"\r\n")
        writer.close()

    def connection_lost(self, error: Exception | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        self.handler.gate.release(self.peer_ip)
        self.handler.sessions.discard(self)
        super().connection_lost(error)

    @property
    def in_transaction(self) -> bool:
        return self.envelope is not None and self.envelope.mail_from is not None

    def close_for_shutdown(self) -> None:
        """Between transactions: say goodbye now. In one: after its reply (see DATA).

        A session already closing (its client vanished) is left to finish: writing to a
        TLS transport that has let go of its SSL protocol raises.
        """
        transport = self.transport
        if transport is not None and not transport.is_closing() and not self.in_transaction:
            self._refuse(transport, b"421 4.3.2 Service shutting down, try again later")

    def _set_rset_state(self) -> None:
        super()._set_rset_state()  # type: ignore[no-untyped-call]
        self.recipients = []
        self.mail_params = {}

    @property
    def tls_active(self) -> bool:
        return self._tls_protocol is not None or (
            self.transport is not None and self.transport.get_extra_info("sslcontext") is not None
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

    async def _check(self, login: bytes, password: bytes) -> AuthResult:
        throttle = self.handler.policy.auth_throttle
        if throttle.locked(self.peer_ip):
            log.warning("AUTH refused from %s: too many failures", self.peer_ip)
            await self.push("454 4.7.0 Too many authentication failures, try again later")
            return AuthResult(success=False, handled=True)
        account = await self.handler.policy.authenticate(login, password)
        if account is None:
            delay = throttle.failed(self.peer_ip)
            log.warning(
                "AUTH failed from %s for %r (answer delayed %.1fs)",
                self.peer_ip,
                login.decode("utf-8", "replace")[:64],
                delay,
            )
            if delay:
                await asyncio.sleep(delay)  # each failure costs the guesser more time
            return AuthResult(success=False, handled=False)
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
        refusal = self.handler.may_submit(self)
        if refusal:
            await self.push(refusal)
            return
        if self.envelope.mail_from is not None:
            await self.push("503 5.5.1 Error: nested MAIL command")
            return
        parsed = await self._parse_path(arg, "FROM:")
        if parsed is None:
            return
        sender, params = parsed
        reply = self._check_mail_params(params)
        if reply:
            await self.push(reply)
            return
        utf8 = "SMTPUTF8" in params
        if sender and not valid_mailbox(sender, utf8):
            self.handler.note_rejected("syntax")
            await self.push("501 5.1.7 Bad sender address syntax")
            return
        reply = await self.handler.check_sender(self, sender)
        if reply:
            await self.push(reply)
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

    def _check_mail_params(self, params: dict[str, str]) -> str | None:
        for key, value in params.items():
            if key == "SIZE":
                if not value.isdigit():
                    return "501 5.5.4 SIZE takes a number"
                if int(value) > self.handler.config.limits.max_message_size:
                    self.handler.note_rejected("size")
                    return "552 5.3.4 Message size exceeds fixed maximum message size"
            elif key == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    return "501 5.5.4 BODY is 7BIT or 8BITMIME"
            elif key == "SMTPUTF8":
                if value:
                    return "501 5.5.4 SMTPUTF8 takes no value"
            elif key == "RET":
                if value.upper() not in ("FULL", "HDRS"):
                    return "501 5.5.4 RET is FULL or HDRS"
                params[key] = value.upper()
            elif key == "ENVID":
                try:
                    params[key] = decode_xtext(value)
                except PathError:
                    return "501 5.5.4 ENVID must be xtext"
                if len(params[key]) > 100:
                    return "501 5.5.4 ENVID is too long"
            elif key == "AUTH":
                continue  # RFC 4954 §5: informational; we record the authenticated account
            else:
                return f"555 5.5.4 Unsupported MAIL parameter {key}"
        return None

    def _check_rcpt_params(self, params: dict[str, str]) -> str | None:
        """RFC 3461 NOTIFY and ORCPT; normalises NOTIFY in place."""
        for key, value in params.items():
            if key == "NOTIFY":
                words = value.upper().split(",")
                if not (words == ["NEVER"] or set(words) <= {"SUCCESS", "FAILURE", "DELAY"}):
                    return "501 5.5.4 NOTIFY is NEVER or SUCCESS,FAILURE,DELAY"
                params[key] = ",".join(words)
            elif key == "ORCPT":
                kind, semi, _ = value.partition(";")
                if not semi or not kind:
                    return "501 5.5.4 ORCPT is addr-type;xtext"
            else:
                return f"555 5.5.4 Unsupported RCPT parameter {key}"
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
        if not address or not valid_mailbox(address, self.envelope.smtp_utf8):
            await self.push("501 5.1.3 Bad recipient address syntax")
            return
        reply = self._check_rcpt_params(params)
        if reply:
            await self.push(reply)
            return
        self.recipients.append(
            EnvelopeRecipient(address, params.get("NOTIFY"), params.get("ORCPT"))
        )
        self.envelope.rcpt_tos.append(address)
        await self.push("250 2.1.5 Ok")

    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None
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
            reply = await self.handler.accept(self, result.content)
        self._set_rset_state()
        await self.push(reply)
        if self.handler.gate.draining:
            self.close_for_shutdown()
