"""The admin token generated when `admin.token` is not set (SPEC §12, like Jupyter's).

It lives in `<spool>/admin.token`, mode 0600: whoever can read the spool can already
read every queued message, so the file gives nothing new away, and the CLI run by the
same user finds it there. It is created once, atomically, and reused by later starts;
delete it and restart to change it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat

from relay.errors import RelayError

log = logging.getLogger("relay.admin")

TOKEN_FILE = "admin.token"


class TokenFileError(RelayError, OSError):
    """The token file cannot be created or read, or holds no usable token."""


def token_path(spool_path: str) -> str:
    return os.path.join(spool_path, TOKEN_FILE)


def read_token(spool_path: str) -> str | None:
    """The generated token, or None when there is none (yet) or it cannot be read: the
    CLI then goes without, and the daemon's 401 says where the token is."""
    try:
        return _read(token_path(spool_path))
    except OSError:
        return None


def ensure_token(spool_path: str) -> str:
    """The token in the spool, created now if absent."""
    path = token_path(spool_path)
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    except TokenFileError:
        raise
    except OSError as exc:
        raise TokenFileError(f"admin token {path}: {exc.strerror or exc}") from exc
    try:
        return _create(path)
    except OSError as exc:
        raise TokenFileError(
            f"admin token {path}: cannot create it: {exc.strerror or exc}"
        ) from exc


def _read(path: str) -> str:
    # O_NOFOLLOW: a symlink planted in the spool must not make us read (or chmod) a
    # file elsewhere.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise TokenFileError(f"admin token {path}: not a regular file")
        if info.st_mode & 0o077 and info.st_uid == os.geteuid():
            # Copied or restored with a loose umask: tighten it rather than refuse to start.
            os.fchmod(handle.fileno(), 0o600)
            log.warning("admin token %s was readable by others: mode set to 0600", path)
        text = handle.read(4096).decode("ascii", "replace").strip()
    if not text or not text.isprintable() or " " in text:
        raise TokenFileError(
            f"admin token {path}: empty or garbled; delete it and restart to make a new one"
        )
    return text


def _create(path: str) -> str:
    """Write a new token to a temporary file, then link it into place: link() fails if
    the name exists, so two processes starting at once cannot both win, and a reader
    never sees a half-written file."""
    token = secrets.token_urlsafe(32)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    temporary = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(token.encode("ascii") + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return _read(path)  # another start made it first: theirs is the token
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)  # the name survives a crash, so the CLI's copy stays valid
    finally:
        os.close(dir_fd)
    log.info("admin token generated in %s (mode 0600; the CLI reads it there)", path)
    return token
