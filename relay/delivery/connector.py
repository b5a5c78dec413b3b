"""Opening outbound sessions: a site's route or MX hosts in order, the TCP connect and
the greeting under their own timeouts, STARTTLS under the TLS policy (tls_policy.py).

A session is opened either for a site (the lane's usual way: the provider's `tls`, or
DANE where a host has it) or for one recipient domain (when a batch's own requirement,
MTA-STS or DANE, is not met by the session at hand: then only hosts that can meet it are
tried, and TLS is never given up for plaintext).

aiosmtplib and OSError exceptions stop here: callers see TransientDeliveryError,
PermanentDeliveryError, DestinationUnreachable or a DnsError, each with its Reply.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import aiosmtplib

from relay.clock import SYSTEM_CLOCK, Clock
from relay.config.model import Config, DeliveryTls, Egress, Rule, Secret, Shaping
from relay.delivery.client import Connection, shut
from relay.delivery.tls_policy import (
    STRENGTH,
    Decision,
    PolicyName,
    Requirement,
    TlsFacts,
    TlsPolicy,
    Verified,
    judge,
    provider_requirement,
    stronger,
)
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

# Reports each TLS policy outcome of a session: (policy, "tls" | "plaintext" | "failed").
Tally = Callable[[PolicyName, str], None]

# How STARTTLS is tried: verifying the chain and the host name, the chain only, without
# verification, or not at all.
Mode = Literal["name", "chain", "no", "plain"]


@dataclass(frozen=True, slots=True)
class _Plan:
    """How to secure a session so that it meets at least one of the requirements."""

    mode: Mode
    mandatory: bool  # TLS or nothing
    fallback: bool  # a failed verification may be retried without it
    note: str = ""  # why plaintext, when `mode` is "plain"


class _Fallback(Exception):
    """The handshake failed in a way that a new session in `mode` may get past."""

    def __init__(self, mode: Mode, note: str) -> None:
        self.mode = mode
        self.note = note
        super().__init__(note)


def tls_refusal(text: str) -> Reply:
    """RFC 3463 §3.8: X.7.5, cryptographic failure."""
    return Reply.local(451, "4.7.5", text)


class Connector:
    """Opens a session to a site: its route, or its MX hosts in order (at most 10 hosts
    and 20 addresses per attempt, SPEC §5)."""

    def __init__(self, config: Config, resolver: Resolver, clock: Clock = SYSTEM_CLOCK) -> None:
        self._config = config
        self._resolver = resolver
        self.policy = TlsPolicy(config, resolver, clock)

    def reconfigure(self, config: Config, resolver: Resolver) -> None:
        self._config = config
        self._resolver = resolver
        self.policy.reconfigure(config, resolver)

    async def open(
        self,
        site: Site,
        shaping: Shaping,
        rules: tuple[Rule, ...] = (),
        domain: str | None = None,
        tally: Tally | None = None,
    ) -> Connection:
        """Connect to the first host that greets well and meets the TLS policy.

        With `domain`, the session is for that domain's mail: its whole requirement
        (DANE, MTA-STS, the provider's `tls`) must be met, and hosts that cannot meet it
        are not even connected to.

        A greeting or EHLO reply that matches a rule ends the search at once (raised as
        Transient/PermanentDeliveryError): the provider has said how to treat it, and
        trying its other hosts would ignore that.
        """
        delivery = self._config.delivery
        route = shaping.route is not None
        if shaping.route is not None:
            host, port = shaping.route
            names = [host]
        else:
            port = delivery.port
            names = list(site.hosts)
            if not names:  # the lookup failed at routing time: `key` is the domain
                names = [mx.name for mx in await self._resolver.mx_hosts(site.key)]
        count: Tally = tally or (lambda policy, result: None)
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
            accept = await self._requirements(shaping.tls, name, port, domain, route)
            refusal = _refusal(accept, name)
            if refusal is not None:
                # RFC 8461 §5: an MX that the policy does not list gets no mail at all.
                log.warning("%s: %s", domain or site.key, refusal)
                count(accept[0].policy, "failed")
                last = tls_refusal(refusal)
                continue
            for address in addresses[:budget]:
                budget -= 1
                try:
                    return await self._connect(site, name, address, port, accept, count)
                except (TransientDeliveryError, PermanentDeliveryError) as exc:
                    if any(rule.pattern.search(str(exc.reply)) for rule in rules):
                        raise
                    last = exc.reply  # a 4xx/5xx greeting: Postfix tries the next MX too
        if all_permanent and last is not None:
            raise DnsPermanentError(last)
        raise DestinationUnreachable(
            last or Reply.local(451, "4.4.1", f"no MX host of {site.key} could be reached")
        )

    async def _requirements(
        self, tls: DeliveryTls, host: str, port: int, domain: str | None, route: bool
    ) -> list[Requirement]:
        """What a session to `host` must meet, one of them at least.

        For a domain: its own requirement. For a site, whose domains are not known yet:
        the provider's `tls`, or DANE when the host has it (RFC 7672 §2.2 asks more, that
        the MX answer naming it was validated; that is a domain's, and each batch is
        judged against its domain's requirement before it is sent).
        """
        if domain is not None:
            return [await self.policy.requirement(tls, host, port, domain, route)]
        accept = [provider_requirement(tls)]
        found = await self.policy.host_dane(host, port)
        if found is not None:
            accept.append(found)
        return accept

    def _plan(self, accept: Sequence[Requirement], key: str) -> _Plan:
        usable = [r for r in accept if r.unmet is None]
        if not any(r.starttls for r in usable):
            return _Plan("plain", False, False, "STARTTLS is disabled (tls: disabled)")
        mandatory = all(r.tls for r in usable)
        pkix = [r for r in usable if r.tlsa is None]
        if pkix and len(pkix) == len(usable):
            if all(r.name for r in pkix):
                return _Plan("name", True, False)
            if all(r.chain or r.name for r in pkix):
                return _Plan("chain", True, False)
        left = self.policy.broken(key)
        if left is not None and not mandatory:
            note = f"TLS with {key} failed earlier; plaintext for another {left:.0f}s"
            return _Plan("plain", False, False, note)
        if len(pkix) < len(usable) or self.policy.unverified_before(key) is not None:
            # DANE judges the certificate itself, and outranks the others: a verifying
            # handshake could only fail it.
            return _Plan("no", mandatory, False)
        # Verify when the certificate allows it: MTA-STS domains may then use the session
        # too. A failed verification costs one more session, once per tls_broken_ttl.
        return _Plan("name", mandatory, True)

    def _egress(self, site: Site) -> Egress:
        """The site's sending source under the current config (a reload may have removed
        it: then the default one)."""
        egress = self._config.egress
        return egress.get(site.source) or egress[self._config.default_egress]

    async def _tcp(self, address: str, port: int, egress: Egress) -> socket.socket:
        """The TCP connect alone, under `connect_timeout`: the greeting has its own. It
        leaves from the source's address of the destination's family; a source that
        names addresses but none of that family cannot reach it."""
        delivery = self._config.delivery
        v6 = ":" in address
        source = egress.address_for(v6)
        if source is None and egress.addresses:
            raise OSError(f"egress source {egress.name} has no IPv{6 if v6 else 4} address")
        family = socket.AF_INET6 if v6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if source is not None:
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
        self,
        site: Site,
        host: str,
        address: str,
        port: int,
        accept: Sequence[Requirement],
        count: Tally,
    ) -> Connection:
        where = f"{host}[{address}]:{port}"
        plan = self._plan(accept, where)
        # At most three sessions: verifying, then unverified, then plaintext. A plan made
        # after a fallback allows no further one but plaintext, which never falls back.
        while True:
            smtp = await self._session(host, address, port, where, self._egress(site))
            try:
                facts = await self._secure(smtp, host, where, plan)
            except _Fallback as fallback:
                plan = _Plan(fallback.mode, plan.mandatory, False, fallback.note)
                continue  # a new session: the failed handshake left this one unusable
            except TransientDeliveryError:
                count(accept[0].policy, "failed")
                raise
            except BaseException:
                await asyncio.shield(_hang_up(smtp))
                raise
            break
        judged = [(req, judge(req, facts, host)) for req in accept]
        passed = [req for req, judgement in judged if judgement.problem is None]
        if not passed:
            problem = judged[0][1].problem or ""
            await _hang_up(smtp)  # nothing was sent, nor will be (RFC 7672 §2.2, RFC 8461 §5)
            count(accept[0].policy, "failed")
            log.warning("%s: %s", where, problem)
            raise TransientDeliveryError(tls_refusal(problem))
        policy = max((req.policy for req in passed), key=STRENGTH.__getitem__)
        return Connection(
            smtp,
            site,
            host,
            address,
            port,
            self._config.delivery,
            smtp.gone,
            tls=facts,
            policy=policy,
            local=_local_address(smtp),
            transport=smtp.transport,
        )

    async def _session(
        self, host: str, address: str, port: int, where: str, egress: Egress
    ) -> _Session:
        """TCP, the greeting and EHLO (in the source's name): a session ready for
        STARTTLS or mail."""
        delivery = self._config.delivery
        try:
            sock = await self._tcp(address, port, egress)
        except (OSError, TimeoutError) as exc:
            raise TransientDeliveryError(
                Reply.local(451, "4.4.1", f"connect to {where} failed: {exc or type(exc).__name__}")
            ) from exc
        smtp = _Session(
            sock=sock,
            hostname=host,
            local_hostname=egress.ehlo or self._config.hostname,
            timeout=delivery.command_timeout,
            start_tls=False,
            validate_certs=False,
        )
        try:
            # RFC 5321 §4.5.3.2.1: five minutes for the 220. Postfix's postscreen (laposte,
            # Orange) keeps a client waiting before it greets.
            await smtp.connect(timeout=delivery.greeting_timeout)
            await _greet(smtp)
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
        return smtp

    async def _secure(self, smtp: _Session, host: str, where: str, plan: _Plan) -> TlsFacts:
        """STARTTLS as planned; what it established. Raises _Fallback after hanging up
        when a new session may do better, TransientDeliveryError (4.7.5) when TLS was
        mandatory and failed."""
        if plan.mode == "plain":
            return TlsFacts(note=plan.note)
        if not smtp.supports_extension("starttls"):
            return TlsFacts(note=f"{where} does not offer STARTTLS")
        context = {
            "name": self.policy.verifying(True),
            "chain": self.policy.verifying(False),
        }.get(plan.mode, self.policy.unverified)
        try:
            await smtp.starttls(
                server_hostname=host, validate_certs=plan.mode != "no", tls_context=context
            )
            await _greet(smtp)  # RFC 3207 §4.2: the server forgot everything
        except ssl.SSLCertVerificationError as exc:
            await _hang_up(smtp)
            why = exc.verify_message or str(exc)
            if plan.fallback:
                self.policy.remember_unverified(where, why)
                raise _Fallback("no", why) from exc
            raise TransientDeliveryError(
                tls_refusal(f"the certificate of {where} is not trusted for that name: {why}")
            ) from exc
        except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as exc:
            await _hang_up(smtp)
            text = f"TLS with {where} failed: {exc or type(exc).__name__}"
            if plan.mandatory:
                raise TransientDeliveryError(tls_refusal(text)) from exc
            # RFC 7435 §3: opportunistic TLS that cannot be had is no reason not to deliver.
            log.warning("%s; retrying without TLS", text)
            self.policy.remember_broken(where)
            raise _Fallback("plain", text) from exc
        ssl_object = smtp.get_transport_info("ssl_object")
        note = ""
        if plan.mode == "no":
            note = self.policy.unverified_before(where) or "the certificate was not verified"
        elif plan.mode == "chain":
            note = "the certificate was verified for its chain only (tls: required)"
        verified: Verified = "name" if plan.mode == "name" else "no"
        if plan.mode == "chain":
            verified = "chain"
        return TlsFacts(
            version=ssl_object.version() if ssl_object is not None else None,
            verified=verified,
            chain=_peer_chain(ssl_object),
            note=note,
        )

    async def peer(self, host: str, port: int, login: PeerLogin | None = None) -> Connection:
        """A session to another relay node, for a hand-off (`relay queue transfer`,
        SPEC §9). The peer is named by the admin, not found by MX: no TLS policy applies.
        STARTTLS whenever offered, its certificate unchecked (as `opportunistic`
        delivery: nodes of one cluster commonly use self-signed ones); AUTH when a
        login is given, and then only over TLS, as the peer's own listener asks (its
        `538 5.7.11`). The session leaves from the default egress source."""
        where = f"{host}:{port}"
        try:
            addresses = await self._resolver.addresses(host)
        except (DnsTemporaryError, DnsPermanentError) as exc:
            raise TransientDeliveryError(exc.reply) from exc
        egress = self._config.egress[self._config.default_egress]
        last: TransientDeliveryError | None = None
        for address in addresses[:MAX_ADDRESSES]:
            try:
                smtp = await self._session(host, address, port, where, egress)
            except PermanentDeliveryError as exc:  # a 5xx greeting: try another address
                last = TransientDeliveryError(exc.reply)
                continue
            except TransientDeliveryError as exc:
                last = exc
                continue
            try:
                return await self._peer_session(smtp, host, address, port, login)
            except BaseException:
                await asyncio.shield(_hang_up(smtp))
                raise
        raise last or TransientDeliveryError(
            Reply.local(451, "4.4.1", f"{host} has no address to connect to")
        )

    async def _peer_session(
        self, smtp: _Session, host: str, address: str, port: int, login: PeerLogin | None
    ) -> Connection:
        where = f"{host}[{address}]:{port}"
        facts = TlsFacts(note=f"{where} does not offer STARTTLS")
        try:
            if smtp.supports_extension("starttls"):
                await smtp.starttls(
                    server_hostname=host, validate_certs=False, tls_context=self.policy.unverified
                )
                await _greet(smtp)  # RFC 3207 §4.2: the server forgot everything
                ssl_object = smtp.get_transport_info("ssl_object")
                version = ssl_object.version() if ssl_object is not None else None
                facts = TlsFacts(version=version, note="the certificate was not verified")
            if login is not None:
                if facts.version is None:
                    raise PermanentDeliveryError(
                        Reply.local(
                            530,
                            "5.7.11",
                            f"{where} does not offer STARTTLS: the password is not sent in clear",
                        )
                    )
                await smtp.login(login.user, login.password)
        except aiosmtplib.SMTPResponseException as exc:
            reply = Reply.parse(exc.code, exc.message)
            error = PermanentDeliveryError if reply.is_permanent else TransientDeliveryError
            raise error(reply) from exc
        except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as exc:
            raise TransientDeliveryError(
                Reply.local(451, "4.4.1", f"session with {where} failed: {exc}")
            ) from exc
        return Connection(
            smtp,
            Site(f"{host}:{port}", (host,)),
            host,
            address,
            port,
            self._config.delivery,
            smtp.gone,
            tls=facts,
            local=_local_address(smtp),
            transport=smtp.transport,
        )

    async def check(self, domain: str, connection: Connection, shaping: Shaping) -> Decision:
        """May `connection` carry mail for `domain`? Judged once per session and domain:
        the facts of a session do not change, and a policy learnt meanwhile waits for
        the next session."""
        decision = connection.decisions.get(domain)
        if decision is None:
            route = shaping.route is not None
            req = await self.policy.requirement(
                shaping.tls, connection.host, connection.port, domain, route
            )
            judgement = judge(req, connection.tls, connection.host)
            decision = Decision(req.policy, judgement.problem, judgement.warning)
            connection.decisions[domain] = decision
            if decision.problem is None:
                connection.policy = stronger(connection.policy, decision.policy)
            if decision.warning is not None:
                # RFC 8461 §5: in testing mode, deliver, and report what enforce would do.
                connection.tls_failed = True
                log.warning(
                    "%s: %s; delivered anyway (%s's policy is in testing mode)",
                    connection.description,
                    decision.warning,
                    domain,
                )
        return decision


@dataclass(frozen=True, slots=True)
class PeerLogin:
    """AUTH for a peer relay's submission port (`relay queue transfer --user`)."""

    user: str
    password: Secret  # never in a repr or a log line


def _refusal(accept: Sequence[Requirement], host: str) -> str | None:
    """Why no session to `host` can meet any of `accept`, known before connecting."""
    reasons = []
    for req in accept:
        if req.unmet is not None:
            reasons.append(req.unmet)
        elif req.sts is not None and req.sts.mode == "enforce" and not req.sts.matches(host):
            patterns = ", ".join(req.sts.mx)
            reasons.append(
                f"MTA-STS: {host} is not an MX of {req.sts.domain}'s policy ({patterns})"
            )
        else:
            return None
    return reasons[0] if reasons else None


def _peer_chain(ssl_object: Any) -> tuple[bytes, ...]:
    """The certificates the server sent, leaf first, as DER (for DANE).

    Python 3.13 has `SSLObject.get_unverified_chain()`; 3.10 to 3.12 have it only on the
    private `_ssl._SSLSocket` behind `_sslobj` (returning `_ssl.Certificate` objects).
    Without either, the leaf alone: DANE-EE still works, DANE-TA needs the chain.
    """
    if ssl_object is None:
        return ()
    public = getattr(ssl_object, "get_unverified_chain", None)
    if public is not None:
        return tuple(bytes(c) for c in public() or ())
    private = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    if private is not None:
        return tuple(c.public_bytes(ssl._ssl.ENCODING_DER) for c in private() or ())  # type: ignore[attr-defined]
    leaf = ssl_object.getpeercert(binary_form=True)
    return (leaf,) if leaf else ()


def _local_address(smtp: aiosmtplib.SMTP) -> str:
    try:
        sockname = smtp.get_transport_info("sockname")
    except aiosmtplib.SMTPServerDisconnected:
        return ""
    return str(sockname[0]) if sockname else ""


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
    transport = smtp.transport
    smtp.close()
    await shut(
        transport if isinstance(transport, asyncio.Transport) else None, smtp.gone, "session"
    )


async def _greet(smtp: aiosmtplib.SMTP) -> None:
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError:
        await smtp.helo()
