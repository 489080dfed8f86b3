"""Crash-safe file writes: a hidden temporary file beside the target, fsync, rename, fsync of the folder.

Readers (and a process restarted after SIGKILL or power loss) see the old file or the new one, never half of one.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import tempfile
from pathlib import Path

PUBLIC_FILE_MODE = 0o644
#: The errnos of a write refused for want of space (a full disk, a quota, a file size limit).
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a write refused for want of space: a full disk for a file or for SQLite (SQLITE_FULL)."""
    if isinstance(exc, OSError):
        return exc.errno in DISK_FULL_ERRNOS
    return isinstance(exc, sqlite3.OperationalError) and exc.sqlite_errorcode == sqlite3.SQLITE_FULL


def fsync_path(path: Path) -> None:
    """Flush a file or a folder (a rename is durable only once its folder is flushed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stage(path: Path, data: bytes, *, mode: int = PUBLIC_FILE_MODE, durable: bool = True) -> Path:
    """Write ``data`` to a hidden temporary file in ``path``'s folder and return it; the caller renames it."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


def write_atomic(path: Path, data: bytes, *, mode: int = PUBLIC_FILE_MODE, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically. ``durable=False`` skips the fsyncs for files rewritten often
    that only inform (a status file): still never half-written, but a power loss may bring back an older one."""
    temp = stage(path, data, mode=mode, durable=durable)
    try:
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)
