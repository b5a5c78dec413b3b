"""Which TLS an outbound session needs, and whether the one it got will do (SPEC §11).

Strongest first: DANE (a DNSSEC-validated TLSA RRset, RFC 7672) > the recipient domain's
MTA-STS policy (RFC 8461) > the provider's `tls`:

    disabled       no STARTTLS
    opportunistic  STARTTLS when offered, any certificate (RFC 7435); after a failed
                   handshake that MX gets plaintext for `delivery.tls_broken_ttl`
    required       TLS, and a certificate chain to a trusted CA (system CAs + ca_file)
    verify         TLS, that chain, and a certificate valid for the MX host name
    dane           TLS authenticated by DANE; a destination without it is deferred

A requirement is decided per recipient domain and MX host, since DANE depends on the
domain's MX answer being validated and MTA-STS is the domain's policy. A connection,
though, belongs to a host and carries mail for any domain of its site (docs/queue.md):
it records what its handshake established (`TlsFacts`), and before each transaction the
batch's own requirement is judged against those facts. Nothing is sent on a connection
that does not meet it: under a requirement for TLS a failure means `4.7.5`, never
plaintext.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Literal

from relay.clock import SYSTEM_CLOCK, Clock
from relay.config.model import Config, DeliveryTls
from relay.delivery import dane
from relay.delivery.mtasts import MtaSts, StsPolicy
from relay.dns.resolver import Resolver, Tlsa
from relay.errors import DnsTemporaryError

log = logging.getLogger("relay.delivery")

PolicyName = Literal["none", "opportunistic", "required", "verify", "mta-sts", "dane"]
STRENGTH: dict[PolicyName, int] = {
    "none": 0,
    "opportunistic": 1,
    "required": 2,
    "verify": 3,
    "mta-sts": 4,
    "dane": 5,
}
Verified = Literal["name", "chain", "no"]

# Hosts whose TLS failed, remembered at once (the least recently failed are forgotten).
MAX_REMEMBERED = 10_000


@dataclass(frozen=True, slots=True)
class TlsFacts:
    """What a session's handshake established, for judging each batch it may carry."""

    version: str | None = None  # "TLSv1.3"; None: the session is in plaintext
    verified: Verified = "no"  # what OpenSSL verified: chain and host name, chain, nothing
    chain: tuple[bytes, ...] = ()  # the server's certificates as sent, leaf first (DER)
    note: str = ""  # why plaintext, or why the certificate was not verified


@dataclass(frozen=True, slots=True)
class Requirement:
    """What a session must have for one domain's mail to a given host."""

    policy: PolicyName
    tls: bool = False  # never plaintext
    chain: bool = False  # a certificate chain to a trusted CA
    name: bool = False  # ... valid for the MX host name
    tlsa: tuple[Tlsa, ...] | None = None  # DANE: authenticate with these; (): TLS only
    sts: StsPolicy | None = None  # the domain's MTA-STS policy (enforce or testing)
    starttls: bool = True  # False under `disabled`: STARTTLS is not even tried
    unmet: str | None = None  # why no session can meet it (e.g. `dane` without TLSA)


@dataclass(frozen=True, slots=True)
class Judgement:
    problem: str | None = None  # it may not carry the mail: why
    warning: str | None = None  # MTA-STS testing: it may, but the policy would refuse


@dataclass(frozen=True, slots=True)
class Decision:
    """A batch's requirement judged against a session: the policy that applied, and
    whether the session may carry the batch."""

    policy: PolicyName
    problem: str | None = None
    warning: str | None = None


def provider_requirement(tls: DeliveryTls) -> Requirement:
    if tls == "disabled":
        return Requirement("none", starttls=False)
    if tls == "required":
        return Requirement("required", tls=True, chain=True)
    if tls == "verify":
        return Requirement("verify", tls=True, chain=True, name=True)
    if tls == "dane":
        return Requirement("dane", tls=True)  # DANE itself is judged per domain
    return Requirement("opportunistic")


def judge(req: Requirement, facts: TlsFacts, host: str) -> Judgement:
    """May a session with these facts carry mail under `req`? Pure: no I/O."""
    if req.unmet is not None:
        return Judgement(req.unmet)
    if req.tlsa is not None:
        # DANE: the strongest; MTA-STS is not consulted where it applies (RFC 8461 §2).
        if facts.version is None:
            return Judgement(f"DANE: {host} publishes TLSA records, but {facts.note}")
        if req.tlsa:
            why = dane.authenticate(req.tlsa, facts.chain, host)
            if why is not None:
                return Judgement(f"DANE: {why}")
        return Judgement()
    problem = _base_problem(req, facts, host)
    if problem is not None:
        return Judgement(problem)
    if req.sts is not None:
        why = _sts_problem(req.sts, facts, host)
        if why is not None:
            if req.sts.mode == "enforce":
                return Judgement(why)
            return Judgement(warning=why)
    return Judgement()


def _base_problem(req: Requirement, facts: TlsFacts, host: str) -> str | None:
    what = "MTA-STS" if req.policy == "mta-sts" else f"tls: {req.policy}"
    if req.tls and facts.version is None:
        return f"{what} requires TLS, but {facts.note}"
    if req.name and facts.verified != "name":
        return f"{what}: the certificate of {host} is not valid for that name: {facts.note}"
    if req.chain and facts.verified == "no":
        return f"{what}: the certificate of {host} is not trusted: {facts.note}"
    return None


def _sts_problem(policy: StsPolicy, facts: TlsFacts, host: str) -> str | None:
    """RFC 8461 §4: the MX must match the policy and offer TLS with a certificate valid
    for its name, chained to a trusted CA."""
    if not policy.matches(host):
        patterns = ", ".join(policy.mx)
        return f"MTA-STS: {host} is not an MX of {policy.domain}'s policy ({patterns})"
    if facts.version is None:
        return f"MTA-STS: {policy.domain}'s policy requires TLS, but {facts.note}"
    if facts.verified != "name":
        return f"MTA-STS: the certificate of {host} is not valid for that name: {facts.note}"
    return None


def stronger(a: PolicyName, b: PolicyName) -> PolicyName:
    return a if STRENGTH[a] >= STRENGTH[b] else b


class TlsPolicy:
    """Requirements (DNS, MTA-STS), the client's TLS contexts, and the hosts whose TLS
    failed. One per daemon, kept across reloads (the Connector owns it)."""

    def __init__(self, config: Config, resolver: Resolver, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self._broken: OrderedDict[str, float] = OrderedDict()  # handshake failed: until
        self._unverified: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self.reconfigure(config, resolver)
        self.sts = MtaSts(config.spool_path, resolver, self.verifying(True), clock)

    def reconfigure(self, config: Config, resolver: Resolver) -> None:
        self._config = config
        self._resolver = resolver
        self._contexts = {
            "name": _verifying_context(config.delivery.ca_file, check_hostname=True),
            "chain": _verifying_context(config.delivery.ca_file, check_hostname=False),
            "no": _unverified_context(),
        }
        if hasattr(self, "sts"):
            self.sts.resolver = resolver
            self.sts.context = self._contexts["name"]

    def verifying(self, name: bool) -> ssl.SSLContext:
        return self._contexts["name" if name else "chain"]

    @property
    def unverified(self) -> ssl.SSLContext:
        return self._contexts["no"]

    @property
    def _dane(self) -> bool:
        return self._config.delivery.dane and self._config.dns.dnssec

    async def requirement(
        self, tls: DeliveryTls, host: str, port: int, domain: str | None, route: bool
    ) -> Requirement:
        """What mail for `domain` (None: not known yet) needs from a session to `host`.

        A route (smarthost) is not the domain's MX: MTA-STS does not apply to it, and its
        DANE depends only on its own records (RFC 7672 §2.2.1 needs the MX answer to be
        validated, and there is none).
        """
        if domain is not None and self._dane and (route or await self._mx_secure(domain)):
            found = await self.host_dane(host, port)
            if found is not None:
                return found
        provider = provider_requirement(tls)
        if domain is not None and tls == "dane":
            # The operator asked for DANE and nothing less, MTA-STS included.
            why = "the route" if route else f"the MX answer of {domain}"
            return replace(
                provider,
                unmet=f"tls: dane requires DANE, but {why} or the TLSA records of {host} "
                "are not DNSSEC-validated",
            )
        if domain is not None and not route and self._config.delivery.mta_sts:
            policy = await self.sts.policy(domain)
            if policy is not None and policy.mode == "enforce":
                return Requirement("mta-sts", tls=True, chain=True, name=True, sts=policy)
            if policy is not None and policy.mode == "testing":
                # Judged, failures logged and counted, but the provider's `tls` decides.
                return replace(provider, policy="mta-sts", sts=policy)
        return provider

    async def _mx_secure(self, domain: str) -> bool:
        try:
            return await self._resolver.mx_secure(domain)
        except DnsTemporaryError:
            return False

    async def host_dane(self, host: str, port: int) -> Requirement | None:
        """DANE for a host, when its address and TLSA answers are validated (RFC 7672
        §2.2). A TLSA RRset with no usable record still makes TLS mandatory."""
        if not self._dane or _is_address(host):
            return None
        try:
            if not await self._resolver.addresses_secure(host):
                return None
            records = await self._resolver.tlsa(host, port)
        except DnsTemporaryError as exc:
            return Requirement(
                "dane", tls=True, unmet=f"DANE: TLSA lookup for {host} failed: {exc.reply.text}"
            )
        if not records:
            return None
        return Requirement("dane", tls=True, tlsa=dane.usable(records))

    # hosts whose TLS failed

    def broken(self, key: str) -> float | None:
        """For how many more seconds TLS with this host is skipped, after a failed
        handshake; None when it is not."""
        until = self._broken.get(key)
        now = self._clock.monotonic()
        if until is None or until <= now:
            return None
        return until - now

    def remember_broken(self, key: str) -> None:
        """Like KumoMTA's remember_broken_tls: an MX whose handshake fails gets plaintext
        for `tls_broken_ttl`, instead of a failed handshake and a second connection on
        every delivery."""
        self._broken[key] = self._clock.monotonic() + self._config.delivery.tls_broken_ttl
        self._broken.move_to_end(key)
        while len(self._broken) > MAX_REMEMBERED:
            self._broken.popitem(last=False)

    def unverified_before(self, key: str) -> str | None:
        """Why this host's certificate failed verification lately, if it did."""
        entry = self._unverified.get(key)
        if entry is None or entry[0] <= self._clock.monotonic():
            return None
        return entry[1]

    def remember_unverified(self, key: str, why: str) -> None:
        """A verifying handshake that fails costs a second connection without verification;
        the next sessions to that host go without it at once for `tls_broken_ttl`."""
        until = self._clock.monotonic() + self._config.delivery.tls_broken_ttl
        self._unverified[key] = (until, why)
        self._unverified.move_to_end(key)
        while len(self._unverified) > MAX_REMEMBERED:
            self._unverified.popitem(last=False)

    def forget_unverified(self, key: str) -> None:
        self._unverified.pop(key, None)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _verifying_context(ca_file: str | None, check_hostname: bool) -> ssl.SSLContext:
    """The system CAs plus `delivery.ca_file` (a private CA, or the tests' own)."""
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = check_hostname
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            # Verification then fails for that CA's servers: mail waits (4.7.5), none
            # goes out unverified. Refusing to start would stop all delivery instead.
            log.error("delivery.ca_file %s cannot be loaded: %s", ca_file, exc)
    return context


def _unverified_context() -> ssl.SSLContext:
    # Opportunistic TLS (RFC 7435): encrypt when offered, do not judge the certificate
    # here. DANE judges it after the handshake, against the TLSA records.
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
