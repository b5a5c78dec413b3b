"""The exception tree of relay.

    RelayError
    ├── ConfigError                 the YAML is invalid; carries every problem found
    ├── SpoolError (OSError)        the spool cannot store or read a message
    │   └── SpoolCorrupt            an entry on disk cannot be parsed
    ├── DnsError
    │   ├── DnsTemporaryError       SERVFAIL, timeout: try later
    │   └── DnsPermanentError       NXDOMAIN, null MX: bounce
    ├── SigningError                a message could not be DKIM-signed: 451, try later
    ├── ClusterUnavailable (ConnectionError)  the cluster's Redis is down or too slow:
    │                               local limits stand in (SPEC §9)
    └── DeliveryError               carries the remote Reply when there is one
        ├── TransientDeliveryError  4xx, lost connection, timeout
        │   └── DestinationUnreachable   no MX host of the destination answered
        └── PermanentDeliveryError  5xx

Foreign exceptions (aiosmtplib, OSError, dnspython) are translated once, where they
enter: delivery/ and dns/.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay.reply import Reply


class RelayError(Exception):
    """Base of every error relay raises on purpose."""


class ConfigError(RelayError):
    """The configuration is invalid; `problems` lists each as "key.path: sentence"."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class SpoolError(RelayError, OSError):
    """Storing or reading a spool entry failed (disk full, permissions, I/O error)."""


class SpoolCorrupt(SpoolError):
    """A spool entry is truncated or unparsable; it is quarantined, never delivered."""


class DnsError(RelayError):
    """A name could not be resolved; `reply` says what a DSN or log should say."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        super().__init__(str(reply))


class SigningError(RelayError):
    """A message for `domain` could not be signed; the client is told to try later."""

    def __init__(self, domain: str, reason: str) -> None:
        self.domain = domain
        super().__init__(reason)


class ClusterUnavailable(RelayError, ConnectionError):
    """The cluster's Redis did not answer in time; the caller falls back to local state."""


class DnsTemporaryError(DnsError):
    """The answer may differ later (SERVFAIL, timeout)."""


class DnsPermanentError(DnsError):
    """The destination does not exist or accepts no mail (NXDOMAIN, null MX)."""


class DeliveryError(RelayError):
    """Delivery to a destination failed; `reply` is the remote answer or a local one."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        super().__init__(str(reply))


class TransientDeliveryError(DeliveryError):
    """Worth trying again later."""


class DestinationUnreachable(TransientDeliveryError):
    """Every MX host failed to connect or greet: back off the destination as a whole."""


class PermanentDeliveryError(DeliveryError):
    """Trying again cannot help."""
