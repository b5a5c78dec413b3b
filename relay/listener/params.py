"""ESMTP parameters of MAIL and RCPT: which we take, and what their values may be.

SIZE (RFC 1870), BODY (RFC 6152), SMTPUTF8 (RFC 6531), RET, ENVID, NOTIFY and ORCPT
(RFC 3461), AUTH (RFC 4954 §5). Values are kept as the client wrote them except where
a canonical form is stated; each check returns the refusal to send, or None.
"""

from __future__ import annotations

import unicodedata

from relay.listener.address import PathError, decode_xtext
from relay.listener.policy import Refusal

MAX_ENVID = 100  # RFC 3461 §4.4


def _has_control(text: str) -> bool:
    """C0, DEL or C1. ENVID and ORCPT are copied into DSNs, logs and the next hop's
    envelope: a decoded CR, LF or NUL there would start a new header or command line
    (header or SMTP injection), so they are refused where they arrive."""
    return any(unicodedata.category(char) == "Cc" for char in text)


def check_mail_params(params: dict[str, str], max_size: int) -> Refusal | None:
    """MAIL parameters; RET is upper-cased and ENVID decoded in place."""
    for key, value in params.items():
        if key == "SIZE":
            if not value.isdigit():
                return Refusal("501 5.5.4 SIZE takes a number")
            if int(value) > max_size:
                return Refusal("552 5.3.4 Message size exceeds fixed maximum message size", "size")
        elif key == "BODY":
            if value.upper() not in ("7BIT", "8BITMIME"):
                return Refusal("501 5.5.4 BODY is 7BIT or 8BITMIME")
        elif key == "SMTPUTF8":
            if value:
                return Refusal("501 5.5.4 SMTPUTF8 takes no value")
        elif key == "RET":
            if value.upper() not in ("FULL", "HDRS"):
                return Refusal("501 5.5.4 RET is FULL or HDRS")
            params[key] = value.upper()
        elif key == "ENVID":
            try:
                params[key] = decode_xtext(value)
            except PathError:
                return Refusal("501 5.5.4 ENVID must be xtext")
            if len(params[key]) > MAX_ENVID:
                return Refusal("501 5.5.4 ENVID is too long")
            if _has_control(params[key]):
                return Refusal("501 5.5.4 ENVID must not contain control characters")
        elif key == "AUTH":
            continue  # informational; we record the authenticated account
        else:
            return Refusal(f"555 5.5.4 Unsupported MAIL parameter {key}")
    return None


def check_rcpt_params(params: dict[str, str]) -> Refusal | None:
    """RCPT parameters; NOTIFY is upper-cased in place, ORCPT kept as sent (xtext)."""
    for key, value in params.items():
        if key == "NOTIFY":
            words = value.upper().split(",")
            if not (words == ["NEVER"] or set(words) <= {"SUCCESS", "FAILURE", "DELAY"}):
                return Refusal("501 5.5.4 NOTIFY is NEVER or SUCCESS,FAILURE,DELAY")
            params[key] = ",".join(words)
        elif key == "ORCPT":
            kind, semi, address = value.partition(";")
            if not semi or not kind:
                return Refusal("501 5.5.4 ORCPT is addr-type;xtext")
            try:
                decoded = decode_xtext(address)
            except PathError:
                return Refusal("501 5.5.4 ORCPT is addr-type;xtext")
            if _has_control(decoded):
                return Refusal("501 5.5.4 ORCPT must not contain control characters")
        else:
            return Refusal(f"555 5.5.4 Unsupported RCPT parameter {key}")
    return None
