"""The durable spool: nothing is acknowledged before it is here, fsync'd."""

from relay.spool.records import Envelope, EnvelopeRecipient, RecipientStatus, StateRecord
from relay.spool.store import Recovered, Spool

__all__ = ["Envelope", "EnvelopeRecipient", "RecipientStatus", "Recovered", "Spool", "StateRecord"]
