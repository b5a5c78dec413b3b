"""The one place that decides what a remote reply means for a recipient.

Rules first (provider's own, then global), then the reply code (SPEC §5).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relay.config.model import Rule
from relay.reply import Reply, Verdict


@dataclass(frozen=True, slots=True)
class Classification:
    verdict: Verdict
    rule: Rule | None = None


def classify(reply: Reply, rules: tuple[Rule, ...]) -> Classification:
    if not reply.is_success:
        text = str(reply)
        for rule in rules:
            if rule.pattern.search(text):
                if rule.action == "bounce":
                    return Classification(Verdict.BOUNCED, rule)
                # retry, suspend and throttle all keep the mail for a later attempt
                return Classification(Verdict.DEFERRED, rule)
    return Classification(reply.default_verdict())


# "421 ... too many connections" in the words receivers use (Postfix's
# smtpd_client_connection_count_limit, Exim, Sendmail, Orange's "Trop de connexions").
_TOO_MANY = re.compile(
    r"too many (?:\w+ ){0,2}(?:connections|sessions)"
    r"|trop de connexions|connection (?:count )?limit|concurrent connections? limit",
    re.IGNORECASE,
)


def throttle_kind(reply: Reply, rule: Rule | None) -> bool:
    """The destination asks for fewer of us (SPEC §12): a `throttle` rule matched, or a
    421 that says there are too many connections. Adaptive limits halve on it."""
    if rule is not None and rule.action == "throttle":
        return True
    return reply.code == 421 and reply.remote and bool(_TOO_MANY.search(reply.text))
