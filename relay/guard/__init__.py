"""The account guard (SPEC §12): per account, a baseline of hourly volume and of the
bounce ratio; an account far above either is tripped, and its mail held or refused
until an admin releases it. `ledger` does the arithmetic, `guard` the rest."""

from relay.guard.guard import AccountGuard, UnknownAccount
from relay.guard.ledger import Ledger, Trip

__all__ = ["AccountGuard", "Ledger", "Trip", "UnknownAccount"]
