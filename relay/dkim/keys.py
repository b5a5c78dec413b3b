"""DKIM private keys: read and checked once, when the configuration is loaded.

A key is a PEM file (PKCS#8, or PKCS#1 for RSA) holding an RSA key (RFC 6376, RFC 8301:
at least 1024 bits) or an Ed25519 key (RFC 8463). It is parsed with `cryptography`,
which reads every PEM form `openssl` writes, and handed to dkimpy in the form dkimpy
takes: PKCS#1 PEM for RSA (its own ASN.1 reader knows no PKCS#8), the base64 seed for
Ed25519. Each loaded key then signs a probe message, so a key dkimpy cannot use fails at
load (`check-config`, start, reload), not at a client's DATA.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import dkim
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x25519

from relay.config.model import Dkim, DkimKey

Algorithm = Literal["rsa", "ed25519"]
# dkimpy's name of each algorithm (the a= tag).
SIGNATURE_ALGORITHMS: dict[Algorithm, bytes] = {"rsa": b"rsa-sha256", "ed25519": b"ed25519-sha256"}
# RFC 8301 §3.2: signers MUST use RSA keys of at least 1024 bits (verifiers refuse less).
MIN_RSA_BITS = 1024
# A PEM key is a few KiB (an RSA-8192 key is ~6.3 KiB); a bigger file is not a key, and
# reading it whole would let a wrong path (a log file) take the config load's memory.
MAX_KEY_FILE = 64 * 1024
# Keys that PEM files hold but DKIM has no algorithm for, named for the error message.
_OTHER_KINDS: tuple[tuple[type, str], ...] = (
    (ec.EllipticCurvePrivateKey, "an ECDSA"),
    (dsa.DSAPrivateKey, "a DSA"),
    (ed448.Ed448PrivateKey, "an Ed448"),
    (x25519.X25519PrivateKey, "an X25519"),
)
_PROBE = b"From: <probe@invalid>\r\nSubject: probe\r\n\r\nprobe\r\n"


class KeyProblem(ValueError):
    """A key file that cannot be used; the message is a sentence about the file."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A key ready for dkimpy, with what its DNS record publishes."""

    domain: str  # the d= tag: the configured signing domain
    selector: str  # the s= tag
    algorithm: Algorithm
    path: str
    public: str  # the p= tag: base64 SubjectPublicKeyInfo (RSA) or raw key (Ed25519)
    bits: int  # RSA modulus size; 256 for Ed25519
    secret: bytes = field(repr=False)  # never in a log line or a traceback's locals


@dataclass(frozen=True, slots=True)
class KeySet:
    """What a `dkim` config section loaded: the usable keys, and a sentence per entry
    that is not (named by its key path, like every config problem)."""

    keys: tuple[SigningKey, ...]
    problems: tuple[str, ...]
    broken: Mapping[str, str]  # signing domain → the problem of its entry that did not load


def load_keys(config: Dkim) -> KeySet:
    """Read every configured key. Never raises: a bad entry is a problem and marks its
    domain broken, so the signer refuses that domain's mail rather than sign it with
    fewer keys than the config lists."""
    keys: list[SigningKey] = []
    problems: list[str] = []
    broken: dict[str, str] = {}
    taken: dict[tuple[str, Algorithm], int] = {}
    selectors: dict[tuple[str, str], int] = {}

    def refuse(domain: str, problem: str) -> None:
        problems.append(problem)
        broken.setdefault(domain, problem)

    for index, entry in enumerate(config.keys):
        path = f"dkim.keys[{index}]"
        other = selectors.setdefault((entry.domain, entry.selector), index)
        if other != index:
            # One selector is one DNS record: two keys cannot both be published there.
            refuse(
                entry.domain,
                f"{path}.selector: {entry.selector} for {entry.domain} is also "
                f"dkim.keys[{other}]'s; each key needs a selector of its own",
            )
            continue
        try:
            key = load_key(entry)
        except KeyProblem as exc:
            refuse(entry.domain, f"{path}.key: {exc}")
            continue
        other = taken.setdefault((key.domain, key.algorithm), index)
        if other != index:
            # "Sign with both" is one RSA and one Ed25519 signature (RFC 8463 §4's pairing);
            # two of one kind would be a rotation left half done.
            refuse(
                key.domain,
                f"{path}: a second {key.algorithm} key for {key.domain} (dkim.keys[{other}] "
                "is one); list one key per algorithm and domain",
            )
            continue
        keys.append(key)
    return KeySet(tuple(keys), tuple(problems), broken)


def load_key(entry: DkimKey) -> SigningKey:
    """The key at `entry.key`, checked; KeyProblem says what is wrong with the file."""
    try:
        with open(entry.key, "rb") as handle:
            data = handle.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise KeyProblem(f"cannot read {entry.key}: {exc.strerror or exc}") from exc
    if len(data) > MAX_KEY_FILE:
        raise KeyProblem(f"{entry.key} is larger than any key ({MAX_KEY_FILE} bytes)")
    key = parse_pem(data, entry.key)
    signing = signing_key(key, entry.domain, entry.selector, entry.key)
    probe(signing)
    return signing


def parse_pem(data: bytes, path: str) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:  # cryptography's word for "encrypted, and no password given"
        raise KeyProblem(
            f"{path} is encrypted; relay reads unencrypted keys (keep the file mode 0600)"
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyProblem(f"{path} is not a PEM private key") from exc
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyProblem(
                f"{path} is a {key.key_size}-bit RSA key; RFC 8301 requires at least "
                f"{MIN_RSA_BITS} bits (2048 recommended)"
            )
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    kind = next((name for cls, name in _OTHER_KINDS if isinstance(key, cls)), "another kind of")
    raise KeyProblem(f"{path} is {kind} key; DKIM signs with RSA or Ed25519")


def signing_key(
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey, domain: str, selector: str, path: str
) -> SigningKey:
    if isinstance(key, rsa.RSAPrivateKey):
        secret = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return SigningKey(
            domain, selector, "rsa", path, base64.b64encode(public).decode(), key.key_size, secret
        )
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return SigningKey(
        domain,
        selector,
        "ed25519",
        path,
        base64.b64encode(raw).decode(),
        256,
        base64.b64encode(seed),
    )


def probe(key: SigningKey) -> None:
    """Sign a small message, as the listener will: catches what dkimpy itself refuses
    (and an Ed25519 key without PyNaCl installed) while the admin is looking."""
    try:
        dkim.DKIM(_PROBE, signature_algorithm=SIGNATURE_ALGORITHMS[key.algorithm]).sign(
            key.selector.encode(), key.domain.encode(), key.secret, include_headers=[b"from"]
        )
    except Exception as exc:  # dkimpy's errors are not all DKIMException (ASN.1, nacl)
        raise KeyProblem(f"{key.path}: dkimpy cannot sign with it: {exc}") from exc
