"""Shared by the benchmarks that run Postfix beside relay: ports, the Debian install,
smtp-sink with its running count, a private Postfix instance.

Loopback only; every process started here has a stop().
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def ensure_postfix() -> None:
    if shutil.which("smtp-source") and shutil.which("postfix"):
        return
    if os.geteuid() != 0:
        raise SystemExit(
            "Postfix is not installed and installing it needs root (apt-get install postfix)"
        )
    subprocess.run(
        "echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections",
        shell=True,
        check=True,
    )
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postfix"],
        check=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        stdout=subprocess.DEVNULL,
    )


class Sink:
    """smtp-sink with its running counter read from stdout."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.count = 0
        self._proc = subprocess.Popen(
            ["smtp-sink", "-u", "nobody", "-c", f"127.0.0.1:{port}", "256"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        threading.Thread(target=self._read, daemon=True).start()
        wait_port(port)

    def _read(self) -> None:
        assert self._proc.stdout is not None
        field = b""
        while True:
            char = self._proc.stdout.read(1)
            if not char:
                return
            if char in b"\r\n ":
                if field.startswith(b"mesg="):
                    self.count = int(field[5:])
                field = b""
            else:
                field += char

    def wait_for(self, target: int, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while self.count < target and time.monotonic() < deadline:
            time.sleep(0.005)
        return time.monotonic()

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(10)


class Postfix:
    """A private instance: its own queue under `workdir`, smtpd on 127.0.0.1:`port`,
    DNS off. `relayhost` sends everything to one sink; `transport` (domain → nexthop
    such as "[127.1.0.1]:2525") gives each distinct nexthop a queue of its own (domains
    sent to the same nexthop share one); `settings` override main.cf parameters."""

    def __init__(
        self,
        workdir: Path,
        port: int,
        relayhost: str = "",
        transport: dict[str, str] | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.dir = workdir / "postfix"
        etc, queue, data = self.dir / "etc", self.dir / "queue", self.dir / "data"
        for path in (etc, queue, data):
            path.mkdir(parents=True)
        shutil.chown(data, "postfix")
        main = {
            "compatibility_level": "3.6",
            "queue_directory": str(queue),
            "data_directory": str(data),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "postfix.bench.test",
            "mydestination": "",
            "mynetworks": "127.0.0.0/8",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "relayhost": relayhost,
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "disable_dns_lookups": "yes",
            "smtpd_recipient_restrictions": "permit_mynetworks, reject",
            "default_destination_concurrency_limit": "20",
            "alias_maps": "",
            "local_recipient_maps": "",
            "maillog_file_prefixes": str(self.dir),
            "maillog_file": f"{self.dir}/maillog",
        }
        if transport:
            main["transport_maps"] = f"texthash:{etc}/transport"
        main.update(settings or {})
        (etc / "main.cf").write_text("".join(f"{key} = {value}\n" for key, value in main.items()))
        if transport:
            (etc / "transport").write_text(
                "".join(f"{domain} smtp:{nexthop}\n" for domain, nexthop in transport.items())
            )
        master = (
            Path("/etc/postfix/master.cf")
            .read_text()
            .replace("\nsmtp      inet", f"\n127.0.0.1:{port}      inet", 1)
        )
        (etc / "master.cf").write_text(master)
        self.etc = etc
        self._proc = subprocess.Popen(
            ["postfix", "-c", str(etc), "start-fg"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(port)

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.etc), "stop"], capture_output=True)
        try:
            self._proc.wait(20)
        except subprocess.TimeoutExpired:
            self._proc.kill()
