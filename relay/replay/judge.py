"""Each recorded reply judged under NEW.yaml, gathered into a report.

Rows group the attempts of one provider with the same reply and the same verdict then:
the same reply under the same rules is judged the same way, so a log of a million
attempts is classified once per distinct reply, and the report stays that small.
"""

from __future__ import annotations

import bisect
from array import array
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from relay.config.model import Config, Rule
from relay.delivery.classify import classify
from relay.replay.logfile import Other, Recorded, lines, read_line
from relay.reply import Reply, Verdict
from relay.routing.router import DEFAULT_PROVIDER


def duration(seconds: float) -> str:
    """In the YAML's own units: 30m, 24h, 90s."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


@dataclass(frozen=True, slots=True)
class RuleRef:
    """A rule of NEW.yaml and the key path it is written at."""

    key: str  # providers.laposte.rules[0], defaults.rules[1], rules[2]
    rule: Rule

    def describe(self) -> str:
        rule = self.rule
        parts = [f"match '{rule.pattern.pattern}'", rule.action]
        if rule.duration is not None:
            parts.append(f"for {duration(rule.duration)}")
        if rule.rate is not None:
            parts.append(f"rate {rule.rate}")
        if rule.max_connections is not None:
            parts.append(f"max_connections {rule.max_connections}")
        return f"{self.key} ({', '.join(parts)})"


@dataclass(slots=True)
class Row:
    """Attempts of one provider with the same reply and the same verdict then."""

    provider: str
    reply: Reply
    then: Verdict
    now: Verdict
    rule: RuleRef | None  # the rule of NEW.yaml that decides; None: the reply code does
    count: int = 0

    @property
    def changed(self) -> bool:
        return self.now is not self.then


@dataclass(frozen=True, slots=True)
class Start:
    """A suspension or throttle that NEW.yaml would start."""

    provider: str
    at: float
    rule: RuleRef
    reply: Reply
    inside: int  # later attempts recorded while it would have been in force


@dataclass(slots=True)
class Report:
    config: str
    files: list[str]
    lines: int = 0  # non-blank lines read
    other: int = 0  # log entries that are not delivery attempts
    malformed: int = 0  # not a JSON object, or a delivery entry that cannot be read
    rows: dict[tuple[str, str, bool, Verdict], Row] = field(default_factory=dict)
    unknown: Counter[str] = field(default_factory=Counter)  # providers NEW.yaml lacks
    suspended_then: Counter[str] = field(default_factory=Counter)  # logged by the daemon
    throttled_then: Counter[str] = field(default_factory=Counter)
    suspensions: list[Start] = field(default_factory=list)
    throttles: list[Start] = field(default_factory=list)

    @property
    def deliveries(self) -> int:
        return sum(row.count for row in self.rows.values())


class Judge:
    """The rules a lane of NEW.yaml would hold for each provider, in classify's order."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._providers = {p.name: p for p in config.providers}
        self._refs: dict[int, RuleRef] = {}  # by identity: two rules may be equal
        for provider in config.providers:
            self._name(f"providers.{provider.name}.rules", provider.shaping.rules)
        self._name("defaults.rules", config.defaults.rules)
        self._name("rules", config.rules)

    def _name(self, prefix: str, rules: tuple[Rule, ...]) -> None:
        for index, rule in enumerate(rules):
            self._refs[id(rule)] = RuleRef(f"{prefix}[{index}]", rule)

    def knows(self, provider: str) -> bool:
        return provider in self._providers or provider == DEFAULT_PROVIDER

    def rules(self, provider: str) -> tuple[Rule, ...]:
        """As delivery/lane.py builds them: the queue's shaping rules, then the global
        ones. Mail of a provider NEW.yaml no longer names would go to `defaults`."""
        known = self._providers.get(provider)
        shaping = known.shaping if known is not None else self._config.defaults
        return shaping.rules + self._config.rules

    def judge(self, provider: str, reply: Reply) -> tuple[Verdict, RuleRef | None]:
        result = classify(reply, self.rules(provider))
        rule = self._refs[id(result.rule)] if result.rule is not None else None
        return result.verdict, rule


@dataclass(slots=True)
class _Timeline:
    """Per provider: when attempts were recorded, and which would start a pause."""

    times: array[float] = field(default_factory=lambda: array("d"))
    events: list[tuple[float, RuleRef, Reply]] = field(default_factory=list)


def replay(config: Config, config_path: str, paths: list[str]) -> Report:
    """Read every file and judge each delivery attempt; OSError when a file cannot be
    read."""
    judge = Judge(config)
    report = Report(config_path, list(paths))
    timelines: dict[str, _Timeline] = defaultdict(_Timeline)
    for path in paths:
        for line in lines(path):
            if line is not None and not line.strip():
                continue
            report.lines += 1
            found = read_line(line) if line is not None else None
            if found is None:
                report.malformed += 1
            elif isinstance(found, Other):
                report.other += 1
                if found.kind == "suspend":
                    report.suspended_then[found.provider] += 1
                elif found.kind == "throttle":
                    report.throttled_then[found.provider] += 1
            else:
                _count(report, judge, timelines, found)
    for provider, timeline in sorted(timelines.items()):
        report.suspensions += _starts(provider, timeline, "suspend")
        report.throttles += _starts(provider, timeline, "throttle")
    return report


def _count(
    report: Report, judge: Judge, timelines: dict[str, _Timeline], recorded: Recorded
) -> None:
    reply = recorded.reply
    key = (recorded.provider, str(reply), reply.remote, recorded.then)
    row = report.rows.get(key)
    if row is None:
        now, rule = judge.judge(recorded.provider, reply)
        row = report.rows[key] = Row(recorded.provider, reply, recorded.then, now, rule)
    row.count += 1
    if not judge.knows(recorded.provider):
        report.unknown[recorded.provider] += 1
    if recorded.at is not None:
        timeline = timelines[recorded.provider]
        timeline.times.append(recorded.at)
        if row.rule is not None and row.rule.rule.action in ("suspend", "throttle"):
            timeline.events.append((recorded.at, row.rule, reply))


def _starts(provider: str, timeline: _Timeline, action: str) -> list[Start]:
    """Pauses NEW.yaml would start, in time order. A reply recorded while one would be in
    force starts no other: a suspended provider is not even asked (that reply would not
    have come), and a throttle renewed is the same throttle (shaping/shaper.py)."""
    times = sorted(timeline.times)
    starts: list[Start] = []
    until = float("-inf")
    for at, ref, reply in sorted(timeline.events, key=lambda e: e[0]):
        if ref.rule.action != action or at < until:
            continue
        until = at + (ref.rule.duration or 0.0)
        inside = bisect.bisect_left(times, until) - bisect.bisect_right(times, at)
        starts.append(Start(provider, at, ref, reply, inside))
    return starts


def by_provider(report: Report) -> dict[str, list[Row]]:
    """Rows per provider: changed ones first, then the most frequent."""
    grouped: dict[str, list[Row]] = defaultdict(list)
    for row in report.rows.values():
        grouped[row.provider].append(row)
    for rows in grouped.values():
        rows.sort(key=lambda r: (not r.changed, -r.count, str(r.reply)))
    return dict(sorted(grouped.items()))


def matched(report: Report) -> list[tuple[RuleRef, int]]:
    """Each rule of NEW.yaml that would decide some attempt, with how many."""
    counts: dict[str, tuple[RuleRef, int]] = {}
    for row in report.rows.values():
        if row.rule is not None:
            ref, count = counts.get(row.rule.key, (row.rule, 0))
            counts[row.rule.key] = (ref, count + row.count)
    return sorted(counts.values(), key=lambda item: item[0].key)


@dataclass(frozen=True, slots=True)
class Change:
    provider: str
    then: Verdict
    now: Verdict
    rule: RuleRef | None  # None: the code decides now, where a rule of the old config did
    count: int


def changes(report: Report) -> list[Change]:
    """Verdicts that change, per provider, direction and deciding rule."""
    totals: Counter[tuple[str, Verdict, Verdict, str]] = Counter()
    refs: dict[str, RuleRef | None] = {}
    for row in report.rows.values():
        if row.changed:
            key = row.rule.key if row.rule is not None else ""
            totals[(row.provider, row.then, row.now, key)] += row.count
            refs[key] = row.rule
    ordered = sorted(totals.items(), key=lambda item: (item[0][0], item[0][3], -item[1]))
    return [Change(p, then, now, refs[key], n) for (p, then, now, key), n in ordered]
