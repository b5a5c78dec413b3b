"""The CLI's side of the admin API: stdlib HTTP, every failure one readable sentence."""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

import yaml

from relay.admin.token import read_token, token_path
from relay.config.model import node_spool
from relay.errors import RelayError

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


# No proxy, whatever $http_proxy says: the bearer token is for the daemon alone, and the
# admin address is ours to reach directly.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class AdminError(RelayError):
    """The daemon could not be reached, refused us, or refused the request."""


class AdminTimeout(AdminError, TimeoutError):
    """The daemon took the request and did not answer in time (it may still be at it)."""


@dataclass(frozen=True)
class Endpoint:
    url: str
    token: str | None
    token_from: str  # where the token came from, for the sentence a 401 becomes


def _expand(raw: object) -> str | None:
    if not isinstance(raw, str):
        return None
    return _ENV.sub(lambda m: os.environ.get(m.group(1), ""), raw) or None


def endpoint_from_config(path: str) -> Endpoint:
    """Admin URL and token from the config file (leniently: the CLI must work even when
    the rest of the file would not validate). The token is, in this order,
    $RELAY_ADMIN_TOKEN, `admin.token`, or the one the daemon generated in the spool, which
    only a user who may read the spool can read."""
    address, port = "127.0.0.1", 9025
    try:
        with open(path, encoding="utf-8") as handle:
            document = yaml.safe_load(handle) or {}
    except (OSError, ValueError, yaml.YAMLError):
        document = {}
    if not isinstance(document, dict):
        document = {}
    admin = document.get("admin") or {}
    spool = document.get("spool") or {}
    configured = None
    if isinstance(admin, dict):
        address = str(admin.get("address", address))
        port = int(admin.get("port", port)) if str(admin.get("port", port)).isdigit() else port
        configured = _expand(admin.get("token"))
    spool_path = (_expand(spool.get("path")) if isinstance(spool, dict) else None) or (
        "/var/spool/relay"
    )
    cluster = document.get("cluster")
    if isinstance(cluster, dict) and isinstance(cluster.get("shared_spool"), str):
        node = cluster.get("node")
        spool_path = node_spool(cluster["shared_spool"], node if isinstance(node, str) else None)
    host = f"[{address}]" if ":" in address else address
    url = f"http://{host}:{port}"
    if os.environ.get("RELAY_ADMIN_TOKEN"):
        return Endpoint(url, os.environ["RELAY_ADMIN_TOKEN"], "$RELAY_ADMIN_TOKEN")
    if configured:
        return Endpoint(url, configured, f"admin.token in {path}")
    return Endpoint(url, read_token(spool_path), token_path(spool_path))


class AdminClient:
    def __init__(
        self, base_url: str, token: str | None, token_from: str = "--token", timeout: float = 30
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.token_from = token_from
        self.timeout = timeout

    def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        query: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """One request; `timeout` (seconds without an answer) for calls that last as long
        as their work, like a transfer."""
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v})
        if body is None and method not in ("GET", "HEAD"):
            body = {}  # the API takes a JSON object with every POST and DELETE
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with _OPENER.open(request, timeout=timeout or self.timeout) as response:
                return dict(json.loads(response.read() or b"{}"))
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read())
            except ValueError:
                detail = None
            if not isinstance(detail, dict):
                detail = {}
            if exc.code == 401:
                raise AdminError(self._refused()) from None
            errors = detail.get("errors")
            message = "; ".join(errors) if errors else detail.get("error", exc.reason)
            raise AdminError(str(message)) from None
        except urllib.error.URLError as exc:
            reason = getattr(exc.reason, "strerror", None) or exc.reason
            raise AdminError(
                f"cannot reach the relay daemon at {self.base_url}: {reason} "
                "(is it running? is admin.address/port right?)"
            ) from None
        except TimeoutError as exc:
            raise AdminTimeout(
                f"no answer from the relay daemon at {self.base_url}: {exc}"
            ) from None
        except OSError as exc:
            raise AdminError(f"no answer from the relay daemon at {self.base_url}: {exc}") from None

    def _refused(self) -> str:
        if self.token is None:
            return (
                f"the admin API needs a token and none was found: {self.token_from} is missing "
                "or unreadable by this user (run as the daemon's user, or give --token)"
            )
        return (
            f"the admin API refused the token from {self.token_from}: it is not the "
            "daemon's (admin.token, $RELAY_ADMIN_TOKEN or the admin.token file in its spool)"
        )
