"""Server TLS: the listener's certificate, or a self-signed one for a local trial."""

from __future__ import annotations

import datetime
import logging
import os
import ssl

from relay.config.model import Config, TlsConfig
from relay.errors import RelayError

log = logging.getLogger("relay.tls")


class TlsSetupError(RelayError):
    """The certificate or key cannot be used; the message says which file and why."""


def server_context(tls: TlsConfig, spool_path: str, hostname: str) -> ssl.SSLContext:
    """Load cert/key (making a self-signed pair first when allowed and absent)."""
    cert, key = certificate_files(tls, spool_path, hostname)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    load_into(context, cert, key)
    return context


def load_into(context: ssl.SSLContext, cert: str, key: str) -> None:
    """(Re)load a certificate into a context; later handshakes use it (SIGHUP)."""
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise TlsSetupError(
            f"tls.cert/tls.key: {cert} and {key} cannot be used together: {exc.reason}"
        ) from exc
    except OSError as exc:
        raise TlsSetupError(
            f"tls.cert/tls.key: cannot read {cert} or {key}: {exc.strerror}"
        ) from exc


def certificate_files(tls: TlsConfig, spool_path: str, hostname: str) -> tuple[str, str]:
    """The files to use, checked readable; a self-signed pair is made when allowed."""
    cert, key = tls.cert, tls.key
    if tls.self_signed and not (os.path.exists(cert) and os.path.exists(key)):
        cert = os.path.join(spool_path, "tls", "self-signed.pem")
        key = os.path.join(spool_path, "tls", "self-signed.key")
        if not (os.path.exists(cert) and os.path.exists(key)):
            _make_self_signed(cert, key, hostname)
        log.warning(
            "using a self-signed certificate (%s); clients cannot verify it: "
            "set tls.cert and tls.key for production",
            cert,
        )
    for path, what in ((cert, "tls.cert"), (key, "tls.key")):
        if not os.path.exists(path):
            raise TlsSetupError(
                f"{what}: {path} does not exist (set tls.self_signed: true for a local trial)"
            )
        if not os.access(path, os.R_OK):
            raise TlsSetupError(f"{what}: {path} is not readable by this user")
    return cert, key


def _make_self_signed(cert_path: str, key_path: str, hostname: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    os.makedirs(os.path.dirname(cert_path), mode=0o700, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    with open(cert_path, "wb") as handle:
        handle.write(certificate.public_bytes(serialization.Encoding.PEM))


def listener_context(config: Config) -> ssl.SSLContext | None:
    """The certificate context the listeners share, or None when none uses TLS."""
    if any(listener.tls != "none" for listener in config.listeners):
        return server_context(config.tls, config.spool_path, config.hostname)
    return None
