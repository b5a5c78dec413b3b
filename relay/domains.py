"""Domain names in the one form relay routes, limits and stores (SPEC §5).

Two spellings of one destination must meet the same provider limits: `free.fr` typed
with a full-width "f" (U+FF46) is `free.fr`, `Bücher.example` is `xn--bcher-kva.example`. The
mapping is IDNA 2008 with UTS #46 (the `idna` package, nontransitional, STD3 rules),
which is what browsers and current resolvers apply; the result is the lower-case
A-label form without a trailing dot. Address literals (RFC 5321 §4.1.3) name no
domain and pass through as they are.

The listener applies this at MAIL and RCPT; the router imports it too, so a name
normalised twice stays the same (the function is idempotent).
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

import idna

_IPV6_TAG = "ipv6:"


class InvalidDomain(ValueError):
    """The name does not normalise: not a valid IDNA 2008 / LDH name or address literal."""


def normalize_domain(domain: str) -> str:
    """The canonical A-label form of `domain`; literals unchanged. Raises InvalidDomain."""
    if domain.startswith("["):
        _check_literal(domain)
        return domain
    return _normalize_name(domain)


def normalize_address(address: str) -> str:
    """`local@domain` with the domain normalised; the local part is the mailbox's own
    business (RFC 5321 §2.4) and is kept byte for byte. Raises InvalidDomain."""
    local, at, domain = address.rpartition("@")
    if not at or not local:
        raise InvalidDomain(f"{address!r} has no local part and domain")
    return f"{local}@{normalize_domain(domain)}"


# Mail arrives for a few domains over and over; the mapping is pure, so cache it. The
# bound keeps a client that invents a new name per RCPT from growing it without end.
@lru_cache(maxsize=16384)
def _normalize_name(domain: str) -> str:
    try:
        encoded = idna.encode(domain, uts46=True, std3_rules=True, transitional=False)
    except (idna.IDNAError, UnicodeError) as exc:  # IDNAError is a UnicodeError; both
        raise InvalidDomain(f"{domain!r} is not a valid domain name: {exc}") from exc
    name = encoded.decode("ascii")
    # One trailing dot is the root (an absolute name); UTS #46 maps a full-width one to
    # "." as well. Two would be an empty label, which idna refuses above.
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise InvalidDomain(f"{domain!r} is not a valid domain name: empty")
    return name


def _check_literal(domain: str) -> None:
    """`[192.0.2.1]` or `[IPv6:2001:db8::1]` (the tag is case-insensitive, RFC 5321 §4.1.3)."""
    if not domain.endswith("]"):
        raise InvalidDomain(f"{domain!r} is not an address literal")
    inner = domain[1:-1]
    if "%" in inner:  # a zone index names an interface of ours, never a mail host
        raise InvalidDomain(f"{domain!r} is not an address literal")
    try:
        if inner[: len(_IPV6_TAG)].lower() == _IPV6_TAG:
            ipaddress.IPv6Address(inner[len(_IPV6_TAG) :])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError as exc:
        raise InvalidDomain(f"{domain!r} is not an address literal: {exc}") from exc
