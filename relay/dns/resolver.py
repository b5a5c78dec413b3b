"""MX, address, TLSA and TXT lookups with dnspython's async resolver, cached per TTL.

dnspython errors stop here and leave as DnsTemporaryError / DnsPermanentError, each
carrying the Reply a log line or DSN should show (RFC 5321 §5.1, RFC 7505).

DNSSEC: relay does not validate signatures itself. With `dns.dnssec: true` it asks the
configured resolver, which must be a local validating one, to say whether an answer was
validated (the AD bit, RFC 6840 §5.7), and trusts that bit; without it, no answer counts
as validated and DANE never applies (RFC 7672 §2.1).
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.nameserver
import dns.rdatatype
import dns.resolver

from relay.config.model import Dns
from relay.errors import DnsPermanentError, DnsTemporaryError
from relay.reply import Reply


@dataclass(frozen=True, slots=True)
class MxHost:
    """One host to try, in order; `name` for logs and TLS, `preference` for sorting."""

    name: str
    preference: int


@dataclass(frozen=True, slots=True)
class Tlsa:
    """One TLSA record (RFC 6698 §2.1): how to match the server's certificate."""

    usage: int  # 2: DANE-TA, 3: DANE-EE (the only ones usable for SMTP, RFC 7672 §3.1)
    selector: int  # 0: the whole certificate, 1: its SubjectPublicKeyInfo
    mtype: int  # 0: exact, 1: SHA-256, 2: SHA-512
    data: bytes


@dataclass(frozen=True, slots=True)
class _Lookup:
    answer: dns.resolver.Answer | None  # None: the name exists without such records
    secure: bool  # the resolver validated it (AD), and dns.dnssec says to trust that


# Queries in flight at once. A fan-out to a thousand new domains would otherwise send
# thousands of UDP queries in one burst, more than a local resolver's socket buffer
# holds; the overflow is dropped and every one of those lookups has to time out.
MAX_QUERIES = 64
TRIES = 3

# What one delivery attempt may try (SPEC §5): a domain publishing 200 MX records must
# not turn one message into 400 lookups and 200 connection attempts.
MAX_MX_HOSTS = 10
MAX_ADDRESSES = 20


class Resolver:
    def __init__(self, config: Dns) -> None:
        self.config = config
        self._resolver = dns.asyncresolver.Resolver(configure=not config.nameservers)
        if config.nameservers:
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(host, port) for host, port in config.nameservers
            ]
        # `dns.timeout` bounds a whole lookup; within it a lost datagram is asked again
        # (dnspython retries until the lifetime runs out), as libc's resolver does.
        self._resolver.lifetime = config.timeout
        self._resolver.timeout = config.timeout / TRIES
        self._resolver.cache = dns.resolver.Cache()
        if config.dnssec:
            # RFC 6840 §5.7: a query with AD set asks a validating resolver to say, with
            # AD in its answer, that the data was validated. EDNS0 with room for answers
            # that carry signatures (RFC 6891, the 1232-octet DNS flag day size).
            self._resolver.flags = dns.flags.RD | dns.flags.AD
            self._resolver.use_edns(0, dns.flags.DO, 1232)
        self._in_flight = asyncio.Semaphore(MAX_QUERIES)

    def _secure(self, response: dns.message.Message | None) -> bool:
        return self.config.dnssec and response is not None and bool(response.flags & dns.flags.AD)

    async def _query(
        self, name: str, rdtype: dns.rdatatype.RdataType
    ) -> dns.resolver.Answer | None:
        """The answer, None when the name exists without such records; NXDOMAIN raises."""
        return (await self._lookup(name, rdtype)).answer

    async def _lookup(self, name: str, rdtype: dns.rdatatype.RdataType) -> _Lookup:
        """`_query`, and whether the answer (or the denial of one) was validated."""
        try:
            async with self._in_flight:
                answer = await self._resolver.resolve(name, rdtype, search=False)
            return _Lookup(answer, self._secure(answer.response))
        except dns.resolver.NXDOMAIN as exc:
            raise DnsPermanentError(
                Reply.local(550, "5.1.2", f"Host or domain name not found: {name} does not exist")
            ) from exc
        except dns.resolver.NoAnswer as exc:
            # NODATA: a validated one proves that the records do not exist.
            response: dns.message.Message | None = exc.kwargs.get("response")
            return _Lookup(None, self._secure(response))
        except (
            dns.resolver.NoNameservers,
            dns.exception.Timeout,
            dns.resolver.LifetimeTimeout,
        ) as exc:
            raise DnsTemporaryError(
                Reply.local(
                    451,
                    "4.4.3",
                    f"Name service error for {name} type={rdtype.name}: {type(exc).__name__}",
                )
            ) from exc
        except dns.exception.DNSException as exc:
            raise DnsTemporaryError(
                Reply.local(451, "4.4.3", f"Name service error for {name}: {exc}")
            ) from exc

    async def mx_hosts(self, domain: str) -> list[MxHost]:
        """Hosts to try in order: by preference, equal preferences shuffled (RFC 5321 §5.1).

        No MX record: the domain itself (implicit MX). Null MX: permanent failure.
        """
        literal = _address_literal(domain)
        if literal:
            return [MxHost(literal, 0)]
        answer = await self._query(domain, dns.rdatatype.MX)
        if answer is None:
            return [MxHost(domain, 0)]
        records = [(r.preference, r.exchange.to_text(omit_final_dot=True)) for r in answer]
        if any(name in ("", ".") for _, name in records):
            raise DnsPermanentError(
                Reply.local(
                    556, "5.1.10", f"Recipient address rejected: {domain} accepts no mail (null MX)"
                )
            )
        random.shuffle(records)
        records.sort(key=lambda item: item[0])
        return [MxHost(name.lower(), pref) for pref, name in records[:MAX_MX_HOSTS]]

    async def routable(self, domain: str) -> bool:
        """Can mail reach this domain: an MX that is not null, or an address?"""
        try:
            hosts = await self.mx_hosts(domain)
        except DnsPermanentError:
            return False
        if hosts and hosts[0].name != domain:
            return True
        try:
            return bool(await self.addresses(domain))
        except DnsPermanentError:
            return False

    async def mx_secure(self, domain: str) -> bool:
        """Was the domain's MX RRset, or its absence (an implicit MX), validated?

        RFC 7672 §2.2.1: DANE applies to the MX hosts only when the MX answer that named
        them is secure; an attacker who can forge the MX can name hosts of his own.
        """
        if _address_literal(domain):
            return False
        try:
            return (await self._lookup(domain, dns.rdatatype.MX)).secure
        except DnsPermanentError:
            return False

    async def addresses_secure(self, host: str) -> bool:
        """Were the host's AAAA and A answers (or their absence) all validated?
        RFC 7672 §2.2.2: the TLSA records of a host whose address is insecure are not
        looked up."""
        for rdtype in (dns.rdatatype.AAAA, dns.rdatatype.A):
            try:
                if not (await self._lookup(host, rdtype)).secure:
                    return False
            except DnsPermanentError:
                return False
        return True

    async def tlsa(self, host: str, port: int) -> tuple[Tlsa, ...] | None:
        """The validated TLSA RRset of a TCP service (RFC 6698 §3: `_port._tcp.host`).

        None when there is none or it was not validated: DANE does not apply. A lookup
        that fails (SERVFAIL, timeout) raises DnsTemporaryError: RFC 7672 §2.2 makes
        that host unusable for now, since the failure may be an attacker hiding the
        records.
        """
        try:
            lookup = await self._lookup(f"_{port}._tcp.{host}", dns.rdatatype.TLSA)
        except DnsPermanentError:
            return None
        if lookup.answer is None or not lookup.secure:
            return None
        return tuple(Tlsa(r.usage, r.selector, r.mtype, r.cert) for r in lookup.answer)

    async def txt(self, name: str) -> list[str]:
        """The TXT records of a name, each one's strings joined (RFC 8461 §3.1); none
        when the name or the records do not exist. Failures raise DnsTemporaryError."""
        try:
            lookup = await self._lookup(name, dns.rdatatype.TXT)
        except DnsPermanentError:
            return []
        if lookup.answer is None:
            return []
        return [b"".join(r.strings).decode("utf-8", "replace") for r in lookup.answer]

    async def addresses(self, host: str) -> list[str]:
        """IPv6 and IPv4 addresses of a host (AAAA first, as Postfix with both enabled)."""
        try:
            ipaddress.ip_address(host)
            return [host]
        except ValueError:
            pass
        found: list[str] = []
        temporary: DnsTemporaryError | None = None
        for rdtype in (dns.rdatatype.AAAA, dns.rdatatype.A):
            try:
                answer = await self._query(host, rdtype)
            except DnsTemporaryError as exc:
                temporary = exc
                continue
            if answer is not None:
                found.extend(record.address for record in answer)
        if not found:
            if temporary is not None:
                raise temporary
            raise DnsPermanentError(
                Reply.local(550, "5.4.4", f"Host or domain name not found: no address for {host}")
            )
        return found


def _address_literal(domain: str) -> str | None:
    """`[192.0.2.1]` or `[IPv6:2001:db8::1]` (RFC 5321 §4.1.3) → the address."""
    if domain.startswith("[") and domain.endswith("]"):
        inner = domain[1:-1]
        if inner.lower().startswith("ipv6:"):
            inner = inner[5:]
        try:
            return str(ipaddress.ip_address(inner))
        except ValueError:
            return None
    return None
