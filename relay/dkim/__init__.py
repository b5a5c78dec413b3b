"""DKIM signing (RFC 6376, Ed25519 by RFC 8463) with dkimpy, as SPEC §11 sets it out.

    keys.py     read and check the configured PEM keys (config load: check-config,
                start, reload); each problem named by its key path
    signer.py   the From: domain picks the keys; sign once, at acceptance
    keygen.py   `relay dkim keygen`: a new key file and its DNS TXT record

The listener signs each message after its trace headers are added and its long lines
broken, right before the spool stores it: every recipient and every retry sends the
same signed bytes, and the delivery side never touches a key.
"""

from relay.dkim.keys import KeySet, SigningKey, load_keys
from relay.dkim.signer import Signature, Signer
from relay.errors import SigningError

__all__ = ["KeySet", "Signature", "Signer", "SigningError", "SigningKey", "load_keys"]
