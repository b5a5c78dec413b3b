"""The one place that decides what a remote reply means for a recipient.

Rules first (provider's own, then global), then the reply code (SPEC §5).
"""

from __future__ import annotations

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
