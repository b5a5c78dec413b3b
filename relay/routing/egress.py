"""Which sending source a recipient's mail leaves from (SPEC §14).

Most specific first: the account, then the class, then the provider, then
`default_egress`. One place decides, for routing and for `relay check-config` alike.
"""

from __future__ import annotations

from relay.config.model import Config, Egress


def choose(config: Config, account: str | None, class_name: str, provider: str | None) -> Egress:
    by_account = config.account(account) if account else None
    if by_account is not None and by_account.egress:
        return config.egress[by_account.egress]
    traffic = config.classes.get(class_name)
    if traffic is not None and traffic.egress:
        return config.egress[traffic.egress]
    for candidate in config.providers:
        if candidate.name == provider and candidate.egress:
            return config.egress[candidate.egress]
    return config.egress[config.default_egress]
