"""deploy/systemd/relay.service, checked by systemd's own tools, and relay/notify.py
speaking sd_notify to a real datagram socket, as systemd listens for it."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.notify import Notifier

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "systemd" / "relay.service"
INSTALLED = "/opt/relay/bin/relay"  # where docs/operations.md installs relay
MAX_EXPOSURE = 20  # systemd-analyze security's 0-100 scale: 2.0, "OK"


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None and os.geteuid() == 0:
        subprocess.run(
            "apt-get update -qq && apt-get install -y -qq --no-install-recommends systemd",
            shell=True,
            check=True,
            capture_output=True,
            timeout=900,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
        found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is missing (Debian's systemd package) and cannot be installed")
    return found


def unit_fields(text: str) -> dict[str, list[str]]:
    """Key → every value it is given (systemd keys may repeat), sections flattened."""
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            fields.setdefault(key.strip(), []).append(value.strip())
    return fields


@pytest.fixture
def installed_unit(tmp_path: Path) -> Path:
    """The unit as installed, but with ExecStart at this checkout's relay: `verify`
    checks that the program exists, and /opt/relay is not installed on a test machine."""
    relay = Path(sys.executable).parent / "relay"
    assert relay.exists(), f"{relay} is missing: pip install -e . in this environment"
    text = UNIT.read_text()
    assert INSTALLED in text
    unit = tmp_path / "relay.service"
    unit.write_text(text.replace(INSTALLED, str(relay)))
    return unit


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [systemd_analyze(), "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_unit_passes_systemd_analyze_verify(installed_unit: Path) -> None:
    result = verify(installed_unit)
    # verify exits 0 on warnings (an unknown key, a key in the wrong section): none allowed.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_unit_as_shipped_lacks_only_the_installed_program() -> None:
    result = verify(UNIT)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if line]
    assert complaints == [
        f"relay.service: Command {INSTALLED} is not executable: No such file or directory"
    ]


def test_unit_is_hardened(installed_unit: Path) -> None:
    result = subprocess.run(
        [
            systemd_analyze(),
            "security",
            "--offline=true",
            f"--threshold={MAX_EXPOSURE}",
            str(installed_unit),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    overall = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, f"{overall}\n{result.stdout}{result.stderr}"


def test_unit_runs_relay_as_the_issue_and_docs_say() -> None:
    fields = unit_fields(UNIT.read_text())
    assert fields["Type"] == ["notify"]  # relay/notify.py: READY=1 once it serves
    assert fields["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert fields["User"] == ["relay"] and fields["Group"] == ["relay"]
    assert fields["ProtectSystem"] == ["strict"]
    assert fields["ReadWritePaths"] == ["/var/spool/relay"]
    assert fields["NoNewPrivileges"] == ["yes"]
    assert fields["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert fields["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    exec_start = fields["ExecStart"][0].split()
    assert exec_start[:2] == [INSTALLED, "serve"]
    # systemd's stop timeout outlasts relay's own drain, so a stop is never a SIGKILL.
    grace = float(exec_start[exec_start.index("--grace") + 1])
    assert float(fields["TimeoutStopSec"][0]) > grace


# relay/notify.py


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket like systemd's, and the NOTIFY_SOCKET value naming it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.settimeout(5)
    yield sock, str(path)
    sock.close()


def test_ready_reloading_stopping_arrive_as_datagrams(
    listener: tuple[socket.socket, str],
) -> None:
    sock, address = listener
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
    assert notifier.ready()
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving"
    before = time.monotonic_ns() // 1000
    assert notifier.reloading()
    fields = sock.recv(4096).decode().split("\n")
    assert fields[0] == "RELOADING=1"
    usec = int(next(f for f in fields if f.startswith("MONOTONIC_USEC="))[15:])
    assert before <= usec <= time.monotonic_ns() // 1000
    assert notifier.ready("serving; reload failed")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving; reload failed"
    assert notifier.stopping()
    assert sock.recv(4096).split(b"\n")[0] == b"STOPPING=1"


def test_abstract_socket_name() -> None:
    name = f"relay-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert Notifier(f"@{name}").status("warming up")
        assert sock.recv(4096) == b"STATUS=warming up"


def test_a_status_cannot_add_fields(listener: tuple[socket.socket, str]) -> None:
    sock, address = listener
    Notifier(address).status("reload failed:\nREADY=1\nMAINPID=1")
    assert sock.recv(4096) == b"STATUS=reload failed: READY=1 MAINPID=1"


def test_without_systemd_nothing_is_sent() -> None:
    assert Notifier.from_environ({}).address is None
    assert not Notifier.from_environ({}).ready()
    assert not Notifier.from_environ({"NOTIFY_SOCKET": ""}).ready()


def test_a_failed_send_is_logged_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.WARNING, logger="relay"):
        assert not notifier.ready()
        assert not notifier.stopping()
    warnings = [r for r in caplog.records if "cannot notify systemd" in r.getMessage()]
    assert len(warnings) == 1
    assert not Notifier("vsock:2:1234").ready()


def test_relay_serve_tells_systemd_ready_reloading_stopping(
    relay_factory, listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, address = listener
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    relay = relay_factory(start=False)
    relay.start()
    assert sock.recv(4096).split(b"\n")[0] == b"READY=1"
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as smtp:
        assert smtp.recv(64).startswith(b"220")
    relay.proc.send_signal(signal.SIGHUP)
    assert sock.recv(4096).split(b"\n")[0] == b"RELOADING=1"
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving"
    relay.proc.send_signal(signal.SIGTERM)
    assert sock.recv(4096).split(b"\n")[0] == b"STOPPING=1"
    assert relay.proc.wait(timeout=30) == 0
