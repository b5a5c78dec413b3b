"""Outbound SMTP sessions (aiosmtplib): connect to a destination, run transactions.

aiosmtplib and OSError exceptions stop here: callers see TransientDeliveryError,
PermanentDeliveryError or DestinationUnreachable, each with the Reply to log and report.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiosmtplib

from relay.config.model import Config, Delivery, DeliveryTls, Rule, Shaping
from relay.dns.resolver import MAX_ADDRESSES, Resolver
from relay.errors import (
    DestinationUnreachable,
    DnsPermanentError,
    DnsTemporaryError,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from relay.queue.models import Recipient
from relay.reply import Reply
from relay.routing.router import Site
from relay.spool.records import Envelope

log = logging.getLogger("relay.delivery")


def _xtext(value: str) -> str:
    """RFC 3461 §4 xtext: '+', '=' and non-printables as +HH."""
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else f"+{ord(c):02X}" for c in value)


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

    @property
    def description(self) -> str:
        """ "mx1.example.org[192.0.2.1]:25", as Postfix logs relay=."""
        return f"{self.host}[{self.address}]:{self.port}"

    @property
    def usable(self) -> bool:
        return self.smtp.is_connected

    def serves(self, site: Site) -> bool:
        return site.key == self.site.key or site.serves(self.host)

    async def close(self) -> None:
        """QUIT, wait for the server to close its end, then close ours and wait until the
        socket is gone. Only then may the caller free the connection's slot: the server
        must never count more than `max_connections` of ours, not even for the moment
        between our close and its noticing (SPEC §5)."""
        protocol = self.smtp.protocol
        if self.smtp.is_connected and protocol is not None:
            try:
                await protocol.execute_command(b"QUIT", timeout=QUIT_TIMEOUT)
                # RFC 5321 §4.1.1.10: after 221 the server closes the channel; its own
                # close means it has stopped counting this connection.
                await asyncio.wait_for(asyncio.shield(self.closed), CLOSE_TIMEOUT)
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                pass
        self.smtp.close()
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), CLOSE_TIMEOUT)
        except TimeoutError:
            log.warning("%s: socket not closed after %.0fs", self.description, CLOSE_TIMEOUT)

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
        """Run one transaction; the reply that decides each recipient, by recipient index.

        Raises TransientDeliveryError when the connection fails midway: the caller
        defers whichever recipients have no reply.
        """
        self.transactions += 1
        smtp = self.smtp
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


class Connector:
    """Opens a session to a site: its route, or its MX hosts in order (at most 10 hosts
    and 20 addresses per attempt, SPEC §5)."""

    def __init__(self, config: Config, resolver: Resolver) -> None:
        self._config = config
        self._resolver = resolver

    def reconfigure(self, config: Config, resolver: Resolver) -> None:
        self._config = config
        self._resolver = resolver

    async def open(self, site: Site, shaping: Shaping, rules: tuple[Rule, ...] = ()) -> Connection:
        """Connect to the first host that greets well.

        A greeting or EHLO reply that matches a rule ends the search at once (raised as
        Transient/PermanentDeliveryError): the provider has said how to treat it, and
        trying its other hosts would ignore that.
        """
        delivery = self._config.delivery
        if shaping.route is not None:
            host, port = shaping.route
            names = [host]
        else:
            port = delivery.port
            names = list(site.hosts)
            if not names:  # the lookup failed at routing time: `key` is the domain
                names = [mx.name for mx in await self._resolver.mx_hosts(site.key)]
        last: Reply | None = None
        all_permanent = True
        budget = MAX_ADDRESSES
        for name in names:
            if budget <= 0:
                break
            try:
                addresses = await self._resolver.addresses(name)
            except (DnsTemporaryError, DnsPermanentError) as exc:
                all_permanent &= isinstance(exc, DnsPermanentError)
                last = exc.reply
                continue
            all_permanent = False
            for address in addresses[:budget]:
                budget -= 1
                try:
                    return await self._connect(site, name, address, port, shaping.tls)
                except (TransientDeliveryError, PermanentDeliveryError) as exc:
                    if any(rule.pattern.search(str(exc.reply)) for rule in rules):
                        raise
                    last = exc.reply  # a 4xx/5xx greeting: Postfix tries the next MX too
        if all_permanent and last is not None:
            raise DnsPermanentError(last)
        raise DestinationUnreachable(
            last or Reply.local(451, "4.4.1", f"no MX host of {site.key} could be reached")
        )

    async def _tcp(self, address: str, port: int) -> socket.socket:
        """The TCP connect alone, under `connect_timeout`: the greeting has its own."""
        delivery = self._config.delivery
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            source = delivery.source_address
            if source is not None and (":" in source) == (family == socket.AF_INET6):
                sock.bind((source, 0))
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(
                loop.sock_connect(sock, (address, port)), delivery.connect_timeout
            )
        except BaseException:
            sock.close()
            raise
        return sock

    async def _connect(
        self, site: Site, host: str, address: str, port: int, tls: DeliveryTls
    ) -> Connection:
        delivery = self._config.delivery
        where = f"{host}[{address}]:{port}"
        try:
            sock = await self._tcp(address, port)
        except (OSError, TimeoutError) as exc:
            raise TransientDeliveryError(
                Reply.local(451, "4.4.1", f"connect to {where} failed: {exc or type(exc).__name__}")
            ) from exc
        smtp = _Session(
            sock=sock,
            hostname=host,
            local_hostname=self._config.hostname,
            timeout=delivery.command_timeout,
            start_tls=False,
            validate_certs=False,
        )
        try:
            # RFC 5321 §4.5.3.2.1: five minutes for the 220. Postfix's postscreen (laposte,
            # Orange) keeps a client waiting before it greets.
            await smtp.connect(timeout=delivery.greeting_timeout)
            await _greet(smtp)
            if tls != "disabled" and smtp.supports_extension("starttls"):
                try:
                    await smtp.starttls(
                        server_hostname=host,
                        validate_certs=tls == "required",
                        tls_context=_client_context(tls),
                    )
                    await _greet(smtp)  # RFC 3207 §4.2: the server forgot everything
                except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as exc:
                    await _hang_up(smtp)
                    if tls == "required":
                        raise TransientDeliveryError(
                            Reply.local(451, "4.7.5", f"TLS with {where} failed: {exc}")
                        ) from exc
                    log.warning("STARTTLS with %s failed (%s); retrying without TLS", where, exc)
                    return await self._connect(site, host, address, port, "disabled")
            elif tls == "required":
                await _hang_up(smtp)
                raise TransientDeliveryError(
                    Reply.local(
                        451, "4.7.4", f"TLS is required but {where} does not offer STARTTLS"
                    )
                )
        except aiosmtplib.SMTPResponseException as exc:
            await _hang_up(smtp)
            reply = Reply.parse(exc.code, exc.message)
            error = PermanentDeliveryError if reply.is_permanent else TransientDeliveryError
            raise error(reply) from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            await _hang_up(smtp)
            raise TransientDeliveryError(
                Reply.local(451, "4.4.1", f"connect to {where} failed: {exc or type(exc).__name__}")
            ) from exc
        except BaseException:
            await asyncio.shield(_hang_up(smtp))
            raise
        return Connection(smtp, site, host, address, port, delivery, smtp.gone)


class _Session(aiosmtplib.SMTP):
    """aiosmtplib's client, telling when its socket is gone.

    aiosmtplib has no public hook for it: its protocol calls the client's private
    `_on_connection_lost` from `connection_lost`, which asyncio runs once the transport
    has closed the socket. A connection's slot is freed only after that.
    """

    def __init__(self, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def _on_connection_lost(self, protocol: aiosmtplib.protocol.SMTPProtocol) -> None:
        if not self.gone.done():
            self.gone.set_result(None)
        super()._on_connection_lost(protocol)


async def _hang_up(smtp: _Session) -> None:
    """Close without QUIT (the session failed) and wait until the socket is gone."""
    smtp.close()
    if not smtp.gone.done():
        try:
            await asyncio.wait_for(asyncio.shield(smtp.gone), CLOSE_TIMEOUT)
        except TimeoutError:
            pass


async def _greet(smtp: aiosmtplib.SMTP) -> None:
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError:
        await smtp.helo()


def _client_context(tls: DeliveryTls) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls != "required":
        # Opportunistic TLS (RFC 7435): encrypt when offered, do not judge the certificate.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
