"""Admin API safety (SPEC §12): a token always, generated into the spool when the config
has none; no foreign Host or Origin; JSON-only mutations; errors mapped to the right
status. Over real HTTP, against `relay serve` where the daemon can show it, and against
the admin application alone (`start_admin` / `build_app` with a stand-in service) where
only a fault or a non-loopback address would.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from relay.admin.http import build_app, start_admin
from relay.admin.service import BadRequest, NotFound
from relay.admin.token import ensure_token
from relay.config.checks import EXAMPLE_PASSWORD_HASH
from relay.config.model import Admin, Secret
from tests.relayproc import RelayProcess, free_port, http_call

ROOT = Path(__file__).resolve().parent.parent
TWO_PROVIDERS = {"p": {"domains": ["p.test"]}, "q": {"domains": ["q.test"]}}


def cli(relay: RelayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as an operator runs it: no --token, nothing in the environment."""
    return relay.cli(*args)


def saved_suspensions(relay: RelayProcess, timeout: float = 10) -> list[str]:
    """The queues in <spool>/state/suspensions.json once it exists (bounded wait: the
    daemon writes it in the background, in the order of the changes). Tests first make
    the refused calls, then one accepted call, and read the file: a refused call that got
    through would be in it too."""
    path = Path(relay.config["spool"]["path"]) / "state" / "suspensions.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            return sorted(json.loads(path.read_text()))
        time.sleep(0.05)  # nothing to wait on but the file: the write is not announced
    raise AssertionError(f"{path} not written within {timeout}s")


# 1. the admin application stands alone


class StandInService:
    """Answers as QueueService does, including the faults QueueService must not have."""

    def __init__(self) -> None:
        self.suspensions: dict[str, float] = {}

    def list_messages(self, **_: Any) -> dict[str, Any]:
        return {"messages": [], "next": None, "total": 0}

    def show(self, message_id: str) -> dict[str, Any]:
        if message_id == "bug":
            raise ValueError("an internal detail the client must not see")
        if message_id == "bad":
            raise BadRequest("that ID is malformed")
        raise NotFound(f"no message with ID {message_id} in the queue")

    def providers(self) -> list[dict[str, Any]]:
        return []

    def suspend(self, name: str, seconds: float) -> None:
        if name != "known":
            raise NotFound(f"no provider {name!r}")
        self.suspensions[name] = seconds

    def resume(self, name: str) -> None:
        self.suspend(name, 0)


def admin_config(address: str = "127.0.0.1", **kw: Any) -> Admin:
    fields: dict[str, Any] = {"port": free_port(), "token": None, "metrics_public": False}
    fields.update(kw)
    return Admin(address=address, **fields)


@contextlib.contextmanager
def standalone(
    tmp_path: Path, admin: Admin, service: StandInService, *, on_loopback_site: bool = False
) -> Iterator[int]:
    """The admin app in a loop of its own thread; yields its port on 127.0.0.1.

    With `on_loopback_site`, `build_app` is served on 127.0.0.1 whatever `admin.address`
    says, so a non-loopback configuration is tested without listening beyond loopback.
    Otherwise `start_admin` binds as the daemon does.
    """
    registry = CollectorRegistry()
    Counter("relay_stand_in", "a metric to find", registry=registry).inc()

    async def reload() -> list[str]:
        return []

    kwargs: dict[str, Any] = {
        "admin": lambda: admin,
        "service": service,
        "readiness": lambda: [],
        "reload": reload,
        "registry": registry,
        "spool_path": str(tmp_path / "spool"),
    }

    async def start() -> tuple[web.AppRunner, int]:
        if not on_loopback_site:
            return await start_admin(**kwargs), admin.port
        runner = web.AppRunner(build_app(**kwargs), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, int(runner.addresses[0][1])

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="admin-under-test")
    thread.start()
    try:
        runner, port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
        try:
            yield port
        finally:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def call(port: int, method: str, path: str, token: str | None, **headers: str) -> Any:
    sent: dict[str, str | bytes] = {"Host": f"127.0.0.1:{port}", **headers}
    if token:
        sent["Authorization"] = f"Bearer {token}"
    body = None
    if method != "GET":
        sent["Content-Type"] = "application/json"
        body = b"{}"
    return http_call(port, method, path, sent, body)


def test_admin_app_takes_only_what_it_serves(tmp_path):
    # No daemon object, no import of relay.app: the parts it uses, by name.
    names = list(inspect.signature(start_admin).parameters)
    assert names == [
        "admin",
        "service",
        "readiness",
        "reload",
        "registry",
        "spool_path",
        "status",
        "cluster",  # relay cluster status: the status coroutine alone, not the cluster
        "account_guard",
    ]
    source = (ROOT / "relay" / "admin" / "http.py").read_text()
    assert "relay.app" not in source
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, relay.admin.http; print('relay.app' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert probe.stdout.strip() == "False", probe.stderr

    service = StandInService()
    admin = admin_config(token=Secret("standalone-token"))
    with standalone(tmp_path, admin, service) as port:
        assert call(port, "GET", "/readyz", None) == (200, {"status": "ready"})
        status, text = call(port, "GET", "/metrics", None)
        assert status == 200 and "relay_stand_in_total 1.0" in text
        assert call(port, "GET", "/api/queue", "standalone-token")[0] == 200
        path = "/api/providers/known/suspend"
        assert http_call(
            port,
            "POST",
            path,
            {
                "Host": f"127.0.0.1:{port}",
                "Authorization": "Bearer standalone-token",
                "Content-Type": "application/json",
            },
            b'{"for": "2h"}',
        ) == (200, {"ok": True})
    assert service.suspensions == {"known": 7200}
    assert not (tmp_path / "spool" / "admin.token").exists()  # a token was configured


# 7. only BadRequest is the client's fault


def test_a_bug_is_a_logged_500_and_only_bad_request_is_400(tmp_path, caplog):
    admin = admin_config(token=Secret("t-500"))
    with standalone(tmp_path, admin, StandInService()) as port:
        caplog.set_level(logging.ERROR, logger="relay.admin")
        status, answer = call(port, "GET", "/api/queue/bug", "t-500")
        assert status == 500
        assert "internal detail" not in json.dumps(answer)  # the log has it, not the client
        assert call(port, "GET", "/api/queue/bad", "t-500") == (
            400,
            {"error": "that ID is malformed"},
        )
        assert call(port, "GET", "/api/queue/gone", "t-500")[0] == 404
        assert call(port, "GET", "/api/queue?limit=" + "9" * 5000, "t-500")[0] == 400
    [record] = [r for r in caplog.records if r.exc_info]
    assert "GET '/api/queue/bug'" in record.getMessage()
    assert record.exc_info[0] is ValueError


# 3. /metrics and the admin address


def test_metrics_need_the_token_off_loopback_unless_public(tmp_path):
    token = "metrics-token"
    wide = admin_config("0.0.0.0", token=Secret(token))
    with standalone(tmp_path, wide, StandInService(), on_loopback_site=True) as port:
        assert call(port, "GET", "/metrics", None)[0] == 401
        assert call(port, "GET", "/metrics", token)[0] == 200
        assert call(port, "GET", "/healthz", None)[0] == 200  # probes stay open
    public = admin_config("::", token=Secret(token), metrics_public=True)
    with standalone(tmp_path, public, StandInService(), on_loopback_site=True) as port:
        assert call(port, "GET", "/metrics", None)[0] == 200
        assert call(port, "GET", "/api/queue", None)[0] == 401  # only /metrics went public


def test_metrics_are_open_on_loopback(relay_factory):
    relay = relay_factory()
    status, text = relay.api("GET", "/metrics", token=None)
    assert status == 200 and "relay_spool_messages" in text


# 2. a token always, generated when the config has none


def test_a_token_is_generated_once_and_the_cli_finds_it(relay_factory):
    relay = relay_factory()
    token_file = Path(relay.config["spool"]["path"]) / "admin.token"
    info = token_file.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600
    token = token_file.read_text().strip()
    assert len(token) >= 32

    assert relay.api("GET", "/api/queue", token=None)[0] == 401
    assert relay.api("GET", "/api/queue", token="guess")[0] == 401
    assert relay.api("GET", "/api/queue", token=token)[0] == 200
    assert relay.api("GET", "/", token=None)[0] == 401  # any other path, the status page's too
    assert relay.api("GET", "/healthz", token=None)[0] == 200
    assert relay.api("GET", "/readyz", token=None) == (200, {"status": "ready"})

    listing = cli(relay, "queue", "list")
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.strip() == "Mail queue is empty"
    assert cli(relay, "reload").stdout.strip() == "configuration reloaded"

    assert relay.stop() == 0
    relay.start()
    assert token_file.read_text().strip() == token  # kept: the CLI's copy stays good
    assert token_file.stat().st_ino == info.st_ino
    assert relay.api("GET", "/api/queue", token=token)[0] == 200
    leftovers = [p.name for p in token_file.parent.iterdir() if p.name.startswith("admin.token.")]
    assert leftovers == []


def test_a_configured_token_is_the_only_one(relay_factory):
    relay = relay_factory(admin={"token": "configured-token-0123456789"})
    assert not (Path(relay.config["spool"]["path"]) / "admin.token").exists()
    assert relay.api("GET", "/api/queue", token="configured-token-0123456789")[0] == 200
    assert relay.api("GET", "/api/queue", token=None)[0] == 401
    assert cli(relay, "queue", "list").returncode == 0


def test_token_file_creation_is_atomic_under_a_race(tmp_path):
    spool = tmp_path / "spool"
    barrier = threading.Barrier(8)
    tokens: list[str] = []

    def start() -> None:
        barrier.wait(timeout=10)
        tokens.append(ensure_token(str(spool)))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(tokens) == 8 and len(set(tokens)) == 1
    assert sorted(os.listdir(spool)) == ["admin.token"]


# 2. Host, Origin and bodies


def test_a_foreign_host_is_refused(relay_factory):
    relay = relay_factory()
    port = relay.admin_port
    for host in (
        f"evil.example:{port}",  # DNS rebinding: the attacker's name, our address
        f"localhost.evil.example:{port}",
        f"127.0.0.1:{port + 1}",
        "127.0.0.1",
        f"user@127.0.0.1:{port}",
        "",
    ):
        assert relay.api("GET", "/api/queue", headers={"Host": host})[0] == 403, host
        assert relay.api("GET", "/readyz", token=None, headers={"Host": host})[0] == 403, host
    for host in (f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}", f"127.0.0.1:{port}"):
        assert relay.api("GET", "/api/queue", headers={"Host": host})[0] == 200, host


def test_a_cross_site_request_is_refused(relay_factory):
    relay = relay_factory(providers=TWO_PROVIDERS)
    port = relay.admin_port
    for origin in ("http://evil.example", f"http://evil.example:{port}", "null"):
        status, _ = relay.api(
            "POST", "/api/providers/p/suspend", {"for": "1h"}, headers={"Origin": origin}
        )
        assert status == 403, origin
    own = {"Origin": f"http://127.0.0.1:{port}"}
    assert relay.api("POST", "/api/providers/q/suspend", {"for": "1h"}, headers=own)[0] == 200
    assert saved_suspensions(relay) == ["q"]


def test_mutations_need_a_json_body(relay_factory):
    relay = relay_factory(providers=TWO_PROVIDERS)
    path = "/api/providers/p/suspend"
    for content_type in (
        "text/plain",  # what a cross-site form or fetch() may send without a preflight
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ):
        status, _ = relay.api("POST", path, {"for": "1h"}, headers={"Content-Type": content_type})
        assert status == 415, content_type
    no_type = relay.api("DELETE", "/api/queue/NOSUCHID", headers={"Content-Type": ""})
    assert no_type[0] == 415
    for body in (b"", b"for=1h", b"[1]", b'{"for": "1h"', b'{"for": "\xff"}'):
        assert relay.api("POST", path, body)[0] == 400, body
    assert relay.api("POST", "/api/providers/q/suspend", {"for": "1h"}) == (200, {"ok": True})
    assert saved_suspensions(relay) == ["q"]


# 4, 5, 6: what comes in cannot break or grow the daemon


def test_durations_that_are_not_finite_are_400(relay_factory):
    relay = relay_factory(providers=TWO_PROVIDERS)
    for value in (
        b"NaN",
        b"Infinity",
        b"-Infinity",
        b"1e400",
        b"9" * 400,
        b"9" * 5000,  # more digits than int() takes
        b"[" * 50000,
        b'"1e400"',
        b'"inf"',
        b'"NaN"',
        b'"' + b"9" * 400 + b's"',
    ):
        status, answer = relay.api("POST", "/api/providers/p/suspend", b'{"for": ' + value + b"}")
        assert status == 400, (value, answer)
        assert answer["error"].startswith("for: ") or "not JSON" in answer["error"], answer
    assert relay.api("POST", "/api/providers/q/suspend", {"for": "1h"})[0] == 200
    assert saved_suspensions(relay) == ["q"]
    assert "Traceback" not in relay.log()


def test_an_authorization_header_that_is_not_utf8_is_401(relay_factory):
    token = "configured-token-0123456789"
    relay = relay_factory(admin={"token": token})
    for header in (b"Bearer \xff\xfe\xe9", b"\xff", b"Bearer " + token.encode() + b"\xe9"):
        status, _ = relay.api("GET", "/api/queue", token=None, headers={"Authorization": header})
        assert status == 401, header
    assert relay.api("GET", "/api/queue", token=token)[0] == 200
    assert "Traceback" not in relay.log()


def test_admin_calls_cannot_name_new_providers(relay_factory):
    relay = relay_factory(providers=TWO_PROVIDERS)
    for name in ("nosuch", "default:never-routed.test"):
        for action in ("suspend", "resume"):
            status, _ = relay.api("POST", f"/api/providers/{name}/{action}", {"for": "1h"})
            assert status == 404, (name, action)
    refused = cli(relay, "provider", "suspend", "default:never-routed.test", "--for", "1h")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert relay.api("POST", "/api/providers/q/suspend", {"for": "1h"})[0] == 200
    assert saved_suspensions(relay) == ["q"]
    status, answer = relay.api("GET", "/api/providers")
    assert status == 200
    assert not [row for row in answer["providers"] if "nosuch" in json.dumps(row)]
    assert not [row for row in answer["providers"] if "never-routed" in json.dumps(row)]
    status, text = relay.api("GET", "/metrics", token=None)
    assert 'provider="nosuch"' not in text and "never-routed" not in text


# 8. the published example password


def test_serve_refuses_the_example_password_off_loopback(tmp_path):
    # 192.0.2.1 (TEST-NET-1) is not ours: had the check not run first, binding it would
    # fail instead, with another message. Nothing listens beyond loopback either way.
    config = tmp_path / "relay.yaml"
    config.write_text(
        "listeners: [{name: submission, address: 192.0.2.1, port: 587}]\n"
        f"tls: {{self_signed: true, cert: '{tmp_path}/c.pem', key: '{tmp_path}/k.pem'}}\n"
        f"spool: {{path: '{tmp_path}/spool'}}\n"
        f"admin: {{port: {free_port()}}}\n"
        f"accounts: [{{name: webapp, password: '{EXAMPLE_PASSWORD_HASH}', "
        "senders: ['*@example.org']}]\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("relay: refusing to start: accounts[0] (webapp)")
    assert "change-me" in line and "listeners[0] (192.0.2.1)" in line
    assert not (tmp_path / "spool").exists()  # refused before anything was made


def test_the_example_password_is_fine_on_loopback(relay_factory):
    relay = relay_factory(
        accounts=[{"name": "webapp", "password": EXAMPLE_PASSWORD_HASH, "senders": ["*"]}]
    )
    assert relay.api("GET", "/readyz", token=None) == (200, {"status": "ready"})


@pytest.mark.parametrize("address", ["0.0.0.0", "::"])
def test_wildcard_listeners_count_as_reachable(address):
    from relay.config import parse_config
    from relay.config.checks import example_password_exposed

    config = parse_config(
        {
            "listeners": [{"name": "s", "address": address}],
            "accounts": [{"name": "w", "password": EXAMPLE_PASSWORD_HASH, "senders": ["*"]}],
        }
    )
    sentence = example_password_exposed(config)
    assert sentence is not None and f"listeners[0] ({address})" in sentence
