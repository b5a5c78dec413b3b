"""`relay serve` as a subprocess with a generated test config, and a client for it."""

from __future__ import annotations

import contextlib
import copy
import http.client
import json
import os
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

PASSWORD = "s3cret-app-password"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class RelayProcess:
    def __init__(self, workdir: Path, config: dict[str, Any], args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.args = args
        self.config = config
        self.port = config["listeners"][0]["port"]
        self.admin_port = config.get("admin", {}).get("port", 9025)
        self.config_path = workdir / "relay.yaml"
        self.log_path = workdir / "relay.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.config_path.write_text(yaml.safe_dump(config))

    def start(self, timeout: float = 20) -> RelayProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "-c", str(self.config_path), *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"relay exited with {self.proc.returncode}:\n{self.log()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock,
            ):
                if sock.recv(64).startswith(b"220"):
                    return self
            time.sleep(0.05)  # the listener is not up yet: nothing to wait on but the port
        raise RuntimeError(f"relay did not listen within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, needle: str, timeout: float = 20) -> str:
        """Bounded wait for a line in the log (the relay's own observable output)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            if needle in text:
                return text
            time.sleep(0.1)
        raise AssertionError(f"{needle!r} not logged within {timeout}s:\n{text[-4000:]}")

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def admin_token(self) -> str | None:
        """The token the admin API wants: admin.token, or the one the daemon generated in
        its spool at first start (SPEC §12)."""
        configured = self.config.get("admin", {}).get("token")
        if configured:
            return str(configured)
        path = Path(self.config["spool"]["path"]) / "admin.token"
        return path.read_text().strip() if path.exists() else None

    def api(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = "auto",
        headers: dict[str, str | bytes] | None = None,
    ) -> tuple[int, Any]:
        """One admin API call as the CLI makes it: the daemon's token ("auto"), JSON with
        every POST and DELETE ({} when `body` is None, sent as is when bytes); `headers`
        override any of it.
        Returns the status and the decoded JSON (or text) answer."""
        sent: dict[str, str | bytes] = {"Host": f"127.0.0.1:{self.admin_port}"}
        token = self.admin_token() if token == "auto" else token
        if token:
            sent["Authorization"] = f"Bearer {token}"
        data = None
        if method not in ("GET", "HEAD"):
            data = (
                body
                if isinstance(body, bytes)
                else json.dumps({} if body is None else body).encode()
            )
            sent["Content-Type"] = "application/json"
        sent.update(headers or {})
        return http_call(self.admin_port, method, path, sent, data)

    def spool_files(self) -> list[str]:
        """Messages and their progress logs; not their timelines (`.ev`, relay/history),
        which are a record for people, removed once history has them."""
        root = Path(self.workdir) / "spool" / "messages"
        return sorted(p.name for p in root.rglob("*") if p.is_file() and p.suffix != ".ev")

    @contextlib.contextmanager
    def client(
        self, *, auth: bool = True, tls: bool = True, user: str = "app"
    ) -> Iterator[smtplib.SMTP]:
        smtp = smtplib.SMTP("127.0.0.1", self.port, timeout=15)
        try:
            smtp.ehlo("client.test")
            if tls:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                smtp.starttls(context=context)
                smtp.ehlo("client.test")
            if auth:
                smtp.login(user, PASSWORD)
            yield smtp
        finally:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                smtp.quit()
            smtp.close()

    def send(self, sender: str, recipients: list[str], body: bytes | str, **kw: Any) -> str:
        """Submit one message; return the queue id from the 250 reply."""
        with self.client(**kw) as smtp:
            code, reply = smtp.mail(sender)
            assert code == 250, (code, reply)
            for rcpt in recipients:
                code, reply = smtp.rcpt(rcpt)
                assert code == 250, (code, reply)
            code, reply = smtp.data(body)
            assert code == 250, (code, reply)
            return reply.decode().rsplit(" ", 1)[-1]


def http_call(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str | bytes],
    body: bytes | None = None,
) -> tuple[int, Any]:
    """A raw HTTP request to 127.0.0.1:port, headers exactly as given (Host included):
    http.client passes bytes values through, so a test can send what no browser would."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest(method, path, skip_host="Host" in headers, skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, raw.decode("utf-8", "replace")


def make_message(
    subject: str,
    body: str = "Hello.\r\n",
    headers: str = "",
    sender: str = "app@example.org",
    to: str = "x@example.test",
) -> bytes:
    return (f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n{headers}\r\n{body}").encode()


def base_config(
    workdir: Path, dns_port: int, delivery_port: int, password_hash: str, **extra: Any
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "hostname": "relay.test",
        "listeners": [
            {
                "name": "submission",
                "address": "127.0.0.1",
                "port": free_port(),
                "tls": "starttls",
                "auth": "required",
                "class": "transactional",
                "trusted_networks": [],
            }
        ],
        "tls": {
            "self_signed": True,
            "cert": str(workdir / "none.pem"),
            "key": str(workdir / "none.key"),
        },
        "spool": {"path": str(workdir / "spool")},
        "admin": {"address": "127.0.0.1", "port": free_port()},
        "dns": {"nameservers": [f"127.0.0.1:{dns_port}"], "timeout": "2s"},
        "accounts": [
            {
                "name": "app",
                "password": password_hash,
                "senders": ["*@example.org"],
                "class": "transactional",
            }
        ],
        "delivery": {
            "port": delivery_port,
            "connect_timeout": "2s",
            "command_timeout": "10s",
            "idle_connection_timeout": "2s",
        },
        "retry": {"initial": "1s", "max": "2s", "lifetime": "1h"},
    }
    return deep_merge(config, extra)


def environ_without_proxy() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
