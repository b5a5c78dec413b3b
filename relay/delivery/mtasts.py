"""MTA-STS (RFC 8461): a recipient domain's published TLS policy, discovered, fetched and
cached.

Discovery is the TXT record `_mta-sts.<domain>` (`v=STSv1; id=…`); the policy itself is
fetched over HTTPS from `https://mta-sts.<domain>/.well-known/mta-sts.txt`, with a
certificate verified against the system CAs plus `delivery.ca_file`. A policy is kept for
its `max_age` in `<spool>/state/mta-sts.json`, rewritten atomically (tmp, fsync, rename,
fsync dir) on each change, so it outlives restarts: an attacker who blocks the HTTPS fetch
after a restart cannot strip the policy away (RFC 8461 §10.2). It is fetched again when
the TXT id changes; a fetch that fails keeps the cached policy (RFC 8461 §5.1).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import ssl
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Literal

import aiohttp
import aiohttp.abc

from relay.clock import SYSTEM_CLOCK, Clock
from relay.dns.resolver import Resolver
from relay.errors import DnsError
from relay.statefile import StateFile
from relay.tasks import spawn

log = logging.getLogger("relay.delivery")

Mode = Literal["enforce", "testing", "none"]

# RFC 8461 §3.3: a policy fetch is bounded in size (64 KiB is its figure) and in time
# (it suggests one minute; a sender holding an open SMTP session waits less).
MAX_POLICY_BYTES = 64 * 1024
FETCH_TIMEOUT = 30.0
# RFC 8461 §3.2: max_age is at most 31557600 seconds (about a year).
MAX_AGE_LIMIT = 31_557_600
# How often the TXT record of a domain is looked at again (the resolver's cache answers
# within its TTL anyway); also how long a failed fetch is not retried.
RECHECK_SECONDS = 300.0
# Domains remembered at once, in memory and on disk: the least recently used go first.
MAX_DOMAINS = 10_000

_MODES: dict[str, Mode] = {"enforce": "enforce", "testing": "testing", "none": "none"}
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")


@dataclass(frozen=True, slots=True)
class StsPolicy:
    domain: str
    id: str  # the TXT record's id when this policy was fetched
    mode: Mode
    mx: tuple[str, ...]  # patterns: "mx.example.org" or "*.example.org"
    max_age: int
    expires: float  # wall-clock time

    def matches(self, host: str) -> bool:
        """RFC 8461 §4.1: an exact name, or `*.` standing for exactly one leftmost label."""
        host = host.lower().rstrip(".")
        for pattern in self.mx:
            if pattern.startswith("*."):
                first, dot, rest = host.partition(".")
                if dot and first and rest == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False


def txt_id(records: list[str]) -> str | None:
    """The policy id of the `_mta-sts` TXT records, or None when there is no usable one.

    RFC 8461 §3.1: records not starting with `v=STSv1;` are ignored; anything but exactly
    one left, or one without a valid id, means the domain has no policy.
    """
    candidates = [r for r in records if r.startswith("v=STSv1;")]
    if len(candidates) != 1:
        return None
    fields = {}
    for part in candidates[0].split(";"):
        key, _, value = part.strip().partition("=")
        if key:
            fields[key] = value.strip()
    policy_id = fields.get("id", "")
    return policy_id if _ID.match(policy_id) else None


def parse_policy(domain: str, policy_id: str, text: str, now: float) -> StsPolicy:
    """The policy file (RFC 8461 §3.2): `key: value` lines; raises ValueError if invalid."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise ValueError(f"not a key: value line: {line[:80]!r}")
        key, value = key.strip(), value.strip()
        if key == "mx":
            mx.append(value.lower().rstrip("."))
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise ValueError(f"version is {fields.get('version')!r}, not STSv1")
    mode = _MODES.get(fields.get("mode", ""))
    if mode is None:
        raise ValueError(f"mode is {fields.get('mode')!r}")
    age = fields.get("max_age", "")
    if not age.isdigit() or len(age) > 10:  # RFC 8461 §3.2: 1*10DIGIT
        raise ValueError(f"max_age is {age!r}")
    max_age = min(int(age), MAX_AGE_LIMIT)
    if mode != "none" and not mx:
        raise ValueError("no mx pattern")
    return StsPolicy(domain, policy_id, mode, tuple(mx), max_age, now + max_age)


class _Resolve(aiohttp.abc.AbstractResolver):
    """aiohttp's host lookups through relay's own resolver (`dns.nameservers`), as the
    MX lookups are: one DNS view for the whole delivery."""

    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        try:
            addresses = await self._resolver.addresses(host)
        except DnsError as exc:
            raise OSError(f"cannot resolve {host}: {exc.reply.text}") from exc
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
            for address in addresses
        ]

    async def close(self) -> None:
        return None


class FetchError(Exception):
    """The policy could not be fetched or parsed (stays inside this module)."""


class MtaSts:
    """The MTA-STS policies of recipient domains, looked up when mail for them goes out."""

    def __init__(
        self,
        spool_path: str,
        resolver: Resolver,
        context: ssl.SSLContext,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._file = StateFile(
            os.path.join(spool_path, "state", "mta-sts.json"), "MTA-STS policies"
        )
        self._path = self._file.path
        self.resolver = resolver
        self.context = context  # verifies the policy host's certificate (RFC 8461 §3.3)
        self._clock = clock
        self._policies: OrderedDict[str, StsPolicy] = OrderedDict()
        self._checked: OrderedDict[str, float] = OrderedDict()  # domain → next TXT check
        self._pending: dict[str, asyncio.Task[StsPolicy | None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._load()

    def _load(self) -> None:
        try:
            with open(self._path, encoding="utf-8") as handle:
                raw = json.load(handle)
            now = self._clock.time()
            for domain, entry in raw.items():
                policy = StsPolicy(
                    domain=str(domain),
                    id=str(entry["id"]),
                    mode=_MODES[entry["mode"]],
                    mx=tuple(str(p) for p in entry["mx"]),
                    max_age=int(entry["max_age"]),
                    expires=float(entry["expires"]),
                )
                if policy.expires > now:
                    self._policies[policy.domain] = policy
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("cannot read %s (%s); MTA-STS policies are fetched afresh", self._path, exc)
            self._policies.clear()

    def cached(self, domain: str) -> StsPolicy | None:
        """The policy in force from the cache alone, without any lookup."""
        policy = self._policies.get(domain)
        if policy is None or policy.expires <= self._clock.time():
            return None
        return policy

    async def policy(self, domain: str) -> StsPolicy | None:
        """The domain's policy in force (any mode), or None when it publishes none."""
        if self._checked.get(domain, 0.0) > self._clock.monotonic():
            return self.cached(domain)
        task = self._pending.get(domain)
        if task is None:
            # One lookup per domain at a time, shared by the batches that ask meanwhile,
            # and finished even if the one that started it is cancelled.
            task = spawn(self._refresh(domain), self._tasks, f"MTA-STS {domain}")
            self._pending[domain] = task
            task.add_done_callback(lambda _: self._pending.pop(domain, None))
        return await asyncio.shield(task)

    async def _refresh(self, domain: str) -> StsPolicy | None:
        self._checked[domain] = self._clock.monotonic() + RECHECK_SECONDS
        self._checked.move_to_end(domain)
        while len(self._checked) > MAX_DOMAINS:
            self._checked.popitem(last=False)
        cached = self.cached(domain)
        try:
            policy_id = txt_id(await self.resolver.txt(f"_mta-sts.{domain}"))
        except DnsError as exc:
            log.info("MTA-STS: TXT lookup for %s failed (%s)", domain, exc.reply.text)
            return cached  # RFC 8461 §5.1: a cached policy stays in force
        if policy_id is None or (cached is not None and cached.id == policy_id):
            # No record (anymore) does not end a cached policy before its max_age
            # (RFC 8461 §3.1, §10.2: removing the record is no way to downgrade).
            return cached
        try:
            policy = parse_policy(domain, policy_id, await self._fetch(domain), self._clock.time())
        except FetchError as exc:
            log.warning("MTA-STS: policy of %s not fetched: %s", domain, exc)
            return cached
        log.info(
            "MTA-STS: %s policy id=%s mode=%s mx=%s max_age=%d",
            domain,
            policy.id,
            policy.mode,
            ",".join(policy.mx) or "-",
            policy.max_age,
        )
        self._policies[domain] = policy
        self._policies.move_to_end(domain)
        while len(self._policies) > MAX_DOMAINS:
            self._policies.popitem(last=False)
        self._save()
        return policy

    async def _fetch(self, domain: str) -> str:
        url = f"https://mta-sts.{domain}/.well-known/mta-sts.txt"
        connector = aiohttp.TCPConnector(
            ssl=self.context, resolver=_Resolve(self.resolver), use_dns_cache=False
        )
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
        try:
            async with (
                aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
                # RFC 8461 §3.3: redirects are not followed.
                session.get(url, allow_redirects=False) as response,
            ):
                if response.status != 200:
                    raise FetchError(f"{url}: HTTP {response.status}")
                if response.content_type != "text/plain":
                    raise FetchError(f"{url}: media type {response.content_type}, not text/plain")
                body = await response.content.read(MAX_POLICY_BYTES + 1)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise FetchError(f"{url}: {exc or type(exc).__name__}") from exc
        if len(body) > MAX_POLICY_BYTES:
            raise FetchError(f"{url}: larger than {MAX_POLICY_BYTES} bytes")
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FetchError(f"{url}: not UTF-8") from exc

    # the cache on disk

    def _save(self) -> None:
        self._file.save({domain: _entry(policy) for domain, policy in self._policies.items()})

    async def flush(self) -> None:
        await self._file.flush()


def _entry(policy: StsPolicy) -> dict[str, Any]:
    entry = asdict(policy)
    del entry["domain"]
    entry["mx"] = list(policy.mx)
    return entry
