"""Tells systemd how the daemon is doing (sd_notify(3)), for units with `Type=notify`.

`READY=1` once the listeners serve, `RELOADING=1` … `READY=1` around a reload, and
`STOPPING=1` when the drain starts: `systemctl start` returns only when mail is taken,
and `systemctl status` says what the daemon is doing.

The protocol is one datagram of `KEY=VALUE` lines sent to the AF_UNIX socket named in
`$NOTIFY_SOCKET`: a path, or an abstract name written with a leading `@`. That is all
libsystemd does for it, so there is no dependency. Without the variable (not under
systemd, or a `Type=simple` unit) every call does nothing. A failed send is logged once
and never stops the daemon: it serves mail the same whether or not its supervisor hears.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("relay")


class Notifier:
    def __init__(self, address: str | None) -> None:
        self.address = address  # $NOTIFY_SOCKET as given; None: no supervisor listens
        self._warned = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        return cls(environ.get("NOTIFY_SOCKET") or None)

    def ready(self, status: str = "serving") -> bool:
        """Startup (or a reload) is over and the listeners take mail."""
        return self.send("READY=1", f"STATUS={_one_line(status)}")

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd ≥ 253 (Type=notify-reload) match this to the
        # SIGHUP it sent; older versions ignore it.
        return self.send(
            "RELOADING=1",
            "STATUS=reloading the configuration",
            f"MONOTONIC_USEC={time.monotonic_ns() // 1000}",
        )

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=draining: new sessions refused")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={_one_line(text)}")

    def send(self, *fields: str) -> bool:
        """True when the datagram went out; False when unsupervised or it failed."""
        if self.address is None:
            return False
        if self.address.startswith("@"):
            target = "\0" + self.address[1:]  # Linux abstract namespace
        elif self.address.startswith("/"):
            target = self.address
        else:  # vsock:… (systemd ≥ 253, for VMs) is not for a daemon on the host
            return self._failed(f"unsupported NOTIFY_SOCKET {self.address!r}")
        payload = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # Non-blocking: a supervisor that does not read must not stall the loop.
                sock.setblocking(False)
                sock.sendto(payload, target)
        except OSError as exc:
            return self._failed(f"cannot notify systemd at {self.address}: {exc}")
        return True

    def _failed(self, why: str) -> bool:
        if not self._warned:
            self._warned = True
            log.warning("%s; carrying on without telling it", why)
        return False


def _one_line(text: str) -> str:
    # A newline would start a new KEY=VALUE field: a status must not set anything else.
    return " ".join(text.split())
