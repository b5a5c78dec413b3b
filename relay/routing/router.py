"""Recipient domain → provider: domain globs first, then MX host patterns, else default.

A destination without a provider gets its own lane keyed by its domain, under the
`defaults` shaping (SPEC §2).
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass

from relay.config.model import Config, Provider, Shaping
from relay.dns.resolver import Resolver
from relay.errors import DnsError

log = logging.getLogger("relay.routing")

DEFAULT_PROVIDER = "default"


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a domain's mail goes: the lane that delivers it, with that lane's shaping."""

    lane_key: str  # provider name, or "default:<domain>"
    provider: str  # provider name or "default": the bounded metrics label
    shaping: Shaping


class Router:
    def __init__(self, config: Config, resolver: Resolver) -> None:
        self._config = config
        self._resolver = resolver
        self._cache: dict[str, Destination] = {}
        self._by_mx = [p for p in config.providers if p.mx]

    def cached(self, domain: str) -> Destination | None:
        """The route without any I/O, when the domain needs no MX lookup or was seen."""
        hit = self._cache.get(domain)
        if hit is not None:
            return hit
        provider = self._by_domain(domain)
        if provider is not None or not self._by_mx:
            return self._remember(domain, provider)
        return None

    async def route(self, domain: str) -> Destination:
        hit = self.cached(domain)
        if hit is not None:
            return hit
        try:
            hosts = await self._resolver.mx_hosts(domain)
        except DnsError:
            # Delivery will meet the same error and defer or bounce with it; routing must
            # not decide that. Not cached, so the next message looks again.
            return self._destination(domain, None)
        first = hosts[0].name if hosts else ""
        for provider in self._by_mx:
            if any(fnmatch.fnmatchcase(first, pattern) for pattern in provider.mx):
                return self._remember(domain, provider)
        return self._remember(domain, None)

    def _by_domain(self, domain: str) -> Provider | None:
        for provider in self._config.providers:
            if any(fnmatch.fnmatchcase(domain, pattern) for pattern in provider.domains):
                return provider
        return None

    def _remember(self, domain: str, provider: Provider | None) -> Destination:
        destination = self._destination(domain, provider)
        self._cache[domain] = destination
        return destination

    def destination_for_key(self, key: str) -> Destination | None:
        """The destination behind a lane key (a provider name or "default:<domain>") under
        the current config; None when no such provider is configured."""
        for provider in self._config.providers:
            if provider.name == key:
                return self._destination("", provider)
        prefix, _, domain = key.partition(":")
        if prefix == DEFAULT_PROVIDER and domain:
            return self._destination(domain, None)
        return None

    def _destination(self, domain: str, provider: Provider | None) -> Destination:
        if provider is not None:
            return Destination(provider.name, provider.name, provider.shaping)
        return Destination(f"{DEFAULT_PROVIDER}:{domain}", DEFAULT_PROVIDER, self._config.defaults)
