"""The SQLite store's drift: each track as the detector last left it, the detector's named state (its reading place,
each device's DDM), and the windows it reads. :class:`~fleet.store.sqlite.SqliteStore` mixes it in; the statistics
live in :mod:`fleet.drift`, the store only keeps their results."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from agent import protocol
from fleet.store.rows import DriftTrack, StoredWindow
from fleet.store.schema import dumps
from fleet.store.sqlite_reads import WriteHost, loads

_TRACK_COLUMNS = tuple(DriftTrack.__dataclass_fields__)
_JSON = ("history", "features", "classes", "figures")


class SqliteDrift:
    """Drift methods over the host store's connection, lock and audit chain."""

    def drift_tracks(self: WriteHost, states: Sequence[str] | None = None) -> list[DriftTrack]:
        """Every track (only those in ``states`` when given), by model, scope, key and kind."""
        where, params = "", ()
        if states is not None:
            where, params = f"WHERE state IN ({', '.join('?' * len(states))})", tuple(states)
        rows = self._rows(f"SELECT * FROM drift_tracks {where} ORDER BY model, scope, key, kind", params)
        return [DriftTrack(**{**r, **{k: loads(r[k]) for k in _JSON}}) for r in rows]

    def drift_state(self: WriteHost) -> dict[str, Any]:
        """The detector's named state (its reading place, each device's DDM)."""
        return {r["name"]: loads(r["value"]) for r in self._rows("SELECT name, value FROM drift_state")}

    def save_drift(
        self: WriteHost,
        tracks: Sequence[DriftTrack],
        state: Mapping[str, Any],
        audit: Sequence[tuple[str, str, str, Mapping[str, Any]]] = (),
    ) -> None:
        """Write one round of the detector in one transaction: tracks (whole rows), named state, audit entries."""
        with self._write() as conn:
            conn.executemany(
                f"INSERT OR REPLACE INTO drift_tracks ({', '.join(_TRACK_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(_TRACK_COLUMNS))})",
                [tuple(dumps(getattr(t, c)) if c in _JSON else getattr(t, c) for c in _TRACK_COLUMNS) for t in tracks],
            )
            conn.executemany(
                "INSERT OR REPLACE INTO drift_state (name, value) VALUES (?, ?)",
                [(name, dumps(value)) for name, value in state.items()],
            )
            for actor, action, subject, detail in audit:
                self._append_audit(conn, actor, action, subject, detail)

    def windows_since(self: WriteHost, rowid: int, limit: int = 5000) -> tuple[list[StoredWindow], int]:
        """Windows stored after ``rowid`` (decoded), oldest first, and the last rowid read."""
        rows = self._rows(
            "SELECT rowid AS _rowid, received_at, payload FROM windows WHERE rowid > ? ORDER BY rowid LIMIT ?",
            (rowid, limit),
        )
        found = [
            StoredWindow(r["_rowid"], protocol.decode(protocol.Kind.TELEMETRY, r["payload"]), r["received_at"])
            for r in rows
        ]
        return found, (rows[-1]["_rowid"] if rows else rowid)
