"""`relay dkim keygen`: a new key file, and the DNS record that publishes its public half."""

from __future__ import annotations

import os

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relay.config.values import HOSTNAME
from relay.dkim.keys import MIN_RSA_BITS, Algorithm, SigningKey, signing_key
from relay.domains import InvalidDomain, normalize_domain

# RFC 1035 §3.3.14: a TXT record is a sequence of character-strings of at most 255
# octets each; the value is split across several, which verifiers join (RFC 6376 §3.6.2.2).
TXT_STRING = 255
DEFAULT_RSA_BITS = 2048  # RFC 8301 §3.2: SHOULD be at least 2048
# A 8192-bit key's record is ~1.4 KB: past that, TCP fallback for DNS and slow signing
# (dkimpy signs in pure Python) for no gain anyone measures.
MAX_RSA_BITS = 8192


def generate(algorithm: Algorithm, bits: int) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    """PKCS#8, what `openssl genpkey` writes, for either algorithm."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_key(path: str, data: bytes) -> None:
    """Create `path` with mode 0600 and write `data`; an existing file is never replaced
    (it may be the key a published record still names).

    The mode is given at creation, so no other user can open the file between its
    creation and a chmod; fchmod then sets 0600 whatever the umask took away.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def txt_value(key: SigningKey) -> str:
    """The record's text (RFC 6376 §3.6.1; k=ed25519 is RFC 8463 §4.2)."""
    return f"v=DKIM1; k={key.algorithm}; p={key.public}"


def zone_record(key: SigningKey) -> str:
    """`S._domainkey.D. IN TXT "…" "…"`: a zone-file line, the value in quoted strings of
    at most TXT_STRING characters (the value is base64 and tags: nothing to escape)."""
    value = txt_value(key)
    strings = [value[i : i + TXT_STRING] for i in range(0, len(value), TXT_STRING)]
    quoted = " ".join(f'"{s}"' for s in strings)
    return f"{key.selector}._domainkey.{key.domain}. IN TXT {quoted}"


def keygen(
    domain: str, selector: str, algorithm: Algorithm, bits: int | None, out: str | None
) -> SigningKey:
    """Make a key, write it to `out` (default ./SELECTOR.DOMAIN.pem, mode 0600) and
    return it for its DNS record. ValueError names the option at fault; OSError
    (FileExistsError included) is the file's."""
    try:
        domain = normalize_domain(domain)
    except InvalidDomain as exc:
        raise ValueError(f"--domain: {exc}") from None
    # The selector and domain go into a zone file and the s=/d= tags: the same host-name
    # syntax the config asks of them (dkim.keys[].selector).
    if not HOSTNAME.match(selector) or not HOSTNAME.match(domain):
        bad = "--selector" if not HOSTNAME.match(selector) else "--domain"
        raise ValueError(f"{bad}: expected DNS labels like s2026 or example.org")
    if algorithm == "ed25519" and bits is not None:
        raise ValueError("--bits: applies to RSA keys only (Ed25519 keys have one size)")
    bits = DEFAULT_RSA_BITS if bits is None else bits
    if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
        raise ValueError(
            f"--bits: expected {MIN_RSA_BITS} to {MAX_RSA_BITS} (RFC 8301), got {bits}"
        )
    out = out or f"./{selector}.{domain}.pem"
    key = generate(algorithm, bits)
    write_key(out, pem(key))
    return signing_key(key, domain, selector, out)
