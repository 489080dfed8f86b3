"""The fleet manager's state behind a small interface: typed rows (:mod:`~fleet.store.rows`), one protocol per
concern (:mod:`~fleet.store.api`) and :func:`open_store`, which picks the backend from a URL.

    >>> store = open_store("sqlite:///var/lib/edgefleet/fleet.db")   # or a plain path
    >>> [d.device_id for d in store.devices()]

SQLite (WAL) is the backend today; PostgreSQL plugs in here, behind the same protocols.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from fleet.errors import FleetError, StoreUnavailable
from fleet.store.api import Store
from fleet.store.schema import SCHEMA_VERSION
from fleet.store.sqlite import SqliteStore

__all__ = ["SCHEMA_VERSION", "Store", "StoreUnavailable", "open_store"]


def open_store(url: str | Path, *, read_only: bool = False) -> Store:
    """The store at ``url``: ``sqlite:///ABSOLUTE/PATH``, ``sqlite:RELATIVE/PATH`` or a plain path to a SQLite file.

    A new SQLite file is created and brought to the current schema unless ``read_only``; a read-only store writes
    nothing at all. Raises :class:`StoreUnavailable` if the database cannot be opened, :class:`FleetError`
    (``bad_store_url``) for a URL of no known backend.
    """
    if isinstance(url, Path):
        return SqliteStore(url, read_only=read_only)
    parts = urlsplit(url)
    if not parts.scheme:
        return SqliteStore(Path(url), read_only=read_only)
    if parts.scheme == "sqlite":
        path = unquote(parts.path if not parts.netloc else f"/{parts.netloc}{parts.path}")
        if not path:
            raise FleetError("bad_store_url", f"{url!r} names no file", "use sqlite:///ABSOLUTE/PATH/fleet.db")
        return SqliteStore(Path(path), read_only=read_only)
    raise FleetError(
        "bad_store_url",
        f"no store backend for {parts.scheme}:// URLs ({url!r})",
        "use sqlite:///PATH/fleet.db (PostgreSQL is planned, not built)",
    )
