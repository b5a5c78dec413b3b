"""Signing a message at acceptance: the From: header's domain picks the keys.

DMARC (RFC 7489 §3.1.1) passes on DKIM only when the d= domain aligns with the From:
header's domain, hence the choice by From:, not by envelope sender or account. A
subdomain without a key of its own is signed with its nearest parent's key (relaxed
alignment: `news.example.org` mail signed d=example.org passes). A domain with an RSA
and an Ed25519 key gets both signatures (RFC 8463 §4: verifiers that do not know
Ed25519 still find the RSA one).
"""

from __future__ import annotations

import asyncio
import email.utils
import re
from dataclasses import dataclass

import dkim

from relay.config.model import Dkim
from relay.dkim.keys import SIGNATURE_ALGORITHMS, KeySet, SigningKey, load_keys
from relay.domains import InvalidDomain, normalize_domain
from relay.errors import SigningError

# RFC 6376 §5.4.1, the fields a signature should cover, in the RFC's order.
SIGNED_FIELDS = frozenset(
    {
        b"from",
        b"reply-to",
        b"subject",
        b"date",
        b"to",
        b"cc",
        b"resent-date",
        b"resent-from",
        b"resent-to",
        b"resent-cc",
        b"in-reply-to",
        b"references",
        b"list-id",
        b"list-help",
        b"list-unsubscribe",
        b"list-subscribe",
        b"list-post",
        b"list-owner",
        b"list-archive",
    }
)
# Named once more in h= than they occur (RFC 6376 §8.15): a From:, Subject: or To: added
# after signing, which a reader may be shown instead of the signed one, breaks the
# signature.
OVERSIGNED = (b"from", b"subject", b"to")
# relaxed/relaxed survives what forwarders and list servers commonly do to whitespace
# and header folding; simple/simple breaks on any of it.
CANONICALIZE = (b"relaxed", b"relaxed")
# Bigger messages are signed in a worker thread: canonicalising and hashing a 25 MiB
# body takes ~0.6 s, which would hold every other session of the listener's loop.
SIGN_INLINE = 1024 * 1024
# How far the From: field is looked for (as the listener's header scan).
HEADER_SCAN = 1024 * 1024
_FROM = re.compile(rb"^from[ \t]*:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Signature:
    domain: str  # the configured signing domain (the metric's label)
    header: bytes  # one DKIM-Signature field per key, each ending in CRLF


class Signer:
    """The keys of one configuration, by signing domain. Built at each config load."""

    def __init__(self, keys: KeySet) -> None:
        self.keys = keys
        self._by_domain: dict[str, list[SigningKey]] = {}
        for key in keys.keys:
            self._by_domain.setdefault(key.domain, []).append(key)

    @classmethod
    def load(cls, config: Dkim) -> Signer:
        """Read the keys now; problems are kept in `keys.problems` (see load_keys)."""
        return cls(load_keys(config))

    def signing_domain(self, from_domain: str) -> str | None:
        """The configured domain whose keys sign mail from `from_domain`: itself, else
        its nearest parent with keys; None when no key covers it."""
        labels = from_domain.split(".")
        for start in range(len(labels)):
            candidate = ".".join(labels[start:])
            if candidate in self._by_domain or candidate in self.keys.broken:
                return candidate
        return None

    async def sign(self, message: bytes) -> Signature | None:
        """The DKIM-Signature fields to put on top of `message`, or None when its From:
        domain has no key. Raises SigningError when it has one that cannot sign."""
        domain = from_domain(message)
        signing = self.signing_domain(domain) if domain else None
        if signing is None:
            return None
        problem = self.keys.broken.get(signing)
        if problem is not None:
            raise SigningError(signing, f"key not loaded: {problem}")
        keys = self._by_domain[signing]
        if len(message) <= SIGN_INLINE:
            return _sign(message, signing, keys)
        return await asyncio.to_thread(_sign, message, signing, keys)


def _sign(message: bytes, domain: str, keys: list[SigningKey]) -> Signature:
    headers: list[bytes] = []
    try:
        signer = dkim.DKIM(message)  # parsed once for all the keys
        present = [name.lower() for name, _ in signer.headers]
        include = [name for name in present if name in SIGNED_FIELDS] + list(OVERSIGNED)
        for key in keys:
            headers.append(
                signer.sign(
                    key.selector.encode(),
                    key.domain.encode(),
                    key.secret,
                    signature_algorithm=SIGNATURE_ALGORITHMS[key.algorithm],
                    canonicalize=CANONICALIZE,
                    include_headers=include,
                )
            )
    except Exception as exc:
        # dkimpy raises DKIMException for most problems but lets others through (its
        # ASN.1 reader, PyNaCl); whatever it is, the message must be refused with a
        # temporary error, never stored unsigned nor lost.
        raise SigningError(domain, f"{type(exc).__name__}: {exc}") from exc
    return Signature(domain, b"".join(headers))


def from_domain(message: bytes) -> str | None:
    """The domain of the first mailbox of the first From: field, normalised as relay
    normalises every domain; None when there is none (or it is not a domain).

    A message with several From: fields is refused by DMARC receivers (RFC 7489 §6.6.1)
    whatever we sign; the first is as good a choice as any and cannot widen what a
    client may sign for (every From: it writes is its own choice anyway).
    """
    if message.startswith(b"\r\n"):
        return None  # an empty header section: what follows is body
    end = message.find(b"\r\n\r\n", 0, HEADER_SCAN)
    found = _FROM.search(message, 0, end + 2 if end >= 0 else HEADER_SCAN)
    if found is None:
        return None
    value = re.sub(rb"\r\n(?=[ \t])", b"", found.group(1)).decode("utf-8", "replace")
    for _, address in email.utils.getaddresses([value]):
        local, at, domain = address.rpartition("@")
        if at and local and domain:
            try:
                return normalize_domain(domain)
            except InvalidDomain:
                return None
    return None
