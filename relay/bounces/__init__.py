"""Delivery status notifications (RFC 3464) for recipients that failed for good."""

from relay.bounces.dsn import Failure, build_dsn

__all__ = ["Failure", "build_dsn"]
