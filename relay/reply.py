"""SMTP replies as values: parse, format, and what a code means."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")


class Verdict(enum.Enum):
    """What a reply means for a recipient."""

    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: `code` 250, `enhanced` "2.0.0" (may be empty), `text` without either."""

    code: int
    enhanced: str
    text: str
    remote: bool = field(default=True, compare=False)  # False: made up here, not by a server

    @classmethod
    def parse(cls, code: int, message: str) -> Reply:
        """Split an enhanced status code (RFC 3463) off the front of `message` if present."""
        message = " ".join(message.split())  # fold multi-line replies onto one line
        match = _ENHANCED.match(message)
        if match and match.group(1) == str(code)[0]:
            return cls(code, message[: match.end()].strip(), message[match.end() :])
        return cls(code, "", message)

    @classmethod
    def local(cls, code: int, enhanced: str, text: str) -> Reply:
        """A reply relay makes up itself (DNS failure, timeout, expiry)."""
        return cls(code, enhanced, text, remote=False)

    @property
    def status(self) -> str:
        """The enhanced status for a DSN, inferred from the basic code when absent."""
        if self.enhanced:
            return self.enhanced
        return {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(self.code // 100, "4.0.0")

    @property
    def is_permanent(self) -> bool:
        return self.code // 100 == 5

    @property
    def is_success(self) -> bool:
        return self.code // 100 == 2

    def default_verdict(self) -> Verdict:
        """2xx delivered, 4xx deferred, 5xx bounced; mailbox full (x.2.2) is deferred."""
        if self.is_success:
            return Verdict.DELIVERED
        if self.is_permanent and self.status != "5.2.2":
            return Verdict.BOUNCED
        return Verdict.DEFERRED

    def __str__(self) -> str:
        parts = [str(self.code)]
        if self.enhanced:
            parts.append(self.enhanced)
        if self.text:
            parts.append(self.text)
        return " ".join(parts)
