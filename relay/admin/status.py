"""The status page (SPEC §12): `GET /` on the admin port, one server-rendered HTML page.

It answers "is a provider throttling us, and what did we do about it?" on a phone: queue
depth per provider, class and state (read from the same collector as `relay_queue_depth`,
so the page and Prometheus never disagree), suspensions with their reason and time left,
the limits in force, tripped accounts, the last deferrals, and a search by message ID.

No JavaScript at all: the Content-Security-Policy below forbids scripts outright, so even
a reply text that slipped past `html.escape` could not run. Everything that comes from
outside (replies, addresses, headers, IDs typed in the search box) is escaped where it is
written into the page, by `_e`.

Access is the API's token, carried in a cookie once the login form has checked it:
- The cookie holds an HMAC of the token, not the token: it opens this page and nothing
  else (the guard accepts it for `GET /` only), so a cookie read from a browser profile
  cannot drive the mutating API. Cookies ignore ports, so another service on localhost
  receives it too; what it receives is worth only this read-only page.
- HttpOnly (no script reads it) and SameSite=Strict (no other site's link or form sends
  it). The POST to /login is the one form-encoded mutation: it still passes the Host and
  Origin checks, so a page elsewhere cannot post to it.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import logging
import time
import urllib.parse
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from relay.admin.explain import limit_json, limit_phrase, span
from relay.admin.service import NotFound
from relay.clock import Clock
from relay.config.model import Config, Shaping
from relay.delivery.lane import Lane
from relay.queue.deferrals import RecentDeferrals
from relay.routing.router import DEFAULT_PROVIDER
from relay.shaping.shaper import Limit

log = logging.getLogger("relay.admin")

PAGE, LOGIN, LOGOUT = "/", "/login", "/logout"
COOKIE = "relay_status"
COOKIE_AGE = 12 * 3600  # an operator's shift: a browser left logged in forgets it
STATES = ("ready", "active", "deferred", "held")
MAX_LANES = 100  # a fan-out opens a lane per site: the page lists the first ones, says how many
TRIPPED = "relay_account_guard_tripped"  # {account}: 1 while the account guard holds it
TIMES = ("next_attempt", "until")  # timeline fields that are instants (besides *_at)
MAX_ID = 200  # longer is no message ID; the search echoes at most this much

# Nothing loads from anywhere, no script runs, no other site may frame the page
# (clickjacking the logout link or the search), and no Referer takes a message ID to
# another site. Not `no-referrer`: under it a browser sends `Origin: null` with the login
# form, which the Origin check rightly refuses.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 auto;max-width:70em;padding:.5em;color:#222}
h1{font-size:1.3em;margin:.3em 0}h2{font-size:1.1em;margin:1.2em 0 .3em;
border-bottom:1px solid #ccc}
.scroll{overflow-x:auto}table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.2em .5em;border-bottom:1px solid #eee;vertical-align:top}
th{white-space:nowrap}td.n,th.n{text-align:right}td.reply{word-break:break-word}
.bad{color:#a00;font-weight:600}.warn{color:#a60}.muted{color:#777}
form.search{display:flex;gap:.3em}form.search input{flex:1;min-width:0;font-size:1em;padding:.3em}
button{font-size:1em;padding:.3em .8em}pre{white-space:pre-wrap;word-break:break-all}
header{display:flex;justify-content:space-between;align-items:baseline;flex-wrap:wrap}
@media (max-width:600px){body{font-size:13px}th,td{padding:.15em .3em}}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def cookie_for(token: str) -> str:
    """The cookie that stands for `token` on this page (see the module docstring)."""
    return hmac.new(token.encode("utf-8"), b"relay status page", hashlib.sha256).hexdigest()


def cookie_opens(request: web.Request, token: str) -> bool:
    """The request carries the page's cookie, and asks for the page itself: nothing else
    is opened by a cookie."""
    if request.path != PAGE or request.method not in ("GET", "HEAD"):
        return False
    given = request.cookies.get(COOKIE)
    if not given:
        return False
    return hmac.compare_digest(given.encode("utf-8", "replace"), cookie_for(token).encode("ascii"))


def _when(timestamp: float, now: float | None = None) -> str:
    """UTC, as the logs have it; the time of day alone when it is on the day of `now`
    (a narrow column on a phone)."""
    moment = time.gmtime(timestamp)
    if now is not None and moment[:3] == time.gmtime(now)[:3]:
        return time.strftime("%H:%M:%SZ", moment)
    return time.strftime("%Y-%m-%d %H:%M:%SZ", moment)


def _detail(key: str, value: object) -> str:
    """A timeline value as a person reads it: lists joined, instants as UTC times."""
    if isinstance(value, list | tuple):
        return ", ".join(str(item) for item in value)
    instant = key in TIMES or key.endswith("_at")
    if instant and isinstance(value, int | float) and not isinstance(value, bool):
        return _when(value)
    return str(value)


def _table(head: list[str], rows: list[list[str]], numeric: Iterable[int] = ()) -> str:
    """A table of cells that are already HTML (each caller escapes what it puts in)."""
    right = set(numeric)
    cells = "".join(f"<th{' class=n' if i in right else ''}>{h}</th>" for i, h in enumerate(head))
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=n' if i in right else ''}>{c}</td>" for i, c in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<div class=scroll><table><tr>{cells}</tr>{body}</table></div>"


def _message_link(message_id: str) -> str:
    href = "/?" + urllib.parse.urlencode({"id": message_id})
    return f'<a href="{_e(href)}">{_e(message_id)}</a>'


def _document(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>{body}</body></html>"
    )


def _respond(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", headers=HEADERS)


def login_page(status: int = 401, problem: str | None = None) -> web.Response:
    """The form that asks for the token; `problem` says why it is shown again."""
    note = f"<p class=bad>{_e(problem)}</p>" if problem else ""
    body = (
        "<h1>relay status</h1>"
        "<p>Log in with the admin token: <code>admin.token</code>, or the file "
        "<code>admin.token</code> in the spool directory.</p>"
        f"{note}<form method=post action={LOGIN} class=search>"
        "<input type=password name=token autocomplete=current-password required "
        'aria-label="admin token" placeholder="admin token" autofocus>'
        "<button type=submit>Log in</button></form>"
    )
    return _respond(_document("relay status: log in", body), status)


class StatusPage:
    """Renders the page from what it is given: read-only views of the queue, the lanes,
    the metrics registry and the recent deferrals."""

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        lanes: Callable[[], Iterable[Lane]],
        registry: CollectorRegistry,
        deferrals: RecentDeferrals,
        show: Callable[[str], dict[str, Any]],
        clock: Clock,
    ) -> None:
        self._config = config  # the current one: a reload replaces it
        self._lanes = lanes
        self._registry = registry
        self._deferrals = deferrals
        self._show = show
        self._clock = clock

    def render(self, message_id: str | None) -> str:
        now = self._clock.time()
        families = self._families()
        lanes = sorted(self._lanes(), key=lambda lane: lane.key)
        config = self._config()
        body = [
            "<header><h1>relay status</h1>"
            f"<span class=muted>{_e(config.hostname)} · {_when(now)} · "
            f'<a href="{LOGOUT}">log out</a></span></header>',
            '<form class=search method=get action="/">'
            '<input type=search name=id aria-label="message ID" placeholder="message ID" '
            f'value="{_e((message_id or "")[:MAX_ID])}"><button type=submit>Show</button></form>',
        ]
        if message_id:
            body.append(self._message(message_id[:MAX_ID], now))
        body += [
            self._queues(config, families),
            self._pauses(lanes, now),
            self._limits(config, lanes),
            self._accounts(families),
            self._recent(now),
        ]
        return _document("relay status", "".join(body))

    def _families(self) -> dict[str, Metric]:
        """The gauges the page shows, collected as a scrape collects them."""
        wanted = ("relay_queue_depth", "relay_queue_oldest_age_seconds", TRIPPED)
        return {m.name: m for m in self._registry.collect() if m.name in wanted}

    # sections

    def _queues(self, config: Config, families: dict[str, Metric]) -> str:
        depth: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
        family = families.get("relay_queue_depth")
        for sample in family.samples if family else []:
            labels = sample.labels
            depth[(labels["provider"], labels["class"])][labels["state"]] = sample.value
        oldest: dict[tuple[str, str], float] = {}
        family = families.get("relay_queue_oldest_age_seconds")
        for sample in family.samples if family else []:
            oldest[(sample.labels["provider"], sample.labels["class"])] = sample.value
        providers = [p.name for p in config.providers] + [DEFAULT_PROVIDER]
        providers += sorted({p for p, _ in depth} - set(providers))  # e.g. one removed by reload
        rows = []
        for provider in providers:
            classes = sorted(c for p, c in depth if p == provider and any(depth[(p, c)].values()))
            if not classes:
                rows.append([_e(provider), "<span class=muted>empty</span>", "", "", "", "", ""])
                continue
            for class_name in classes:
                counts = depth[(provider, class_name)]
                age = oldest.get((provider, class_name), 0.0)
                rows.append(
                    [_e(provider), _e(class_name)]
                    + [f"{int(counts.get(state, 0)):,}" for state in STATES]
                    + [span(age) if age else ""]
                )
        head = ["provider", "class", *STATES, "oldest"]
        return "<h2>Queues</h2>" + _table(head, rows, numeric=range(2, 7))

    def _pauses(self, lanes: list[Lane], now: float) -> str:
        rows = []
        for lane in lanes:
            reason = lane.suspended
            if reason is None:
                continue
            until = lane.suspended_until
            left = span(until - now) if until is not None else ""
            rows.append([_e(lane.key), "<span class=bad>suspended</span>", _e(reason), left])
        for lane in lanes:
            if lane.suspended is not None:
                continue
            for limit in map(limit_json, lane.limits()):
                if limit["why"] == "configured":
                    continue
                left = span(limit["until"] - now) if limit["until"] is not None else ""
                what = limit_phrase(limit, now, _when)
                state = "<span class=warn>throttled</span>"
                rows.append([_e(lane.key), state, _e(what), left])
        if not rows:
            return "<h2>Suspensions and throttles</h2><p class=muted>none</p>"
        head = ["queue", "state", "reason", "time left"]
        return "<h2>Suspensions and throttles</h2>" + _table(head, rows[:MAX_LANES])

    def _limits(self, config: Config, lanes: list[Lane]) -> str:
        rows = []
        live = {lane.key for lane in lanes}
        for provider in config.providers:
            if provider.name not in live and not any(
                lane.queue.provider == provider.name for lane in lanes
            ):
                rows.append(self._limit_row(provider.name, provider.shaping, None, None, None))
        shown = [lane for lane in lanes if lane.queue.provider != DEFAULT_PROVIDER]
        shown += [lane for lane in lanes if lane.queue.provider == DEFAULT_PROVIDER]
        for lane in shown[:MAX_LANES]:
            connections, rate = lane.limits()
            rows.append(
                self._limit_row(lane.key, lane.shaping, connections, rate, lane.connections)
            )
        rows.sort(key=lambda row: row[0])
        more = len(shown) - MAX_LANES
        note = f"<p class=muted>and {more:,} more lanes</p>" if more > 0 else ""
        defaults = config.defaults
        note += (
            "<p class=muted>Other domains: default limits, max_connections "
            f"{defaults.max_connections}, rate {_e(defaults.rate or 'unlimited')}.</p>"
        )
        head = ["queue", "connections open", "max_connections now / configured", "rate"]
        return "<h2>Limits in force</h2>" + _table(head, rows, numeric=(1,)) + note

    @staticmethod
    def _limit_row(
        key: str,
        shaping: Shaping,
        connections: Limit | None,
        rate: Limit | None,
        open_now: int | None,
    ) -> list[str]:
        configured = shaping.max_connections
        current = configured if connections is None else connections.value
        cell = f"{current} / {configured}"
        if connections is not None and connections.why != "configured":
            cell = f"<span class=warn>{cell} ({_e(connections.why)})</span>"
        value = rate.value if rate is not None else shaping.rate
        rate_now = _e(value or "unlimited")
        if rate is not None and rate.why != "configured":
            configured_rate = _e(shaping.rate or "unlimited")
            rate_now = f"<span class=warn>{rate_now} of {configured_rate} ({_e(rate.why)})</span>"
        return [_e(key), "0" if open_now is None else str(open_now), cell, rate_now]

    def _accounts(self, families: dict[str, Metric]) -> str:
        # Read from the account guard's gauge (SPEC §12), so the page and alerts agree.
        # Without configured accounts the family is absent: none can be tripped.
        family = families.get(TRIPPED)
        tripped = sorted(s.labels["account"] for s in family.samples if s.value) if family else []
        if not tripped:
            return "<h2>Tripped accounts</h2><p class=muted>none</p>"
        items = "".join(f"<li class=bad>{_e(name)}</li>" for name in tripped)
        return f"<h2>Tripped accounts</h2><ul>{items}</ul>"

    def _recent(self, now: float) -> str:
        latest = self._deferrals.latest()
        if not latest:
            return "<h2>Last deferrals</h2><p class=muted>none since the start</p>"
        rows = [
            [
                _when(d.time, now),
                _message_link(d.message_id),
                _e(d.recipient),
                _e(d.provider),
                f"<span class=reply>{_e(d.reply)}</span>",
            ]
            for d in latest
        ]
        head = ["time (UTC)", "message", "recipient", "provider", "reply"]
        title = "Last deferral" if len(latest) == 1 else f"Last {len(latest)} deferrals"
        return f"<h2>{title}</h2>" + _table(head, rows)

    def _message(self, message_id: str, now: float) -> str:
        try:
            answer = self._show(message_id)
        except NotFound:
            return (
                f"<h2>Message {_e(message_id)}</h2>"
                "<p class=bad>Not in the queue: no such ID, or it is finished.</p>"
            )
        fields = [
            ("sender", f"<{answer.get('sender', '')}>"),
            ("size", f"{answer.get('size', 0):,} bytes"),
            ("arrival", _when(float(answer.get("arrival", 0)))),
            ("class", answer.get("class")),
            ("account", answer.get("account")),
            ("held", "yes" if answer.get("held") else "no"),
        ]
        summary = "".join(f"<tr><th>{name}</th><td>{_e(value)}</td></tr>" for name, value in fields)
        recipients = [
            [
                _e(r.get("address")),
                _e(r.get("provider") or ""),
                _e(r.get("state")),
                str(int(r.get("attempts") or 0)),
                _e(_when(r["next_attempt"])) if r.get("next_attempt") else "",
                f"<span class=reply>{_e(r.get('last_reply') or '')}</span>",
            ]
            for r in answer.get("recipients", [])
        ]
        head = ["recipient", "provider", "state", "attempts", "next attempt", "last reply"]
        parts = [
            f"<h2>Message {_e(answer.get('id', message_id))}</h2>",
            f"<div class=scroll><table>{summary}</table></div>",
            "<h3>Recipients</h3>",
            _table(head, recipients, numeric=(3,)),
        ]
        timeline = answer.get("timeline")
        if isinstance(timeline, list):
            parts.append("<h3>Timeline</h3>" + self._timeline(timeline))
        headers = answer.get("headers")
        if headers:
            parts.append(f"<details><summary>Headers</summary><pre>{_e(headers)}</pre></details>")
        return "".join(parts)

    @staticmethod
    def _timeline(events: list[Any]) -> str:
        """Each event as time, name, and whatever else it carries as key=value: the
        recorder adds fields (MX, TLS, reply, rule) that the page need not know."""
        rows = []
        for event in events:
            if not isinstance(event, dict):
                rows.append(["", "", _e(event)])
                continue
            moment = event.get("time")
            when = _when(moment) if isinstance(moment, int | float) else _e(moment or "")
            details = "; ".join(
                f"{_e(key)}={_e(_detail(key, value))}"
                for key, value in event.items()
                if key not in ("time", "event") and value not in (None, "", [])
            )
            rows.append([when, _e(event.get("event", "")), f"<span class=reply>{details}</span>"])
        if not rows:
            return "<p class=muted>no events yet</p>"
        return _table(["time", "event", "details"], rows)


def add_routes(app: web.Application, page: StatusPage, token: Callable[[], str]) -> None:
    """GET / (the guard has let it through: bearer token or cookie), POST /login and
    GET /logout (open to all: the first checks the token itself, the second only makes
    the browser forget its cookie)."""

    async def status(request: web.Request) -> web.Response:
        return _respond(page.render(request.query.get("id", "").strip() or None))

    async def login(request: web.Request) -> web.Response:
        if request.content_type != "application/x-www-form-urlencoded":
            return login_page(415, "the login form posts application/x-www-form-urlencoded")
        form = await request.post()
        given = form.get("token")
        expected = token()
        if not isinstance(given, str) or not hmac.compare_digest(
            given.strip().encode("utf-8", "replace"), expected.encode("utf-8")
        ):
            log.warning("status page: wrong token from %s", request.remote)
            return login_page(401, "That is not the admin token.")
        response = web.Response(status=303, headers={"Location": PAGE, **HEADERS})
        response.set_cookie(
            COOKIE, cookie_for(expected), max_age=COOKIE_AGE, httponly=True, samesite="Strict"
        )
        return response

    async def logout(_: web.Request) -> web.Response:
        response = web.Response(status=303, headers={"Location": PAGE, **HEADERS})
        response.del_cookie(COOKIE, httponly=True, samesite="Strict")
        return response

    app.router.add_get(PAGE, status)
    app.router.add_post(LOGIN, login)
    app.router.add_get(LOGOUT, logout)
