"""Log setup: Postfix-like text lines, or one JSON object per line."""

from __future__ import annotations

import json
import logging
import sys
import time

# What every LogRecord carries; any other attribute was given as `extra=` by the caller.
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        # Structured facts a line passes as `extra=` (the delivery line's provider and
        # reply) become keys, so readers such as `relay replay` need not parse the text.
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


_current = ("text", "INFO")


def current() -> tuple[str, str]:
    """The format and level `setup` was given: the listener process logs the same way."""
    return _current


def setup(fmt: str = "text", level: str = "INFO") -> None:
    global _current
    _current = (fmt, level)
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiosmtpd logs every command at INFO and warns about its own internal use of
    # Session.login_data on every AUTH; our own log lines say what matters.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
