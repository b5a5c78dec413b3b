"""The admin HTTP listener (aiohttp): /metrics, /healthz, /readyz and the JSON queue API.

A bearer token (`admin.token`) guards everything but /metrics, /healthz and /readyz,
which monitoring must reach without secrets.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from relay.admin.service import NotFound, QueueService
from relay.config.units import parse_duration

if TYPE_CHECKING:
    from relay.app import Relay

log = logging.getLogger("relay.admin")

OPEN_PATHS = ("/metrics", "/healthz", "/readyz")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def build_app(relay: Relay) -> web.Application:
    service = QueueService(relay)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        token = relay.config.admin.token
        if token and request.path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return _error(401, "missing or wrong bearer token (admin.token)")
        try:
            return await handler(request)
        except NotFound as exc:
            return _error(404, str(exc))
        except ValueError as exc:
            return _error(400, str(exc))

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(relay.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_: web.Request) -> web.Response:
        problems = relay.readiness_problems()
        if problems:
            return web.json_response({"status": "not ready", "problems": problems}, status=503)
        return web.json_response({"status": "ready"})

    async def queue_list(request: web.Request) -> web.Response:
        q = request.query
        limit = q.get("limit", "100")
        if not limit.isdigit():
            raise ValueError("limit must be a number")
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

    async def body(request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            data = await request.json()
        except ValueError:
            raise ValueError("the request body must be JSON") from None
        if not isinstance(data, dict):
            raise ValueError("the request body must be a JSON object")
        return data

    async def queue_flush(request: web.Request) -> web.Response:
        data = await body(request)
        return web.json_response({"flushed": service.flush(provider=data.get("provider"))})

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

    async def provider_action(request: web.Request) -> web.Response:
        name, action = request.match_info["name"], request.match_info["action"]
        if action == "suspend":
            data = await body(request)
            service.suspend(name, parse_duration(data.get("for", "")))
        elif action == "resume":
            service.resume(name)
        else:
            return _error(404, f"unknown action {action!r}")
        return web.json_response({"ok": True})

    async def reload(_: web.Request) -> web.Response:
        problems = await relay.reload()
        if problems:
            return web.json_response({"ok": False, "errors": problems}, status=422)
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[guard])
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/api/queue", queue_list)
    app.router.add_post("/api/queue/flush", queue_flush)
    app.router.add_get("/api/queue/{id}", queue_show)
    app.router.add_delete("/api/queue/{id}", message_delete)
    app.router.add_post("/api/queue/{id}/{action}", message_action)
    app.router.add_get("/api/providers", providers)
    app.router.add_post("/api/providers/{name}/{action}", provider_action)
    app.router.add_post("/api/reload", reload)
    return app


async def start_admin(relay: Relay) -> web.AppRunner:
    runner = web.AppRunner(build_app(relay), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(
        runner, relay.config.admin.address, relay.config.admin.port, reuse_address=True
    )
    await site.start()
    return runner
