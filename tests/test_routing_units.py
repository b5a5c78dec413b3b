"""Routing over a real DNS server on loopback: sites, MX patterns, normalisation, bounds."""

from __future__ import annotations

import asyncio
from typing import Any

from relay.config import parse_config
from relay.config.model import Config, Dns
from relay.dns.resolver import Resolver
from relay.routing.router import Router


def _config(**extra: Any) -> Config:
    raw: dict[str, Any] = {
        "providers": {
            "orange": {"domains": ["orange.test"], "mx": ["*.orange.test"]},
            "free": {"domains": ["free.fr"], "route": "127.0.0.5:25"},
        }
    }
    raw.update(extra)
    return parse_config(raw)


def _router(dns_port: int, **options: Any) -> Router:
    config = _config()
    return Router(
        config, Resolver(Dns(nameservers=(("127.0.0.1", dns_port),), timeout=2)), **options
    )


def test_domains_on_one_mx_host_share_one_site_queue(dns_server):
    for i in range(3):
        dns_server.mx(f"d{i}.test", (10, "mx.shared.test"))
    dns_server.add("mx.shared.test", "A", "127.0.0.2")
    router = _router(dns_server.port)

    async def go() -> None:
        routes = [await router.route(f"d{i}.test") for i in range(3)]
        assert {r.queue.key for r in routes} == {"default:mx.shared.test"}
        assert {r.site.hosts for r in routes} == {("mx.shared.test",)}

    asyncio.run(go())


def test_mx_pattern_needs_a_host_that_resolves(dns_server):
    # The first MX name looks like Orange's but does not exist; the next is someone else's.
    dns_server.mx("outsider.test", (10, "fake.orange.test"), (20, "mx.outsider.test"))
    dns_server.add("mx.outsider.test", "A", "127.0.0.3")
    dns_server.mx("customer.test", (10, "smtp-in.orange.test"))
    dns_server.add("smtp-in.orange.test", "A", "127.0.0.4")
    router = _router(dns_server.port)

    async def go() -> None:
        outsider = await router.route("outsider.test")
        assert outsider.queue.provider == "default"
        assert outsider.site.hosts == ("fake.orange.test", "mx.outsider.test")
        customer = await router.route("customer.test")
        assert (customer.queue.key, customer.reason) == ("orange", "mx *.orange.test")

    asyncio.run(go())


def test_look_alike_domains_meet_the_provider(dns_server):
    router = _router(dns_server.port)

    async def go() -> None:
        for form in ("\uff46ree.fr", "FREE.FR.", "free.fr"):
            route = await router.route(form)
            assert route.queue.key == "free", form

    asyncio.run(go())


def test_at_most_ten_mx_hosts(dns_server):
    dns_server.mx("many.test", *[(i, f"mx{i}.many.test") for i in range(200)])
    router = _router(dns_server.port)

    async def go() -> None:
        route = await router.route("many.test")
        assert len(route.site.hosts) == 10

    asyncio.run(go())


def test_the_route_cache_is_bounded(dns_server):
    dns_server.add("mx.shared.test", "A", "127.0.0.2")
    for i in range(30):
        dns_server.mx(f"d{i}.test", (10, "mx.shared.test"))
    router = _router(dns_server.port, cache_entries=10)

    async def go() -> None:
        for i in range(30):
            await router.route(f"d{i}.test")
        assert len(router) == 10

    asyncio.run(go())
