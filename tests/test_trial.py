"""The README's trial as a new user runs it: the shipped config, the README's own swaks
addresses, and no working DNS. The first message must be accepted, and `relay queue list`
must show it waiting with its reason."""

from __future__ import annotations

import re
import shlex
import smtplib
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.relayproc import RelayProcess, free_port, make_message

ROOT = Path(__file__).resolve().parent.parent


def readme_trial() -> tuple[str, str]:
    """--from and --to of the README's first swaks line."""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("swaks --server 127.0.0.1:587"):
            words = shlex.split(line)
            return words[words.index("--from") + 1], words[words.index("--to") + 1]
    raise AssertionError("the README has no local swaks trial")


@pytest.fixture
def silent_dns() -> Iterator[int]:
    """A nameserver that never answers: every lookup times out, as offline."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_first_message_is_accepted_without_dns(tmp_path: Path, silent_dns: int) -> None:
    sender, recipient = readme_trial()
    config = yaml.safe_load((ROOT / "config" / "relay.yaml").read_text())
    # The shipped file as it is, but on free ports (tests run side by side), with DNS
    # that never answers, and nothing listening where the mail would go.
    config["listeners"][0]["port"] = free_port()
    config["admin"]["port"] = free_port()
    config["dns"]["nameservers"] = [f"127.0.0.1:{silent_dns}"]
    config["delivery"]["port"] = free_port()
    relay = RelayProcess(tmp_path, config).start()
    try:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE  # the trial's self-signed certificate
            smtp.starttls(context=context)
            smtp.ehlo("client.test")
            code, reply = smtp.mail(sender)
            assert code == 250, reply
            code, reply = smtp.rcpt(recipient)
            assert code == 250, reply
            code, reply = smtp.data(make_message("first", sender=sender, to=recipient))
            assert code == 250, reply
        queue_id = reply.decode().rsplit(" ", 1)[-1]
        relay.wait_log(f"id={queue_id} to=<{recipient}>")  # the first attempt is over
        listing = subprocess.run(
            [sys.executable, "-m", "relay", "queue", "list", "-c", str(relay.config_path)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listing.returncode == 0, listing.stderr
        assert queue_id in listing.stdout and recipient in listing.stdout
        # The reason it waits: the destination refused the connection.
        assert re.search(r"connect to .*failed", listing.stdout), listing.stdout
        assert "deferred" in listing.stdout
    finally:
        relay.stop()
