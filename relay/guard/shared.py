"""An account guard's trip or release as the nodes of a cluster tell each other (SPEC §9:
account guards are cluster-wide). Nodes share decisions, not counts: each judges the
mail it takes against the baseline it learnt from that same share, and a trip on any
node holds (or refuses) the account on all until one of them releases it.

One frozen value, serialised as JSON, like relay/shaping/lanestate.py's lane events.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Literal, Protocol

Kind = Literal["trip", "release"]


@dataclass(frozen=True, slots=True)
class GuardEvent:
    account: str
    kind: Kind
    at: float  # wall clock: a later event replaces an earlier one
    reason: str = ""  # a trip's, as `relay account list` shows it
    node: str = ""  # where it happened

    @property
    def until(self) -> float:
        """A trip holds until a release, however long that takes."""
        return math.inf if self.kind == "trip" else 0.0

    def key(self) -> str:
        return self.account

    def from_node(self, node: str) -> GuardEvent:
        return replace(self, node=node)

    def dumps(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def loads(cls, raw: str | bytes) -> GuardEvent:
        """Raises ValueError for anything that is not an event of ours."""
        try:
            data = json.loads(raw)
            kind = data["kind"]
            if kind not in ("trip", "release"):
                raise ValueError(f"unknown kind {kind!r}")
            return cls(
                str(data["account"]),
                kind,
                float(data["at"]),
                str(data.get("reason", "")),
                str(data.get("node", "")),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a guard event: {exc}") from None


class GuardAnnouncer(Protocol):
    def announce(self, event: GuardEvent) -> None:
        """Tell the other nodes; never waits, never fails (Redis may be down)."""
        ...
