"""A replay report as a table for people and as one JSON document for scripts."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, TextIO

from relay.replay.judge import Report, Row, RuleRef, Start, by_provider, changes, matched


def stamp(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rule(ref: RuleRef | None) -> dict[str, Any] | None:
    if ref is None:
        return None
    rule = ref.rule
    return {
        "key": ref.key,
        "match": rule.pattern.pattern,
        "action": rule.action,
        "for": rule.duration,
        "rate": str(rule.rate) if rule.rate is not None else None,
        "max_connections": rule.max_connections,
    }


def _start(start: Start) -> dict[str, Any]:
    return {
        "provider": start.provider,
        "at": stamp(start.at),
        "rule": _rule(start.rule),
        "reply": str(start.reply),
        "attempts_inside": start.inside,
    }


def _row(row: Row) -> dict[str, Any]:
    return {
        "reply": str(row.reply),
        "local": not row.reply.remote,
        "count": row.count,
        "then": row.then.value,
        "now": row.now.value,
        "changed": row.changed,
        "rule": _rule(row.rule),
    }


def as_json(report: Report) -> dict[str, Any]:
    return {
        "config": report.config,
        "files": report.files,
        "lines": report.lines,
        "deliveries": report.deliveries,
        "skipped": {"other": report.other, "malformed": report.malformed},
        "providers": [
            {
                "provider": name,
                "in_config": name not in report.unknown,
                "replies": list(map(_row, rows)),
            }
            for name, rows in by_provider(report).items()
        ],
        "changes": [
            {
                "provider": c.provider,
                "then": c.then.value,
                "now": c.now.value,
                "rule": _rule(c.rule),
                "count": c.count,
            }
            for c in changes(report)
        ],
        "rules_matched": [{**(_rule(ref) or {}), "count": n} for ref, n in matched(report)],
        "suspensions": [_start(s) for s in report.suspensions],
        "throttles": [_start(s) for s in report.throttles],
        "suspensions_then": dict(sorted(report.suspended_then.items())),
        "throttles_then": dict(sorted(report.throttled_then.items())),
        "not_in_config": dict(sorted(report.unknown.items())),
    }


def _arrow(out: TextIO) -> str:
    """An arrow the terminal can show: a C locale without UTF-8 gets "->"."""
    try:
        "→".encode(out.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "->"
    return "→"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def render(report: Report, out: TextIO) -> None:
    """Per provider each distinct reply (then, now, deciding rule), then a summary."""
    arrow = _arrow(out)
    print(
        f"replay of {_plural(len(report.files), 'log file')} under {report.config}: "
        f"{_plural(report.deliveries, 'delivery attempt')}; skipped "
        f"{report.other} other {'entry' if report.other == 1 else 'entries'} "
        f"and {_plural(report.malformed, 'malformed line')}",
        file=out,
    )
    if not report.rows:
        print(
            "no delivery attempts found: replay reads the JSON log that "
            "`relay serve --log-format json` writes",
            file=out,
        )
        return
    for provider, rows in by_provider(report).items():
        note = " (not in the config: judged under defaults and global rules)"
        print(f"\n{provider}{note if provider in report.unknown else ''}", file=out)
        table = [("count", "then", "", "now", "rule", "reply")]
        for r in rows:
            rule = f"{r.rule.key} {r.rule.rule.action}" if r.rule is not None else "-"
            local = "" if r.reply.remote else "[relay's own] "
            verdicts = (r.then.value, arrow if r.changed else "=", r.now.value)
            table.append((str(r.count), *verdicts, rule, f"{local}{r.reply}"))
        widths = [max(len(cells[i]) for cells in table) for i in range(5)]
        for cells in table:
            head = "  ".join(
                c.rjust(w) if i == 0 else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells[:5], widths, strict=True))
            )
            print(f"  {head}  {cells[5]}".rstrip(), file=out)
    _summary(report, out, arrow)


def _summary(report: Report, out: TextIO, arrow: str) -> None:
    print("\nsummary", file=out)
    changed = changes(report)
    print(f"  verdicts that change: {sum(c.count for c in changed) or 'none'}", file=out)
    for c in changed:
        by = f"by {c.rule.describe()}" if c.rule is not None else "by the reply code, no rule"
        print(f"    {c.provider}: {c.count} {c.then.value} {arrow} {c.now.value} {by}", file=out)
    rules = matched(report)
    print(f"  rules that would match: {len(rules) or 'none'}", file=out)
    for ref, count in rules:
        print(f"    {ref.describe()}: {_plural(count, 'attempt')}", file=out)
    for title, starts, then in (
        ("suspensions", report.suspensions, report.suspended_then),
        ("throttles", report.throttles, report.throttled_then),
    ):
        print(f"  {title} that would start: {len(starts) or 'none'}", file=out)
        for s in starts:
            print(f"    {s.provider} at {stamp(s.at)} by {s.rule.describe()}", file=out)
            print(f"      on {s.reply}", file=out)
            inside = _plural(s.inside, "later attempt")
            print(f"      {inside} of {s.provider} recorded while it would be in force", file=out)
        if then:
            logged = ", ".join(f"{p} {n}" for p, n in sorted(then.items()))
            print(f"    ({title} the log records then: {logged})", file=out)
    if report.unknown:
        names = ", ".join(
            f"{p} ({_plural(n, 'attempt')})" for p, n in sorted(report.unknown.items())
        )
        print(f"  providers the config does not name: {names}", file=out)
