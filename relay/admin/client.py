"""The CLI's side of the admin API: stdlib HTTP, every failure one readable sentence."""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import yaml

from relay.errors import RelayError


class AdminError(RelayError):
    """The daemon could not be reached, refused us, or refused the request."""


def endpoint_from_config(path: str) -> tuple[str, str | None]:
    """Admin URL and token from the config file's `admin` section (leniently: the CLI
    must work even when the rest of the file would not validate)."""
    address, port, token = "127.0.0.1", 9025, None
    try:
        with open(path, encoding="utf-8") as handle:
            admin = (yaml.safe_load(handle) or {}).get("admin") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        admin = {}
    if isinstance(admin, dict):
        address = str(admin.get("address", address))
        port = int(admin.get("port", port)) if str(admin.get("port", port)).isdigit() else port
        raw = admin.get("token")
        if isinstance(raw, str):
            token = (
                re.sub(
                    r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: os.environ.get(m.group(1), ""), raw
                )
                or None
            )
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}", os.environ.get("RELAY_ADMIN_TOKEN") or token


class AdminClient:
    def __init__(self, base_url: str, token: str | None, timeout: float = 30) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        query: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v})
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return dict(json.loads(response.read() or b"{}"))
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read())
            except ValueError:
                detail = {}
            if exc.code == 401:
                raise AdminError(
                    "the admin API refused the token: set admin.token in the "
                    "config or RELAY_ADMIN_TOKEN to the daemon's token"
                ) from None
            errors = detail.get("errors")
            message = "; ".join(errors) if errors else detail.get("error", exc.reason)
            raise AdminError(str(message)) from None
        except urllib.error.URLError as exc:
            reason = getattr(exc.reason, "strerror", None) or exc.reason
            raise AdminError(
                f"cannot reach the relay daemon at {self.base_url}: {reason} "
                "(is it running? is admin.address/port right?)"
            ) from None
        except (TimeoutError, OSError) as exc:
            raise AdminError(f"no answer from the relay daemon at {self.base_url}: {exc}") from None
