"""A full spool filesystem: refuse new mail with 452 4.3.1, keep delivering, recover alone."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.relayproc import make_message
from tests.support import route, scrape


@pytest.fixture
def small_filesystem(tmp_path: Path):
    """A 4 MiB tmpfs; mounting needs root, so anyone else gets a clearly reported skip."""
    if os.geteuid() != 0:
        pytest.skip("full-disk test needs root to mount a 4 MiB tmpfs for the spool")
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Write until the filesystem is full; return the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    return filler


def test_full_disk_refuses_cleanly_keeps_delivering_and_recovers(
    small_filesystem, relay_factory, dns_server, mx_farm
):
    route(dns_server, "queued.test", "127.0.0.38")
    mx = mx_farm.server("127.0.0.38")
    mx.rcpt_hook = lambda a: "451 4.3.0 not now"
    relay = relay_factory(
        spool={"path": str(small_filesystem / "spool")}, retry={"initial": "1s", "max": "1s"}
    )
    for i in range(3):
        relay.send("app@example.org", [f"q{i}@queued.test"], make_message(f"queued {i}"))
    relay.wait_log("status=deferred")
    filler = fill(small_filesystem)
    queued = sorted(
        relay_file for relay_file in relay.spool_files() if not relay_file.endswith(".st")
    )

    with relay.client() as smtp:
        smtp.mail("app@example.org")
        smtp.rcpt("new@queued.test")
        code, reply = smtp.data(make_message("no room", "z" * 60 + "\r\n") * 300)
        assert (code, reply) == (452, b"4.3.1 Insufficient system storage")
    spool = small_filesystem / "spool" / "messages"
    assert not [p for p in spool.rglob(".tmp-*")], "a partial message was left behind"
    assert sorted(f for f in relay.spool_files() if not f.endswith(".st")) == queued
    assert scrape(relay)["relay_messages_rejected_total"][(("reason", "storage"),)] == 1

    mx.rcpt_hook = lambda a: None  # the queued mail still goes out
    assert sorted(r for m in mx.wait_messages(3, timeout=30) for r in m.rcpt_tos) == [
        "q0@queued.test",
        "q1@queued.test",
        "q2@queued.test",
    ]

    filler.unlink()  # space returns: acceptance resumes by itself
    relay.send("app@example.org", ["after@queued.test"], make_message("room again"))
    assert mx.wait_messages(4, timeout=30)[-1].rcpt_tos == ["after@queued.test"]
    assert "Traceback" not in relay.log()
