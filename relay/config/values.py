"""Scalar values of the YAML: each parser returns the value or raises ValueError with a
sentence fit to follow "key.path: ". Anything that reaches the wire is checked for CR/LF."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any, TypeVar

from relay.config import model as m

T = TypeVar("T")
HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?$")


def integer(minimum: int = 0, maximum: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected a whole number, got {value!r}")
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and at most {maximum}" if maximum is not None else ""
            raise ValueError(f"expected at least {minimum}{upper}, got {value}")
        return value

    return parse


def number(minimum: float, maximum: float | None = None) -> Callable[[Any], float]:
    """A whole or decimal number in [minimum, maximum]."""

    def parse(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a number, got {value!r}")
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and at most {maximum:g}" if maximum is not None else ""
            raise ValueError(f"expected at least {minimum:g}{upper}, got {value:g}")
        return float(value)

    return parse


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {value!r}")
    if "\r" in value or "\n" in value:
        raise ValueError("must not contain CR or LF")
    return value


def choice(*options: str) -> Callable[[Any], Any]:
    """The value, if it is one of `options` (typed Any: the caller's Literal type)."""

    def parse(value: Any) -> Any:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
        return str(value)

    return parse


def hostname(value: Any) -> str:
    text = string(value)
    if not HOSTNAME.match(text):
        raise ValueError(f"expected a host name like relay.example.org, got {value!r}")
    return text


def ip_address(value: Any) -> str:
    text = string(value)
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"expected an IP address, got {value!r}") from None
    return text


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and their IPv4-mapped forms (::ffff:127.0.0.1, which
    Python 3.11's is_loopback does not count); False for wildcards and anything else."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def network(value: Any) -> m.IPNetwork:
    try:
        return ipaddress.ip_network(string(value), strict=False)
    except ValueError:
        raise ValueError(f'expected a CIDR like "192.0.2.0/24", got {value!r}') from None


def host_port(default_port: int) -> Callable[[Any], tuple[str, int]]:
    """ "host", "host:port", "[v6]:port", "v6" → (host, port)."""

    def parse(value: Any) -> tuple[str, int]:
        text = string(value)
        match = re.match(r"^\[([0-9A-Fa-f:.]+)\](?::(\d+))?$", text)
        if match:
            host, port = match.group(1), match.group(2)
        elif text.count(":") == 1:
            host, port = text.split(":")
        else:
            host, port = text, None
        port_number = int(port) if port and port.isdigit() else default_port
        if (port is not None and not port.isdigit()) or not 0 < port_number < 65536:
            raise ValueError(f'expected "host" or "host:port", got {value!r}')
        if ":" not in host and not HOSTNAME.match(host):
            raise ValueError(f'expected "host" or "host:port", got {value!r}')
        return host, port_number

    return parse


def string_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"expected a list of strings, got {type(value).__name__}")
    return tuple(string(item) for item in value)


def regex(value: Any) -> re.Pattern[str]:
    try:
        return re.compile(string(value), re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"is not a valid regular expression: {exc}") from None


def optional(parse: Callable[[Any], T]) -> Callable[[Any], T | None]:
    return lambda value: None if value is None else parse(value)


def password(value: Any) -> m.Secret:
    text = string(value)
    if not text.startswith("scrypt:"):
        raise ValueError(
            'plaintext passwords are refused: put the hash printed by "relay passwd" here'
        )
    return m.Secret(text)
