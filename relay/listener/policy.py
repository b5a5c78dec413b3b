"""Who may submit what: accounts, passwords, senders, trusted networks, connection caps.

Everything the listener decides about a client, apart from SMTP syntax, is here. The
policy sees a session only as a `Client`, a frozen snapshot of what it may read, taken
when it asks; it never holds or reaches into the session itself.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hmac
import ipaddress
import logging
import os
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from relay.config.model import Account, Config, Listener
from relay.dns.resolver import Resolver
from relay.domains import InvalidDomain, normalize_domain
from relay.errors import DnsTemporaryError
from relay.listener.abuse import (
    AccountRates,
    AuthFailures,
    LocalAccountRates,
    LocalAuthFailures,
)
from relay.passwords import verify_password

log = logging.getLogger("relay.listener")


class ConnectionGate:
    """Concurrent session caps, global and per client IP (421 4.7.0 at greeting)."""

    def __init__(self, total: int, per_ip: int) -> None:
        self.total = total
        self.per_ip = per_ip
        self._open = 0
        self._by_ip: Counter[str] = Counter()
        self.draining = False  # shutting down: new sessions get 421 4.3.2
        self.idle = asyncio.Event()
        self.idle.set()

    def admit(self, ip: str) -> bool:
        if self._open >= self.total or self._by_ip[ip] >= self.per_ip:
            return False
        self._open += 1
        self._by_ip[ip] += 1
        self.idle.clear()
        return True

    def release(self, ip: str) -> None:
        self._open -= 1
        self._by_ip[ip] -= 1
        if self._by_ip[ip] <= 0:
            del self._by_ip[ip]
        if self._open == 0:
            self.idle.set()


@dataclass(frozen=True, slots=True)
class Client:
    """A session as the policy sees it, at the moment it asks."""

    listener: Listener
    peer_ip: str
    trusted: bool  # in the listener's trusted_networks
    tls: bool  # the session is encrypted (implicit TLS or after STARTTLS)
    account: Account | None  # authenticated, and still in the configuration


@dataclass(frozen=True, slots=True)
class Refusal:
    """A reply refusing a command, and the relay_messages_rejected_total reason to count
    it under (None: not counted, as for plain syntax errors)."""

    reply: str
    reason: str | None = None


class Policy:
    def __init__(
        self,
        config: Config,
        resolver: Resolver,
        auth_failures: AuthFailures | None = None,
        account_rates: AccountRates | None = None,
    ) -> None:
        self.config = config
        self.resolver = resolver  # replaced on reload
        # A successful login is remembered as an HMAC of the password, so a client that
        # logs in for every message does not pay a fresh scrypt (~50 ms of CPU) each time.
        self._verified: dict[str, bytes] = {}
        self._key = os.urandom(32)
        self.rates: AccountRates = account_rates or LocalAccountRates()
        self.auth_failures: AuthFailures = auth_failures or LocalAuthFailures()
        # Accounts the account guard tripped with `action: refuse`, as the main process
        # last said (relay/guard): their MAIL gets 450 until released.
        self.refused: frozenset[str] = frozenset()

    def reconfigure(self, config: Config, resolver: Resolver) -> None:
        """New accounts take effect at once; remembered logins are forgotten."""
        self.config = config
        self.resolver = resolver
        self._verified.clear()

    def trusted(self, listener: Listener, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip.split("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in listener.trusted_networks)

    def account(self, login: str | None) -> Account | None:
        """The configured account of a login name (None once a reload removed it)."""
        return None if login is None else self.config.account(login)

    async def authenticate(self, login: bytes, password: bytes) -> Account | None:
        """The account for these credentials, or None; same cost whether the name exists."""
        name = login.decode("utf-8", "replace")
        account = self.config.account(name)
        encoded = account.password if account else _DUMMY_HASH
        token = hmac.new(self._key, encoded.encode() + b"\0" + password, "sha256").digest()
        if account and hmac.compare_digest(self._verified.get(name, b""), token):
            return account
        ok = await asyncio.to_thread(verify_password, password, encoded)
        if ok and account is not None:
            self._verified[name] = token
            return account
        return None

    @staticmethod
    def sender_allowed(account: Account, sender: str) -> bool:
        """`sender` is normalised (lower-cased here); so are the patterns' domains, so
        that `*@bücher.example` in the configuration allows what arrives as an A-label."""
        sender = sender.lower()
        return any(fnmatch.fnmatchcase(sender, _pattern(pattern)) for pattern in account.senders)

    def may_submit(self, client: Client) -> Refusal | None:
        """Never an open relay: AUTH or a trusted network, else no MAIL."""
        if client.trusted or client.account is not None:
            return None
        if client.listener.auth == "none":
            return Refusal("554 5.7.1 Relay access denied: client not in trusted networks", "auth")
        return Refusal("530 5.7.0 Authentication required", "auth")

    async def check_sender(self, client: Client, sender: str) -> Refusal | None:
        """Null sender, the account's own senders, its rate, a domain bounces can reach."""
        if not sender:
            return Refusal("550 5.7.1 Null sender is not allowed on submission", "sender")
        account = client.account
        if account is not None and not self.sender_allowed(account, sender):
            log.warning(
                "sender <%s> refused for account %s from %s", sender, account.name, client.peer_ip
            )
            return Refusal(
                f"553 5.7.1 Sender address rejected: <{sender}> not owned by user {account.name}",
                "sender",
            )
        if account is not None and account.name in self.refused:
            log.warning(
                "account %s is tripped by the account guard: MAIL refused from %s",
                account.name,
                client.peer_ip,
            )
            return Refusal(
                f"450 4.7.1 Error: account {account.name} is suspended by the account guard "
                "(unusual volume or rejected mail); try again later",
                "guard",
            )
        if account is not None and not await self.rates.allow(account):
            log.warning(
                "account %s over its rate %s: MAIL refused from %s",
                account.name,
                account.rate,
                client.peer_ip,
            )
            return Refusal(
                f"450 4.7.1 Error: account {account.name} is over its sending rate "
                f"({account.rate}); try again later",
                "rate",
            )
        return await self._sender_domain(client, sender)

    async def _sender_domain(self, client: Client, sender: str) -> Refusal | None:
        """A return path must be routable, or bounces have nowhere to go (Postfix's
        reject_unknown_sender_domain). The refusal a new user meets first: it says what
        to do, in the reply and in the log."""
        domain = sender.rpartition("@")[2].lower()
        try:
            routable = await self.resolver.routable(domain)
        except DnsTemporaryError:
            log.warning(
                "sender <%s> deferred from %s: DNS did not answer for %s; relay checks that "
                "a sender's domain receives mail: fix the resolver or dns.nameservers, or try "
                "relay offline from an address literal such as app@[127.0.0.1]",
                sender,
                client.peer_ip,
                domain,
            )
            return Refusal(
                f"451 4.1.8 <{sender}>: Sender address rejected: cannot look up {domain} "
                "(DNS did not answer); try again later",
                "sender",
            )
        if not routable:
            log.warning(
                "sender <%s> refused from %s: %s has no MX or address record, so bounces "
                "could not reach it; use a sender in a domain that receives mail (without "
                "DNS, an address literal such as app@[127.0.0.1] works)",
                sender,
                client.peer_ip,
                domain,
            )
            return Refusal(
                f"550 5.1.8 <{sender}>: Sender address rejected: {domain} has no MX or "
                "address record, so bounces could not reach it; send from an address in a "
                "domain that receives mail",
                "sender",
            )
        return None


@lru_cache(maxsize=1024)
def _pattern(pattern: str) -> str:
    """A `senders` glob in the form senders are compared in: lower case, each domain
    label without glob characters as IDNA normalises it (a label like `*` is kept)."""
    local, at, domain = pattern.lower().rpartition("@")
    if not at:
        return domain
    labels = []
    for label in domain.split("."):
        try:
            labels.append(label if set(label) & set("*?[]") else normalize_domain(label))
        except InvalidDomain:
            labels.append(label)  # matched as written; it can only match what it spells
    return f"{local}@{'.'.join(labels)}"


# Verifying against a throwaway hash when the account does not exist keeps timing
# from telling which account names are real.
_DUMMY_HASH = (
    "scrypt:16384:8:1:AAAAAAAAAAAAAAAAAAAAAA==:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
)
