"""Name resolution for delivery: MX, implicit MX, null MX, addresses; dnspython async."""

from relay.dns.resolver import MxHost, Resolver

__all__ = ["MxHost", "Resolver"]
