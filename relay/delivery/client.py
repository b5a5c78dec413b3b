"""An open outbound SMTP session (aiosmtplib): transactions on it, and a close that
frees its slot only once the socket is gone. `connector.py` opens them.

aiosmtplib and OSError exceptions stop here: callers see TransientDeliveryError with
the Reply to log and report.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiosmtplib

from relay.config.model import Delivery
from relay.delivery.tls_policy import Decision, PolicyName, TlsFacts
from relay.errors import (
    TransientDeliveryError,
)
from relay.queue.models import Recipient
from relay.reply import Reply
from relay.routing.router import Site
from relay.shaping.slots import Slot
from relay.spool.records import Envelope

log = logging.getLogger("relay.delivery")


def _xtext(value: str) -> str:
    """RFC 3461 §4 xtext: '+', '=' and non-printables as +HH."""
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else f"+{ord(c):02X}" for c in value)


async def shut(
    transport: asyncio.BaseTransport | None,
    gone: asyncio.Future[None],
    where: str,
    abortive: bool = False,
) -> None:
    """Close and wait until the socket is gone (connection_lost); the caller frees the
    connection's slot only after this returns.

    A graceful close with unsent data leaves the kernel sending it, a FIN after it, for
    many minutes to a peer that reads nothing: the peer still counts us connected. So a
    session that failed midway (`abortive`), or one whose close does not finish within
    CLOSE_TIMEOUT, is reset instead (SO_LINGER 0, then abort): the peer sees that at once.
    """
    if transport is not None and abortive:
        _reset(transport)
    elif transport is not None and not transport.is_closing():
        transport.close()
    if gone.done():
        return
    try:
        await asyncio.wait_for(asyncio.shield(gone), CLOSE_TIMEOUT)
        return
    except TimeoutError:
        pass
    if transport is not None:
        _reset(transport)
    try:
        await asyncio.wait_for(asyncio.shield(gone), CLOSE_TIMEOUT)
    except TimeoutError:
        log.warning("%s: socket not closed even after a reset", where)


def _reset(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # uvloop's transports have abort() without being asyncio.Transport instances.
    abort = getattr(transport, "abort", None)
    if callable(abort):
        abort()
    else:
        transport.close()


def _needs_smtputf8(envelope: Envelope, recipients: Sequence[Recipient], message: bytes) -> bool:
    """UTF-8 in the envelope or the header section (RFC 6531 §3.4)."""
    if not envelope.smtputf8:
        return False
    if not envelope.sender.isascii() or not all(r.address.isascii() for r in recipients):
        return True
    end = message.find(b"\r\n\r\n")
    return not message[: end if end >= 0 else len(message)].isascii()


def wire_body(message: bytes) -> bytes:
    """The DATA content as sent: dot-stuffed, ending in CRLF, then the end marker."""
    if message.startswith(b"."):
        message = b"." + message
    message = message.replace(b"\n.", b"\n..")
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    return message + b".\r\n"


# How long a polite goodbye may take: QUIT's reply, then the peer's own close.
QUIT_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0


@dataclass(slots=True)
class Connection:
    """One open session to one MX host; it may carry mail for any domain that host serves."""

    smtp: aiosmtplib.SMTP
    site: Site
    host: str
    address: str
    port: int
    timeouts: Delivery
    closed: asyncio.Future[None]  # resolved when the socket is gone (connection_lost)
    transactions: int = field(default=0)
    tls: TlsFacts = field(default_factory=TlsFacts)  # what its handshake established
    policy: PolicyName = "opportunistic"  # the strongest TLS policy it has met so far
    tls_failed: bool = False  # an MTA-STS policy in testing mode would have refused it
    decisions: dict[str, Decision] = field(default_factory=dict)  # by recipient domain
    released: bool = False  # closed, and its slot and counts given back (lane.py)
    slot: Slot | None = None  # its connection slot (a lease in a cluster), held until closed
    busy: bool = False  # inside a transaction that has not finished
    local: str = ""  # the address it left from (the egress source's, or the system's)
    # Ours to close: aiosmtplib forgets its transport when it closes it, but a graceful
    # close can hang on a peer that reads nothing, and then only abort() ends it.
    transport: asyncio.BaseTransport | None = None

    @property
    def description(self) -> str:
        """ "mx1.example.org[192.0.2.1]:25", as Postfix logs relay=."""
        return f"{self.host}[{self.address}]:{self.port}"

    @property
    def dsn(self) -> bool:
        """The next hop takes NOTIFY/ORCPT/RET/ENVID on (RFC 3461)."""
        return self.smtp.supports_extension("dsn")

    @property
    def usable(self) -> bool:
        """Open, and not left midway through a transaction."""
        return self.smtp.is_connected and not self.busy

    def serves(self, site: Site) -> bool:
        return site.key == self.site.key or site.serves(self.host, self.site.source)

    async def close(self) -> None:
        """QUIT, wait for the server to close its end, then close ours and wait until the
        socket is gone. Only then may the caller free the connection's slot: the server
        must never count more than `max_connections` of ours, not even for the moment
        between our close and its noticing (SPEC §5)."""
        protocol = self.smtp.protocol
        # Mid-transaction (a cancelled worker at shutdown, a failed send) QUIT would be
        # read as part of the message or wait behind it: hang up instead.
        if self.smtp.is_connected and protocol is not None and not self.busy:
            try:
                await protocol.execute_command(b"QUIT", timeout=QUIT_TIMEOUT)
                # RFC 5321 §4.1.1.10: after 221 the server closes the channel; its own
                # close means it has stopped counting this connection.
                await asyncio.wait_for(asyncio.shield(self.closed), CLOSE_TIMEOUT)
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                pass
        transport = self.transport
        broken = self.busy
        if broken:
            self.smtp.transport = None  # aiosmtplib must not close it gracefully first
        self.smtp.close()
        await shut(transport, self.closed, self.description, abortive=broken)

    async def _command(self, stage: str, *args: bytes, limit: float | None = None) -> Reply:
        try:
            response = await self.smtp.execute_command(
                *args, timeout=self.timeouts.command_timeout if limit is None else limit
            )
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise TransientDeliveryError(
                Reply.local(
                    451,
                    "4.4.2",
                    f"lost connection with {self.description} while sending {stage}: {exc}",
                )
            ) from exc
        return Reply.parse(response.code, response.message)

    async def send(
        self, envelope: Envelope, recipients: Sequence[Recipient], message: bytes
    ) -> dict[int, Reply]:
        """One transaction (see `_send`); `busy` stays set if it did not finish."""
        self.busy = True
        replies = await self._send(envelope, recipients, message)
        self.busy = False
        return replies

    async def _send(
        self, envelope: Envelope, recipients: Sequence[Recipient], message: bytes
    ) -> dict[int, Reply]:
        """Run one transaction; the reply that decides each recipient, by recipient index.

        Raises TransientDeliveryError when the connection fails midway: the caller
        defers whichever recipients have no reply.
        """
        smtp = self.smtp
        if _needs_smtputf8(envelope, recipients, message) and not smtp.supports_extension(
            "smtputf8"
        ):
            # RFC 6531 §3.4: a message that needs SMTPUTF8 is not downgraded; a next hop
            # without the extension cannot take it, and that will not change by retrying.
            # (One that was submitted with SMTPUTF8 but is all ASCII goes as usual, as
            # Postfix does.)
            refused = Reply.local(
                550, "5.6.7", f"SMTPUTF8 is required, but was not offered by {self.description}"
            )
            return {r.index: refused for r in recipients}
        self.transactions += 1
        options: list[bytes] = []
        if smtp.supports_extension("size"):
            options.append(b"SIZE=%d" % len(message))
        if envelope.smtputf8 and smtp.supports_extension("smtputf8"):
            options.append(b"SMTPUTF8")
        if smtp.supports_extension("8bitmime") and not message.isascii():
            options.append(b"BODY=8BITMIME")
        dsn = smtp.supports_extension("dsn")
        if dsn and envelope.ret:
            options.append(b"RET=" + envelope.ret.encode())
        if dsn and envelope.envid:
            options.append(b"ENVID=" + _xtext(envelope.envid).encode())
        mail = await self._command(
            "MAIL FROM", b"MAIL", b"FROM:<" + envelope.sender.encode() + b">", *options
        )
        if not mail.is_success:
            await self._reset()
            return {r.index: mail for r in recipients}
        replies: dict[int, Reply] = {}
        accepted: list[Recipient] = []
        for recipient in recipients:
            args = [b"TO:<" + recipient.address.encode() + b">"]
            if dsn and recipient.spec.notify:
                args.append(b"NOTIFY=" + recipient.spec.notify.encode())
            if dsn and recipient.spec.orcpt:
                args.append(b"ORCPT=" + recipient.spec.orcpt.encode())
            reply = await self._command("RCPT TO", b"RCPT", *args)
            if reply.is_success:
                accepted.append(recipient)
            else:
                replies[recipient.index] = reply
            if reply.code == 421:
                break  # the server is closing; the rest wait for another connection
        if not accepted:
            await self._reset()
            return replies
        data_reply = await self._command("DATA", b"DATA", limit=self.timeouts.data_init_timeout)
        if data_reply.code == 354:
            data_reply = await self._body(message)
        else:
            await self._reset()
        for recipient in accepted:
            replies[recipient.index] = data_reply
        return replies

    async def _body(self, message: bytes) -> Reply:
        """Send the content after a 354 and read the final reply.

        The spool holds the message with CRLF line endings already, so only dot-stuffing
        (RFC 5321 §4.5.2) is left, done with one bytes.replace. aiosmtplib's `data()`
        would run two regular expressions over the whole body for every delivery.
        """
        protocol = self.smtp.protocol
        try:
            if protocol is None:
                raise aiosmtplib.SMTPServerDisconnected("connection lost")
            protocol.write(wire_body(message))
            # Postfix times each block (smtp_data_xfer_timeout) and then the final reply
            # (smtp_data_done_timeout); the transport buffers our writes, so one budget
            # covers both here.
            response = await protocol.read_response(
                timeout=self.timeouts.data_xfer_timeout + self.timeouts.data_done_timeout
            )
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise TransientDeliveryError(
                Reply.local(
                    451,
                    "4.4.2",
                    f"lost connection with {self.description} while sending message body: {exc}",
                )
            ) from exc
        return Reply.parse(response.code, response.message)

    async def _reset(self) -> None:
        """End a refused transaction; the replies already read stand whatever RSET does."""
        if self.smtp.is_connected:
            try:
                reply = await self._command("RSET", b"RSET")
            except TransientDeliveryError:
                reply = None
            if reply is None or not reply.is_success:
                self.smtp.close()
