"""The SQLite store's reads, and how its queries meet sqlite3's errors: guarded queries, devices, gaps, telemetry,
install outcomes and the fleet-wide summary. :class:`~fleet.store.sqlite.SqliteStore` adds opening, locking and every
write."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import sqlite_utils

from agent import protocol
from agent.histograms import merge_windows
from fleet.errors import FleetError, StoreUnavailable
from fleet.store.rows import (
    AuditEntry,
    Device,
    DeviceDetail,
    Event,
    Gap,
    InstallOutcome,
    RepoCommit,
    Summary,
    Telemetry,
)
from fleet.store.schema import JSON_WINDOW_FIELDS, repo_commit

#: How many of a device's latest events `device()` returns.
LAST_EVENTS = 20
#: Device events that end an install attempt (the device's update flow emits them; `install_state` is progress).
INSTALL_OUTCOMES = ("install_committed", "install_failed", "rolled_back")
#: How many of a device's gaps (the latest, by seq) `device()` returns; its ``missing`` counts them all.
LAST_GAPS = 50

# A device's seqs (windows and events share one sequence) in order, each with the one stored before it: where they
# are more than one apart, the seqs between are missing. {where} narrows both tables alike (one device, or none).
_STEPS = """
WITH seqs AS (
    SELECT device_id, boot_id, seq FROM windows {where}
    UNION ALL
    SELECT device_id, boot_id, seq FROM events {where}
), steps AS (
    SELECT device_id, boot_id, seq,
           lag(seq) OVER by_seq AS prev_seq,
           lag(boot_id) OVER by_seq AS prev_boot_id
    FROM seqs
    WINDOW by_seq AS (PARTITION BY device_id ORDER BY seq, boot_id)
)
"""
_GAPS = (
    _STEPS
    + """
SELECT device_id, prev_seq + 1 AS first, seq - 1 AS last, prev_boot_id, boot_id FROM steps
WHERE seq - prev_seq > 1 ORDER BY device_id, first
"""
)
# Fleet-wide, only the count: each device's span of stored seqs less the rows that fill it (an event under the key
# of a window fills nothing more). Aggregates that read the primary keys in order (no sort: 15x faster than _GAPS over
# 500,000 windows), equal to the sum of the device's gaps while a seq is stored under one boot; the same seq stored
# under two boots (an outbox started afresh, a forged boot id) hides one missing seq here, and any gap below it in
# `gaps()`.
_MISSING = """
SELECT device_id, max(hi) - min(lo) + 1 - sum(n) AS missing FROM (
    SELECT device_id, min(seq) AS lo, max(seq) AS hi, count(*) AS n FROM windows GROUP BY device_id
    UNION ALL
    SELECT device_id, min(seq) AS lo, max(seq) AS hi, count(*) AS n FROM events GROUP BY device_id
    UNION ALL
    SELECT e.device_id, NULL, NULL, -count(*) FROM events e
    JOIN windows w ON w.device_id = e.device_id AND w.boot_id = e.boot_id AND w.seq = e.seq GROUP BY e.device_id
) GROUP BY device_id HAVING missing > 0 ORDER BY device_id
"""


def store_error(exc: sqlite3.Error, path: Path) -> FleetError:
    """A sqlite3 error as the fleet's error: why the database cannot work now and what to do, or a data refusal."""
    text = str(exc)
    if "readonly" in text or "read-only" in text:
        return StoreUnavailable("read_only", f"{path} is read-only: {text}", "run write commands as the home's owner")
    if "full" in text:
        return StoreUnavailable("disk_full", f"{path}: {text}", "free space on its disk")
    if "locked" in text or "busy" in text:
        return StoreUnavailable("locked", f"{path}: {text}", "another process holds the database; try again")
    if "not a database" in text or "malformed" in text:
        return StoreUnavailable("corrupt", f"{path}: {text}", "restore fleet.db from a backup")
    if isinstance(exc, sqlite3.OperationalError | sqlite3.InternalError) or type(exc) is sqlite3.DatabaseError:
        return StoreUnavailable("unavailable", f"{path}: {text}", "check the disk and the file's permissions")
    return FleetError("unstorable", text)


class WriteHost(Protocol):
    """What the store's mixins (:mod:`fleet.store.sqlite_campaigns`, :mod:`fleet.store.sqlite_drift`) use of
    :class:`~fleet.store.sqlite.SqliteStore`: its write transaction, its guarded reads and its audit chain."""

    def _write(self) -> AbstractContextManager[sqlite3.Connection]: ...

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]: ...

    @staticmethod
    def _append_audit(
        conn: sqlite3.Connection, actor: str, action: str, subject: str, detail: Mapping[str, Any]
    ) -> AuditEntry: ...


def loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class SqliteReads:
    """The read methods of the SQLite store, over one connection (``db``) serialized by ``_lock``."""

    path: Path
    db: sqlite_utils.Database
    _lock: threading.Lock

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """sqlite3's errors leave as the fleet's (see :func:`store_error`)."""
        try:
            yield
        except sqlite3.Error as exc:
            raise store_error(exc, self.path) from None

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._lock, self._guard():
            return [dict(row) for row in self.db.query(sql, params)]

    def devices(self) -> list[Device]:
        """Every known device with its state and how many distinct windows are stored for it."""
        rows = self._rows(
            f"SELECT d.*, (SELECT count(*) FROM windows w WHERE w.device_id = d.device_id) AS windows, {_TAGS} "
            "FROM devices d ORDER BY d.device_id"
        )
        return [_device(r) for r in rows]

    def device(self, device_id: str) -> DeviceDetail | None:
        """One device in detail, with its event count, latest events and latest install outcome; None if unknown."""
        rows = self._rows(
            "SELECT d.*, (SELECT count(*) FROM windows w WHERE w.device_id = d.device_id) AS windows, "
            f"(SELECT count(*) FROM events e WHERE e.device_id = d.device_id) AS events, {_TAGS} "
            "FROM devices d WHERE d.device_id = ?",
            (device_id,),
        )
        if not rows:
            return None
        row = rows[0]
        events = row.pop("events")
        latest = self._rows(
            "SELECT * FROM events WHERE device_id = ? ORDER BY ts DESC, seq DESC LIMIT ?", (device_id, LAST_EVENTS)
        )
        gaps = self.gaps(device_id)
        return DeviceDetail(
            _device(row),
            events,
            tuple(_event(e) for e in latest),
            self.last_install(device_id),
            tuple(gaps[-LAST_GAPS:]),
            sum(g.missing for g in gaps),
        )

    def tags(self) -> dict[str, dict[str, str]]:
        """Every enrolled device's tags (its latest enrollment's), without the registry's per-device counts."""
        rows = self._rows("SELECT device_id, json_extract(detail, '$.tags') AS tags FROM enrollments")
        return {r["device_id"]: loads(r["tags"]) or {} for r in rows}

    def gaps(self, device_id: str | None = None) -> list[Gap]:
        """The runs of seqs missing between a device's stored windows and events (every device's, without
        ``device_id``), by device and seq. Seqs before the first stored one and after the last are not gaps: the
        fleet cannot tell those from seqs of an outbox it never heard from, or not sent yet."""
        where, params = ("WHERE device_id = ?", (device_id, device_id)) if device_id is not None else ("", ())
        return [Gap(**row) for row in self._rows(_GAPS.format(where=where), params)]

    def missing_counts(self) -> dict[str, int]:
        """How many seqs are missing in the gaps of each device that has any (see ``_MISSING``)."""
        return {r["device_id"]: r["missing"] for r in self._rows(_MISSING)}

    def last_install(self, device_id: str) -> InstallOutcome | None:
        """The device's latest install outcome (committed, failed, rolled back), or None."""
        marks = ", ".join("?" * len(INSTALL_OUTCOMES))
        rows = self._rows(
            f"SELECT type, model, ts, detail FROM events WHERE device_id = ? AND type IN ({marks}) "
            "ORDER BY ts DESC, seq DESC LIMIT 1",
            (device_id, *INSTALL_OUTCOMES),
        )
        if not rows:
            return None
        row = rows[0]
        detail = loads(row["detail"]) or {}
        return InstallOutcome(
            row["type"], row["model"], detail.get("release"), detail.get("reason"), detail.get("seq"), row["ts"]
        )

    def telemetry(
        self, device_id: str, model: str | None = None, since: float | None = None, until: float | None = None
    ) -> Telemetry:
        """A device's windows that start in [since, until), and their histograms merged per (model, release).

        Merging is per release because the feature bin edges come from the signed release: only windows of the
        same release have histograms that add up bin by bin.
        """
        sql = "SELECT * FROM windows WHERE device_id = ?"
        params: list[Any] = [device_id]
        for clause, value in (("model = ?", model), ("window_start >= ?", since), ("window_start < ?", until)):
            if value is not None:
                sql += f" AND {clause}"
                params.append(value)
        rows = self._rows(sql + " ORDER BY window_start, boot_id, seq", params)
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for row in rows:
            window = protocol.decode(protocol.Kind.TELEMETRY, row.pop("payload"))
            row.update({field: window[field] for field in JSON_WINDOW_FIELDS if field in window})
            groups.setdefault((row["model"], row["release"]), []).append(row)
        merged = []
        for key in sorted(groups):
            group = groups[key]
            summed = merge_windows(group)
            summed["windows"] = len(group)
            summed["dropped"] = sum(w["dropped"] for w in group)  # merge_windows leaves envelope fields out
            merged.append(summed)
        return Telemetry(device_id, model, since, until, rows, merged)

    def window_counts(self) -> dict[str, int]:
        """Distinct windows stored per device."""
        rows = self._rows("SELECT device_id, count(*) AS n FROM windows GROUP BY device_id")
        return {r["device_id"]: r["n"] for r in rows}

    def reject_counts(self) -> dict[str, int]:
        """Rejected messages per reason, since the database was made."""
        return {r["reason"]: r["count"] for r in self._rows("SELECT reason, count FROM rejects ORDER BY reason")}

    def last_repo_commit(self) -> RepoCommit | None:
        """What the fleet's last change left in its TUF repository, or None before its first recorded change."""
        rows = self._rows("SELECT * FROM repo_commits ORDER BY id DESC LIMIT 1")
        return repo_commit(rows[0]) if rows else None

    def summary(self) -> Summary:
        """Fleet-wide counts for `fleet status`."""
        devices = self._rows("SELECT count(*) AS total, coalesce(sum(online), 0) AS online FROM devices")[0]
        windows = self._rows("SELECT count(*) AS n FROM windows")[0]["n"]
        events = self._rows("SELECT count(*) AS n FROM events")[0]["n"]
        return Summary(
            devices["total"], devices["online"], windows, events, self.reject_counts(), self.missing_counts()
        )


#: A device's tags, from its latest enrollment (the enrollment's audited detail holds them).
_TAGS = "(SELECT json_extract(n.detail, '$.tags') FROM enrollments n WHERE n.device_id = d.device_id) AS tags"


def _device(row: dict[str, Any]) -> Device:
    return Device(
        device_id=row["device_id"],
        first_seen=row["first_seen"],
        last_seen=row["last_seen"],
        online=bool(row["online"]),
        boot_id=row["boot_id"],
        agent_version=row["agent_version"],
        hardware=loads(row["hardware"]),
        runtimes=loads(row["runtimes"]),
        models=loads(row["models"]),
        offline_reason=row["offline_reason"],
        windows=row["windows"],
        tags=loads(row["tags"]) or {},
    )


def _event(row: dict[str, Any]) -> Event:
    return Event(**{**row, "detail": loads(row["detail"])})
