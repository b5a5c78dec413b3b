"""Envelope paths and ESMTP parameters (RFC 5321 §4.1.2, RFC 6531, RFC 3461).

Strict on purpose: an address we accept is one every later hop will accept.
"""

from __future__ import annotations

import re

from relay.domains import InvalidDomain, normalize_domain

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = re.compile(rf"^{_ATOM}(?:\.{_ATOM})*$")
_QUOTED = re.compile(r'^"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"$')
_PARAM = re.compile(r"^([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?$")


class PathError(ValueError):
    """The path or its parameters are malformed; the message says how."""


def _valid_domain(domain: str) -> str | None:
    """The normalised domain (SPEC §5), or None. A literal must be an IP address; a
    name needs two labels at least: mail to a bare host name is a typo, not a route."""
    try:
        normal = normalize_domain(domain)
    except InvalidDomain:
        return None
    if normal.startswith("[") or "." in normal:
        return normal
    return None


def normalized_mailbox(address: str, utf8: bool = False) -> str | None:
    """The mailbox with its domain normalised, or None when it is not one we accept.

    Without SMTPUTF8 (RFC 6531) the address must be ASCII as sent, even where the
    domain would map to an ASCII A-label: the client has not said it may send UTF-8.
    """
    try:
        address.encode("utf-8")  # invalid UTF-8 arrives as lone surrogates: refuse it
    except UnicodeEncodeError:
        return None
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or len(address) > 254 or len(local) > 64:
        return None
    if not utf8 and not address.isascii():
        return None
    if utf8 and not local.isascii():
        # RFC 6531: UTF-8 local parts; keep the atom structure, allow non-ASCII letters
        ascii_local = "".join(c if c.isascii() else "a" for c in local)
    else:
        ascii_local = local
    if not (_DOT_ATOM.match(ascii_local) or _QUOTED.match(ascii_local)):
        return None
    normal = _valid_domain(domain)
    return None if normal is None else f"{local}@{normal}"


def split_path(argument: str, keyword: str) -> tuple[str, list[str]]:
    """'FROM:<a@b> SIZE=10' → ('a@b', ['SIZE=10']). Raises PathError."""
    if argument[: len(keyword)].upper() != keyword:
        raise PathError(f"expected {keyword}<address>")
    rest = argument[len(keyword) :].lstrip()
    if not rest.startswith("<"):
        raise PathError("the address must be in angle brackets")
    end = _closing_bracket(rest)
    if end < 0:
        raise PathError("unbalanced angle brackets")
    path, params = rest[1:end], rest[end + 1 :]
    if params and not params.startswith(" "):
        raise PathError("expected a space after the address")
    if path.startswith("@"):
        raise PathError("source routes are not accepted")
    return path, params.split()


def _closing_bracket(text: str) -> int:
    quoted = escaped = False
    for position, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return position
    return -1


def parse_params(items: list[str]) -> dict[str, str]:
    """ESMTP keyword[=value] list → {KEYWORD: value}; duplicates are errors."""
    params: dict[str, str] = {}
    for item in items:
        match = _PARAM.match(item)
        if not match:
            raise PathError(f"malformed parameter {item!r}")
        key = match.group(1).upper()
        if key in params:
            raise PathError(f"parameter {key} given twice")
        params[key] = match.group(2) or ""
    return params


def decode_xtext(value: str) -> str:
    """RFC 3461 §4: +HH escapes."""
    out, position = [], 0
    while position < len(value):
        char = value[position]
        if char == "+":
            code = value[position + 1 : position + 3]
            if len(code) != 2 or not re.match(r"^[0-9A-F]{2}$", code):
                raise PathError("bad xtext escape")
            out.append(chr(int(code, 16)))
            position += 3
        else:
            out.append(char)
            position += 1
    return "".join(out)
