"""Outbound SMTP sessions (aiosmtplib): connect to a destination, run transactions.

aiosmtplib and OSError exceptions stop here: callers see TransientDeliveryError,
PermanentDeliveryError or DestinationUnreachable, each with the Reply to log and report.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import aiosmtplib

from relay.config.model import Config, DeliveryTls, Rule, Shaping
from relay.dns.resolver import Resolver
from relay.errors import (
    DestinationUnreachable,
    DnsPermanentError,
    DnsTemporaryError,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from relay.reply import Reply
from relay.routing.models import Recipient
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


@dataclass(slots=True)
class Connection:
    """One open session to one host; `destination` says which domain/route it serves."""

    smtp: aiosmtplib.SMTP
    destination: str
    host: str
    address: str
    port: int
    transactions: int = 0

    @property
    def description(self) -> str:
        """ "mx1.example.org[192.0.2.1]:25", as Postfix logs relay=."""
        return f"{self.host}[{self.address}]:{self.port}"

    @property
    def usable(self) -> bool:
        return self.smtp.is_connected

    async def close(self) -> None:
        """QUIT politely; a peer that is gone or slow is simply dropped."""
        if self.smtp.is_connected:
            try:
                await self.smtp.quit(timeout=5)
            except (aiosmtplib.SMTPException, OSError):
                pass
        self.smtp.close()

    async def _command(self, stage: str, *args: bytes) -> Reply:
        try:
            response = await self.smtp.execute_command(*args)
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
        data_reply = await self._command("DATA", b"DATA")
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
            response = await protocol.read_response(timeout=self.smtp.timeout)
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
    """Opens a session to a destination: its route, or its MX hosts in order."""

    def __init__(self, config: Config, resolver: Resolver) -> None:
        self._config = config
        self._resolver = resolver

    def reconfigure(self, config: Config, resolver: Resolver) -> None:
        self._config = config
        self._resolver = resolver

    async def open(self, domain: str, shaping: Shaping, rules: tuple[Rule, ...] = ()) -> Connection:
        """Connect to the first host that greets well.

        A greeting or EHLO reply that matches a rule ends the search at once (raised as
        Transient/PermanentDeliveryError): the provider has said how to treat it, and
        trying its other hosts would ignore that.
        """
        delivery = self._config.delivery
        if shaping.route is not None:
            host, port = shaping.route
            names = [host]
            destination = f"[{host}]:{port}"
        else:
            port = delivery.port
            names = [mx.name for mx in await self._resolver.mx_hosts(domain)]
            destination = domain
        last: Reply | None = None
        all_permanent = True
        for name in names:
            try:
                addresses = await self._resolver.addresses(name)
            except (DnsTemporaryError, DnsPermanentError) as exc:
                all_permanent &= isinstance(exc, DnsPermanentError)
                last = exc.reply
                continue
            all_permanent = False
            for address in addresses:
                try:
                    return await self._connect(destination, name, address, port, shaping.tls)
                except (TransientDeliveryError, PermanentDeliveryError) as exc:
                    if any(rule.pattern.search(str(exc.reply)) for rule in rules):
                        raise
                    last = exc.reply  # a 4xx/5xx greeting: Postfix tries the next MX too
        if all_permanent and last is not None:
            raise DnsPermanentError(last)
        raise DestinationUnreachable(
            last or Reply.local(451, "4.4.1", f"no MX host of {domain} could be reached")
        )

    async def _connect(
        self, destination: str, host: str, address: str, port: int, tls: DeliveryTls
    ) -> Connection:
        delivery = self._config.delivery
        smtp = aiosmtplib.SMTP(
            hostname=address,
            port=port,
            local_hostname=self._config.hostname,
            source_address=(delivery.source_address, 0) if delivery.source_address else None,
            timeout=delivery.command_timeout,
            start_tls=False,
            validate_certs=False,
        )
        where = f"{host}[{address}]:{port}"
        try:
            await smtp.connect(timeout=delivery.connect_timeout)
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
                    smtp.close()
                    if tls == "required":
                        raise TransientDeliveryError(
                            Reply.local(451, "4.7.5", f"TLS with {where} failed: {exc}")
                        ) from exc
                    log.warning("STARTTLS with %s failed (%s); retrying without TLS", where, exc)
                    return await self._connect(destination, host, address, port, "disabled")
            elif tls == "required":
                smtp.close()
                raise TransientDeliveryError(
                    Reply.local(
                        451, "4.7.4", f"TLS is required but {where} does not offer STARTTLS"
                    )
                )
        except aiosmtplib.SMTPResponseException as exc:
            smtp.close()
            reply = Reply.parse(exc.code, exc.message)
            error = PermanentDeliveryError if reply.is_permanent else TransientDeliveryError
            raise error(reply) from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            smtp.close()
            raise TransientDeliveryError(
                Reply.local(451, "4.4.1", f"connect to {where} failed: {exc or type(exc).__name__}")
            ) from exc
        return Connection(smtp, destination, host, address, port)


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
