"""Short dir() listings for the objects aiosmtpd introspects at every new session.

aiosmtpd's SMTP.__init__ builds its command, hook and AUTH tables from dir() and
inspect.getmembers() of the session and of its handler, once per connection. Over the
full attribute list of SMTP that was the largest single cost of a short session: about
15 % of the event loop at 500 sessions a second. Those tables only keep names with
these prefixes, so a dir() that lists just them builds the same tables.
"""

from __future__ import annotations

PREFIXES = ("smtp_", "auth_", "handle_")
_names: dict[type, list[str]] = {}


def dispatch_names(cls: type) -> list[str]:
    """The attribute names of `cls` that aiosmtpd looks up by prefix, sorted like dir()."""
    names = _names.get(cls)
    if names is None:
        names = _names[cls] = sorted(n for n in dir(cls) if n.startswith(PREFIXES))
    return names
