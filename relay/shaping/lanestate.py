"""A lane's state change as nodes of a cluster tell each other (SPEC §9): a provider
suspended, resumed, throttled, or its limits changed (adaptive limits send `limit`).

One frozen value, serialised as JSON: it is published on Redis pub/sub and kept in a
Redis hash, so a node that missed the message reads it back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Literal, Protocol

Kind = Literal["suspend", "resume", "throttle", "limit"]
KINDS: tuple[Kind, ...] = ("suspend", "resume", "throttle", "limit")


@dataclass(frozen=True, slots=True)
class LaneEvent:
    lane: str  # the queue key ("orange", "default:mx.example.net", "orange@lists")
    kind: Kind
    at: float  # wall clock of the change: a later event replaces an earlier one
    until: float = 0.0  # wall clock; suspend, throttle and limit hold until then
    reason: str = ""
    rate: str | None = None  # throttle, limit: "60/min" as written in the config
    max_connections: int | None = None
    node: str = ""  # where it happened

    def key(self) -> str:
        """One stored event per lane and kind: a resume replaces the suspension it ends;
        throttles and limits are kept apart."""
        kind = "suspend" if self.kind == "resume" else self.kind
        return f"{self.lane} {kind}"

    def from_node(self, node: str) -> LaneEvent:
        return replace(self, node=node)

    def dumps(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def loads(cls, raw: str | bytes) -> LaneEvent:
        """Raises ValueError for anything that is not an event of ours."""
        try:
            data = json.loads(raw)
            kind = data["kind"]
            if kind not in KINDS:
                raise ValueError(f"unknown kind {kind!r}")
            return cls(
                lane=str(data["lane"]),
                kind=kind,
                at=float(data["at"]),
                until=float(data.get("until", 0.0)),
                reason=str(data.get("reason", "")),
                rate=None if data.get("rate") is None else str(data["rate"]),
                max_connections=(
                    None if data.get("max_connections") is None else int(data["max_connections"])
                ),
                node=str(data.get("node", "")),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a lane event: {exc}") from None


class LaneAnnouncer(Protocol):
    def announce(self, event: LaneEvent) -> None:
        """Tell the other nodes; never waits, never fails (Redis may be down)."""
        ...


class LaneStateSink(Protocol):
    def apply_shared(self, event: LaneEvent) -> None:
        """Another node changed a lane: do the same here, without announcing it back."""
        ...
