"""Who may submit what: accounts, passwords, senders, trusted networks, connection caps.

Everything the listener decides about a client, apart from SMTP syntax, is here.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hmac
import ipaddress
import logging
import os
from collections import Counter

from relay.config.model import Account, Config, Listener
from relay.listener.abuse import AccountRates, AuthThrottle
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


class Policy:
    def __init__(self, config: Config) -> None:
        self.config = config
        # A successful login is remembered as an HMAC of the password, so a client that
        # logs in for every message does not pay a fresh scrypt (~50 ms of CPU) each time.
        self._verified: dict[str, bytes] = {}
        self._key = os.urandom(32)
        self.rates = AccountRates()
        self.auth_throttle = AuthThrottle()

    def reconfigure(self, config: Config) -> None:
        """New accounts take effect at once; remembered logins are forgotten."""
        self.config = config
        self._verified.clear()

    def trusted(self, listener: Listener, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip.split("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in listener.trusted_networks)

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
        sender = sender.lower()
        return any(fnmatch.fnmatchcase(sender, pattern.lower()) for pattern in account.senders)


# Verifying against a throwaway hash when the account does not exist keeps timing
# from telling which account names are real.
_DUMMY_HASH = (
    "scrypt:16384:8:1:AAAAAAAAAAAAAAAAAAAAAA==:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
)
