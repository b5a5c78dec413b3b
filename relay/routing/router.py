"""Recipient domain → queue and site (SPEC §2, §5).

A *queue* is what a delivery lane serves: a configured provider, or, for domains without
one, their *site*. A site is the set of MX host names a domain resolves to (KumoMTA's
"MX rollup"): a thousand domains hosted on one MX host form one `defaults` queue, not a
thousand, and connections belong to the host they reach (Postfix keys its connection
cache by server too).

Provider by domain glob first; else by `mx` pattern, matched against the first MX host
that resolves: a name that merely looks like `*.orange.fr` but has no address must not
put an outsider's domain into Orange's queue. Routes are cached with a bounded size and
age, since the MX data behind them changes.
"""

from __future__ import annotations

import fnmatch
import logging
from collections import OrderedDict
from dataclasses import dataclass

from relay.clock import SYSTEM_CLOCK, Clock
from relay.config.model import Config, Provider, Shaping
from relay.dns.resolver import MAX_MX_HOSTS, Resolver
from relay.domains import InvalidDomain, normalize_domain
from relay.errors import DnsError

log = logging.getLogger("relay.routing")

DEFAULT_PROVIDER = "default"
CACHE_ENTRIES = 100_000
CACHE_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class Site:
    """The hosts a domain's mail goes to. `hosts` is in preference order; it is empty
    while the MX lookup failed, and `key` is then the domain itself."""

    key: str
    hosts: tuple[str, ...]
    source: str = "default"  # the egress source its connections leave from (SPEC §14)

    def serves(self, host: str, source: str) -> bool:
        """A connection to `host` from `source` can carry this site's mail."""
        return source == self.source and host in self.hosts


@dataclass(frozen=True, slots=True)
class Queue:
    """What one delivery lane serves, with that lane's shaping."""

    key: str  # provider name, or "default:<site key>"; "@<source>" per egress source
    provider: str  # provider name or "default": the bounded metrics label
    shaping: Shaping
    egress: str = "default"  # whose limits these are; "shared" with shared_limits


@dataclass(frozen=True, slots=True)
class Destination:
    queue: Queue
    site: Site
    reason: str  # why this queue: "domain orange.fr", "mx *.orange.fr", "default"

    @property
    def backlog_key(self) -> str:
        """What admission control counts this mail under (SPEC §12): the provider, or for
        `default` its site, whatever egress source it leaves from (the queue key without
        its `@<source>`)."""
        return self.queue.key.partition("@")[0]


class Router:
    def __init__(
        self,
        config: Config,
        resolver: Resolver,
        clock: Clock = SYSTEM_CLOCK,
        cache_entries: int = CACHE_ENTRIES,
    ) -> None:
        self._config = config
        self._resolver = resolver
        self._clock = clock
        self._cache_entries = cache_entries
        self._cache: OrderedDict[str, tuple[float, Destination]] = OrderedDict()
        self._by_mx = [p for p in config.providers if p.mx]
        self._named = {p.name: p for p in config.providers}

    def __len__(self) -> int:
        return len(self._cache)

    def cached(self, domain: str) -> Destination | None:
        """The route without any I/O: seen recently, or a smarthost needs no lookup."""
        hit = self._cache.get(domain)
        if hit is not None:
            if hit[0] > self._clock.monotonic():
                self._cache.move_to_end(domain)
                return hit[1]
            del self._cache[domain]
        provider, why = self._by_domain(domain)
        shaping = provider.shaping if provider is not None else self._config.defaults
        if shaping.route is not None:
            host, port = shaping.route
            return self._remember(domain, provider, Site(f"[{host}]:{port}", (host,)), why)
        return None

    async def route(self, domain: str) -> Destination:
        try:
            domain = normalize_domain(domain)
        except InvalidDomain:
            pass  # the lookup below fails and delivery bounces or defers with its reply
        hit = self.cached(domain)
        if hit is not None:
            return hit
        provider, why = self._by_domain(domain)
        try:
            hosts = [mx.name for mx in await self._resolver.mx_hosts(domain)][:MAX_MX_HOSTS]
        except DnsError:
            # Delivery meets the same error and defers or bounces with it; routing must
            # not decide that. Not cached: the next message looks again.
            return self._destination(provider, Site(domain, ()), why)
        if provider is None and self._by_mx:
            provider, why = await self._by_mx_host(hosts)
        return self._remember(
            domain, provider, Site(",".join(sorted(set(hosts))), tuple(hosts)), why
        )

    def _by_domain(self, domain: str) -> tuple[Provider | None, str]:
        for provider in self._config.providers:
            for pattern in provider.domains:
                if fnmatch.fnmatchcase(domain, pattern):
                    return provider, f"domain {pattern}"
        return None, DEFAULT_PROVIDER

    async def _by_mx_host(self, hosts: list[str]) -> tuple[Provider | None, str]:
        for host in hosts:
            try:
                await self._resolver.addresses(host)
            except DnsError:
                continue  # a dead name decides nothing: the next host speaks for the domain
            for provider in self._by_mx:
                for pattern in provider.mx:
                    if fnmatch.fnmatchcase(host, pattern):
                        return provider, f"mx {pattern}"
            break
        return None, DEFAULT_PROVIDER

    def _remember(
        self, domain: str, provider: Provider | None, site: Site, why: str
    ) -> Destination:
        destination = self._destination(provider, site, why)
        self._cache[domain] = (self._clock.monotonic() + CACHE_SECONDS, destination)
        if len(self._cache) > self._cache_entries:
            self._cache.popitem(last=False)
        return destination

    def _destination(self, provider: Provider | None, site: Site, why: str) -> Destination:
        if provider is not None:
            queue = Queue(provider.name, provider.name, provider.shaping)
        else:
            queue = Queue(f"{DEFAULT_PROVIDER}:{site.key}", DEFAULT_PROVIDER, self._config.defaults)
        return Destination(queue, site, why)

    def for_egress(self, destination: Destination, source: str) -> Destination:
        """The destination as seen from one sending source. Receivers count connections
        and rates per IP, so each (source, provider) is a queue of its own with its own
        limits, suspensions and throttles, unless the provider sets `shared_limits`
        (then one queue, whose lines and connections are still kept per source)."""
        if not self._config.egress_named:
            return destination
        queue, site = destination.queue, destination.site
        shared = self._shared(queue.provider)
        if shared:
            queue = Queue(queue.key, queue.provider, queue.shaping, "shared")
        else:
            queue = Queue(f"{queue.key}@{source}", queue.provider, queue.shaping, source)
        # The site as reached from this source: a receiver may refuse one source's
        # address and take the other's, so backoff and connections are per source too.
        site = Site(f"{source}|{site.key}", site.hosts, source)
        return Destination(queue, site, destination.reason)

    def _shared(self, provider: str) -> bool:
        named = self._named.get(provider)
        return named is not None and named.shared_limits

    def providers(self) -> list[str]:
        return [p.name for p in self._config.providers]

    def queue(self, key: str) -> Queue | None:
        """The queue behind a key under the current config: a configured provider, or
        `default:<site>`, each `@<source>` when sources are named. None for anything
        else: an admin cannot conjure a provider or a source."""
        name, at, source = key.rpartition("@") if "@" in key else (key, "", "")
        if at and source not in self._config.egress:
            return None
        egress = source or ("shared" if self._config.egress_named else "default")
        provider = self._named.get(name)
        if provider is not None:
            if self._config.egress_named and (not at) != provider.shared_limits:
                return None  # per source (`orange@lists`), or one shared queue
            return Queue(key, provider.name, provider.shaping, egress)
        prefix, _, site = name.partition(":")
        if prefix == DEFAULT_PROVIDER and site:
            return Queue(key, DEFAULT_PROVIDER, self._config.defaults, egress)
        return None

    def queues_of(self, provider: str) -> list[str]:
        """The queue keys of a provider: one, or one per source."""
        if not self._config.egress_named or self._shared(provider):
            return [provider]
        return [f"{provider}@{source}" for source in self._config.egress]

    def provider_queues(self) -> list[Queue]:
        """Every queue of every configured provider, whether it holds mail or not."""
        keys = [key for name in self.providers() for key in self.queues_of(name)]
        return [queue for key in keys if (queue := self.queue(key)) is not None]
