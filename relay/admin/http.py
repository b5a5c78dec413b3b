"""The admin HTTP listener (aiohttp): /metrics, /healthz, /readyz and the JSON queue API.

It is given only what it serves: the admin config (a callable, since a reload replaces
it), the `QueueService`, the account guard, a readiness probe, the reload coroutine and
the metrics registry; never the daemon object itself.

Every request passes `_guard` first, in this order (SPEC §12, "Admin API safety"):

1. `Host` names this listener: a loopback name, `admin.address` or the IP the connection
   came in on, with the port it came in on. A browser tricked by DNS rebinding sends the
   attacker's name there (Jupyter, Docker and Consul learnt this the hard way).
2. `Origin`, when a browser sends one, is that same listener: a page elsewhere gets 403
   before anything runs, even a request that needs no answer to do harm.
3. A bearer token, `admin.token` or else the one generated in the spool, for everything
   but /healthz, /readyz and /metrics (the last only on a loopback address or with
   `admin.metrics_public`: queue depths per provider are not for the whole network).
   The status page (`GET /`, status.py) also takes its cookie, which opens nothing else;
   without either, it answers with its login form.
4. POST and DELETE carry `Content-Type: application/json` and a JSON object: an HTML
   form can send neither, and a script elsewhere needs a CORS preflight to, which this
   listener never grants. The one exception is the login form's POST /login, which
   carries the token itself, and has passed the Host and Origin checks like any other.

Then the outcome: `NotFound` → 404, `BadRequest` (the service's, or the request's own
parsing here) → 400, `Busy` → 409, any other exception → 500 with its traceback in the log: a bare
ValueError is a bug to see, not the client's fault.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from relay.admin.service import BadRequest, Busy, NotFound, QueueService
from relay.admin.status import LOGIN, LOGOUT, PAGE, StatusPage, add_routes, cookie_opens, login_page
from relay.admin.token import ensure_token
from relay.config.model import Admin
from relay.config.units import parse_duration
from relay.config.values import is_loopback
from relay.guard import AccountGuard, UnknownAccount

log = logging.getLogger("relay.admin")

AdminConfig = Callable[[], Admin]
Readiness = Callable[[], list[str]]
Reload = Callable[[], Awaitable[list[str]]]
ClusterStatus = Callable[[], Awaitable[dict[str, Any]]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ALWAYS_OPEN = ("/healthz", "/readyz")  # probes from orchestrators carry no secret
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
SAFE_METHODS = ("GET", "HEAD")
MAX_BODY = 64 * 1024  # the largest real body is a transfer's: peer, provider, login
_LIMIT = re.compile(r"^[0-9]{1,7}$")
_AUTHORITY = re.compile(r"\[([0-9A-Fa-f:.]+)\](?::([0-9]{1,5}))?|([^:\[\]@/]+)(?::([0-9]{1,5}))?")
JSON_BODY = web.RequestKey("json_body", dict)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


# Host and Origin


def _normal_host(host: str) -> str:
    """One spelling per host: IP literals through ipaddress (so [0:0::1] is ::1 and
    ::ffff:127.0.0.1 is 127.0.0.1), names lowercased without a trailing dot."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host.lower().rstrip(".")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _split_authority(authority: str) -> tuple[str, int] | None:
    """ "host", "host:port", "[v6]", "[v6]:port" → (normal host, port); None if malformed.
    No port means 80, as HTTP clients leave the default out."""
    match = _AUTHORITY.fullmatch(authority)
    if match is None:
        return None
    host = match.group(1) or match.group(3)
    port = match.group(2) or match.group(4)
    return _normal_host(host), int(port) if port else 80


def _local_end(request: web.Request) -> tuple[str, int] | None:
    """The address and port this connection came in on (the real port even when
    admin.port is 0)."""
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if not sockname:
        return None
    return _normal_host(str(sockname[0])), int(sockname[1])


def _authority_is_ours(authority: str, admin: Admin, local: tuple[str, int]) -> bool:
    parsed = _split_authority(authority)
    if parsed is None:
        return False
    host, port = parsed
    names = {*LOOPBACK_NAMES, _normal_host(admin.address), local[0]}
    return port == local[1] and host in names


def _foreign(request: web.Request, admin: Admin) -> str | None:
    """Why this request is not addressed to us by a client of ours; None if it is."""
    local = _local_end(request)
    if local is None:
        return "connection closed"
    host = request.headers.get("Host")
    if host is None or not _authority_is_ours(host, admin, local):
        return (
            "Host must be this admin listener (localhost, 127.0.0.1, [::1] or admin.address, "
            "with its port)"
        )
    origin = request.headers.get("Origin")
    if origin is not None:
        scheme, _, authority = origin.partition("://")
        if scheme.lower() != "http" or not _authority_is_ours(authority, admin, local):
            return "cross-origin requests are refused"
    return None


# the token


class _Credentials:
    """The token in force: `admin.token` as the current config has it, or else the one
    generated into the spool, read once and kept."""

    def __init__(self, admin: AdminConfig, spool_path: str) -> None:
        self._admin = admin
        self._spool_path = spool_path
        self._generated: str | None = None

    def expected(self) -> str:
        configured = self._admin().token
        if configured:
            return str(configured)
        if self._generated is None:
            self._generated = ensure_token(self._spool_path)
        return self._generated

    def accepts(self, header: str | None) -> bool:
        if header is None:
            return False
        try:
            # aiohttp hands undecodable header bytes over as lone surrogates: back to the
            # bytes that came, which simply do not match.
            given = header.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return False
        scheme, _, value = given.strip().partition(b" ")
        if scheme.lower() != b"bearer":  # the scheme is case-insensitive (RFC 9110 §11.1)
            return False
        return hmac.compare_digest(value.strip(), self.expected().encode("utf-8"))


def _needs_token(path: str, admin: Admin) -> bool:
    if path in ALWAYS_OPEN or path in (LOGIN, LOGOUT):
        return False  # the login form checks the token itself; logout only forgets a cookie
    if path == "/metrics":
        return not (admin.metrics_public or is_loopback(admin.address))
    return True  # every other path, present or future, unknown ones included


# bodies and arguments


def _reject_constant(name: str) -> Any:
    raise BadRequest(f"the request body is not JSON: {name} is not a JSON number")


async def _json_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        raise BadRequest("the request body must be a JSON object ({} when there is nothing to say)")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except BadRequest:
        raise
    except (ValueError, RecursionError):
        # ValueError covers bad UTF-8, bad JSON and an int of more than 4,300 digits
        # (CVE-2020-10735); RecursionError, a body of 50,000 nested brackets.
        raise BadRequest("the request body is not JSON (UTF-8)") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    return data


def _optional_string(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"{key}: expected a string")
    return value or None


def build_app(
    *,
    admin: AdminConfig,
    service: QueueService,
    readiness: Readiness,
    reload: Reload,
    registry: CollectorRegistry,
    spool_path: str,
    status: StatusPage | None = None,
    cluster: ClusterStatus | None = None,
    account_guard: AccountGuard | None = None,
) -> web.Application:
    """The admin application. Without `admin.token`, the token is generated into
    `spool_path` here, so a spool we cannot write stops the start with one sentence."""
    credentials = _Credentials(admin, spool_path)
    credentials.expected()

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        config = admin()
        refusal = _foreign(request, config)
        if refusal is not None:
            return _error(403, refusal)
        if _needs_token(request.path, config) and not (
            credentials.accepts(request.headers.get("Authorization"))
            or (status is not None and cookie_opens(request, credentials.expected()))
        ):
            if status is not None and request.path == PAGE:
                return login_page()  # a browser gets the form, not a JSON error
            return _error(
                401,
                "missing or wrong bearer token (admin.token, or admin.token in the spool "
                "directory when admin.token is not set)",
            )
        # The login form is the one mutation that is not JSON: it carries the token itself.
        form = status is not None and request.path == LOGIN
        mutating = request.method not in SAFE_METHODS and not form
        if mutating and request.content_type != "application/json":
            return _error(415, f"{request.method} needs Content-Type: application/json")
        try:
            if mutating:
                request[JSON_BODY] = await _json_object(request)
            return await handler(request)
        except web.HTTPException:
            raise  # aiohttp's own answers: 404 no route, 405, 413 body too large, 415
        except NotFound as exc:
            return _error(404, str(exc))
        except BadRequest as exc:
            return _error(400, str(exc))
        except Busy as exc:
            return _error(409, str(exc))
        except Exception:
            log.exception("admin API %s %r failed", request.method, request.path)
            return _error(500, "internal error; the daemon's log has the details")

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_: web.Request) -> web.Response:
        problems = readiness()
        if problems:
            return web.json_response({"status": "not ready", "problems": problems}, status=503)
        return web.json_response({"status": "ready"})

    async def queue_list(request: web.Request) -> web.Response:
        q = request.query
        limit = q.get("limit", "100")
        if not _LIMIT.match(limit):
            raise BadRequest("limit must be a whole number")
        return web.json_response(
            service.list_messages(
                provider=q.get("provider"),
                class_name=q.get("class"),
                state=q.get("state"),
                after=q.get("after"),
                limit=int(limit),
            )
        )

    async def queue_show(request: web.Request) -> web.Response:
        return web.json_response(service.show(request.match_info["id"]))

    async def history_find(request: web.Request) -> web.Response:
        q = request.query
        limit = q.get("limit", "100")
        if not _LIMIT.match(limit):
            raise BadRequest("limit must be a whole number")
        within = None
        if q.get("since"):
            try:
                within = parse_duration(q["since"])
            except ValueError as exc:
                raise BadRequest(f"since: {exc}") from None
        found = await service.history(
            to=q.get("to") or None,
            sender=q.get("from") or None,
            within=within,
            limit=max(1, min(int(limit), 10_000)),
        )
        return web.json_response({"messages": found})

    async def history_show(request: web.Request) -> web.Response:
        return web.json_response(await service.finished(request.match_info["id"]))

    async def queue_flush(request: web.Request) -> web.Response:
        provider = _optional_string(request[JSON_BODY], "provider")
        return web.json_response({"flushed": service.flush(provider=provider)})

    async def queue_transfer(request: web.Request) -> web.Response:
        data = request[JSON_BODY]
        to = _optional_string(data, "to")
        if to is None:
            raise BadRequest('to: is required, like {"to": "10.0.0.6:587"}')
        report = await service.transfer(
            to,
            provider=_optional_string(data, "provider"),
            user=_optional_string(data, "user"),
            password=_optional_string(data, "password"),
        )
        return web.json_response(report)

    async def message_action(request: web.Request) -> web.Response:
        message_id, action = request.match_info["id"], request.match_info["action"]
        if action == "flush":
            return web.json_response({"flushed": service.flush(message_id=message_id)})
        if action == "hold":
            await service.hold(message_id)
        elif action == "release":
            await service.release(message_id)
        elif action == "bounce":
            return web.json_response({"bounced": await service.bounce(message_id)})
        else:
            return _error(404, f"unknown action {action!r}")
        return web.json_response({"ok": True})

    async def message_delete(request: web.Request) -> web.Response:
        await service.delete(request.match_info["id"])
        return web.json_response({"ok": True})

    async def providers(_: web.Request) -> web.Response:
        return web.json_response({"providers": service.providers()})

    async def provider_show(request: web.Request) -> web.Response:
        return web.json_response(service.provider(request.match_info["name"]))

    async def provider_action(request: web.Request) -> web.Response:
        name, action = request.match_info["name"], request.match_info["action"]
        if action == "suspend":
            data = request[JSON_BODY]
            if "for" not in data:
                raise BadRequest('for: is required, like {"for": "1h"}')
            try:
                seconds = parse_duration(data["for"])
            except ValueError as exc:
                raise BadRequest(f"for: {exc}") from None
            service.suspend(name, seconds)
        elif action == "resume":
            service.resume(name)
        else:
            return _error(404, f"unknown action {action!r}")
        return web.json_response({"ok": True})

    async def cluster_status(_: web.Request) -> web.Response:
        if cluster is None:
            return _error(404, "this node is not in a cluster (no cluster block in its config)")
        return web.json_response(await cluster())

    async def accounts(_: web.Request) -> web.Response:
        rows = account_guard.report() if account_guard is not None else []
        return web.json_response({"accounts": rows})

    async def account_release(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if account_guard is None:
            raise NotFound(f"no account {name!r}: the account guard is not running")
        try:
            released = await account_guard.release(name)
        except UnknownAccount as exc:
            raise NotFound(str(exc)) from None
        return web.json_response({"ok": True, "released": released})

    async def reload_config(_: web.Request) -> web.Response:
        problems = await reload()
        if problems:
            return web.json_response({"ok": False, "errors": problems}, status=422)
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[guard], client_max_size=MAX_BODY)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/api/queue", queue_list)
    app.router.add_post("/api/queue/flush", queue_flush)
    app.router.add_post("/api/queue/transfer", queue_transfer)
    app.router.add_get("/api/queue/{id}", queue_show)
    app.router.add_get("/api/history", history_find)
    app.router.add_get("/api/history/{id}", history_show)
    app.router.add_delete("/api/queue/{id}", message_delete)
    app.router.add_post("/api/queue/{id}/{action}", message_action)
    app.router.add_get("/api/providers", providers)
    app.router.add_get("/api/providers/{name}", provider_show)
    app.router.add_post("/api/providers/{name}/{action}", provider_action)
    app.router.add_post("/api/reload", reload_config)
    app.router.add_get("/api/cluster", cluster_status)
    app.router.add_get("/api/accounts", accounts)
    app.router.add_post("/api/accounts/{name}/release", account_release)
    if status is not None:
        add_routes(app, status, credentials.expected)
    return app


async def start_admin(
    *,
    admin: AdminConfig,
    service: QueueService,
    readiness: Readiness,
    reload: Reload,
    registry: CollectorRegistry,
    spool_path: str,
    status: StatusPage | None = None,
    cluster: ClusterStatus | None = None,
    account_guard: AccountGuard | None = None,
) -> web.AppRunner:
    """Serve the admin API on admin.address:admin.port (as at start: a reload does not
    move the listener); the caller cleans the returned runner up at shutdown."""
    app = build_app(
        admin=admin,
        service=service,
        readiness=readiness,
        reload=reload,
        registry=registry,
        spool_path=spool_path,
        status=status,
        cluster=cluster,
        account_guard=account_guard,
    )
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    config = admin()
    try:
        await web.TCPSite(runner, config.address, config.port, reuse_address=True).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
