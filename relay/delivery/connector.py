"""Opening outbound sessions: a site's route or MX hosts in order, the TCP connect and
the greeting under their own timeouts, STARTTLS by the lane's TLS policy.

aiosmtplib and OSError exceptions stop here: callers see TransientDeliveryError,
PermanentDeliveryError, DestinationUnreachable or a DnsError, each with its Reply.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

import aiosmtplib

from relay.config.model import Config, DeliveryTls, Rule, Shaping
from relay.delivery.client import CLOSE_TIMEOUT, Connection
from relay.dns.resolver import MAX_ADDRESSES, Resolver
from relay.errors import (
    DestinationUnreachable,
    DnsPermanentError,
    DnsTemporaryError,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from relay.reply import Reply
from relay.routing.router import Site

log = logging.getLogger("relay.delivery")


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
