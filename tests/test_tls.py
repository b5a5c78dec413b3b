"""Server TLS: modern versions only, clear errors for bad files, certificates reloaded on SIGHUP."""

from __future__ import annotations

import signal
import smtplib
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import trustme

from relay.config import parse_config
from relay.tls import server_context
from tests.relayproc import free_port


def write_pair(directory: Path, name: str, authority: trustme.CA) -> tuple[Path, Path]:
    issued = authority.issue_cert("relay.test")
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    issued.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    return cert, key


def peer_certificate(port: int, implicit: bool) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if implicit:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="relay.test") as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            return tls.getpeercert(binary_form=True) or b""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.starttls(context=context)
        assert smtp.sock.version() in ("TLSv1.2", "TLSv1.3")
        return smtp.sock.getpeercert(binary_form=True) or b""


def test_tls_1_2_is_the_minimum(tmp_path):
    cert, key = write_pair(tmp_path, "a", trustme.CA())
    config = parse_config({"tls": {"cert": str(cert), "key": str(key)}})
    assert (
        server_context(config.tls, str(tmp_path), "relay.test").minimum_version
        == ssl.TLSVersion.TLSv1_2
    )


def test_certificates_are_reloaded_on_sighup(tmp_path, relay_factory):
    cert, key = write_pair(tmp_path, "live", trustme.CA())
    starttls, implicit = free_port(), free_port()
    relay = relay_factory(
        tls={"cert": str(cert), "key": str(key), "self_signed": False},
        listeners=[
            {"name": "s", "address": "127.0.0.1", "port": starttls, "tls": "starttls"},
            {"name": "i", "address": "127.0.0.1", "port": implicit, "tls": "implicit"},
        ],
    )
    before = (peer_certificate(starttls, False), peer_certificate(implicit, True))
    new_cert, new_key = write_pair(tmp_path, "next", trustme.CA())
    cert.write_bytes(new_cert.read_bytes())
    key.write_bytes(new_key.read_bytes())
    relay.proc.send_signal(signal.SIGHUP)
    relay.wait_log("configuration reloaded")
    after = (peer_certificate(starttls, False), peer_certificate(implicit, True))
    assert before[0] == before[1] and after[0] == after[1]
    assert after[0] != before[0] and after[0] == ssl.PEM_cert_to_DER_cert(
        new_cert.read_text().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
    )


def _serve_fails(tmp_path: Path, cert: str, key: str) -> str:
    config = tmp_path / "relay.yaml"
    config.write_text(
        f"listeners: [{{name: s, address: 127.0.0.1, port: {free_port()}}}]\n"
        f"tls: {{cert: '{cert}', key: '{key}'}}\n"
        f"spool: {{path: '{tmp_path}/spool'}}\n"
        f"admin: {{port: {free_port()}}}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_mismatched_or_unreadable_files_are_one_clear_line(tmp_path):
    cert_a, _ = write_pair(tmp_path, "a", trustme.CA())
    _, key_b = write_pair(tmp_path, "b", trustme.CA())
    line = _serve_fails(tmp_path, str(cert_a), str(key_b))
    assert line.startswith("relay: tls.cert/tls.key:") and "cannot be used together" in line
    line = _serve_fails(tmp_path, str(tmp_path), str(key_b))  # a directory, not a file
    assert line.startswith("relay: tls.cert/tls.key: cannot read")
