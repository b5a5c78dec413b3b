"""DANE for SMTP (RFC 7672): does a server's certificate chain match its TLSA records?

Only DANE-TA(2) and DANE-EE(3) are usable for SMTP (RFC 7672 §3.1): PKIX-TA(0) and
PKIX-EE(1) would tie the MX to a public CA, which the MX name, chosen by whoever runs the
destination domain, cannot be checked against. Matching uses `cryptography`; the chain
is the one the server sent, leaf first, as DER.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509 import DNSName
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from relay.dns.resolver import Tlsa

DANE_TA = 2
DANE_EE = 3


def usable(records: Sequence[Tlsa]) -> tuple[Tlsa, ...]:
    """The records an SMTP client may use (RFC 7672 §3.1, RFC 6698 §2.1): the others are
    ignored, and a TLSA RRset with none left still makes TLS mandatory (RFC 7672 §2.2)."""
    return tuple(
        r
        for r in records
        if r.usage in (DANE_TA, DANE_EE) and r.selector in (0, 1) and r.mtype in (0, 1, 2)
    )


def _selected(record: Tlsa, certificate: x509.Certificate, der: bytes) -> bytes:
    if record.selector == 0:
        return der
    return certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _matches(record: Tlsa, certificate: x509.Certificate, der: bytes) -> bool:
    selected = _selected(record, certificate, der)
    if record.mtype == 1:
        selected = hashlib.sha256(selected).digest()
    elif record.mtype == 2:
        selected = hashlib.sha512(selected).digest()
    return selected == record.data


def authenticate(records: Sequence[Tlsa], chain: Sequence[bytes], host: str) -> str | None:
    """None when one of the usable `records` authenticates the chain; else why not.

    DANE-EE(3): the leaf itself matches; its names and dates are not checked (RFC 7672
    §3.1.1: the TLSA record binds the key to the service, nothing else need).
    DANE-TA(2): a certificate of the chain (or a full certificate published as `2 0 0`)
    is the trust anchor, and the leaf must chain to it and bear the MX host name, which is
    the TLSA base domain (RFC 7672 §3.1.2, §3.2.2).
    """
    if not chain:
        return f"{host} sent no certificate"
    try:
        certificates = [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError as exc:
        return f"certificate of {host} cannot be parsed: {exc}"
    leaf = certificates[0]
    if any(_matches(r, leaf, chain[0]) for r in records if r.usage == DANE_EE):
        return None
    authorities = [r for r in records if r.usage == DANE_TA]
    anchors = [
        certificate
        for certificate, der in zip(certificates[1:], chain[1:], strict=True)
        if any(_matches(r, certificate, der) for r in authorities)
    ]
    for record in authorities:
        if record.selector == 0 and record.mtype == 0:
            try:
                anchors.append(x509.load_der_x509_certificate(record.data))
            except ValueError:
                continue
    for anchor in anchors:
        try:
            policy = PolicyBuilder().store(Store([anchor]))
            policy.build_server_verifier(DNSName(host)).verify(leaf, certificates[1:])
        except (VerificationError, ValueError):
            continue
        return None
    if anchors:
        return f"the certificate of {host} does not chain to its DANE-TA anchor for that name"
    return f"no TLSA record of {host} matches its certificate"
