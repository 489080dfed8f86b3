"""The SQLite schema of the fleet store and its migrations.

Each migration takes the database one version up; ``PRAGMA user_version`` records how far it got. A database newer
than this code is refused, never written.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence

import sqlite_utils

from agent import protocol
from fleet.errors import StoreUnavailable

#: A window's histograms and health: schema v1-v2 stored them as JSON text columns, v3 keeps them in ``payload``.
_JSON_WINDOW_FIELDS = ("latency", "confidence", "classes", "features", "feedback", "health")
#: The envelope and counters, as columns for SQL (name: type).
_WINDOW_SCALARS: Mapping[str, type] = {
    "device_id": str,
    "boot_id": str,
    "seq": int,
    "model": str,
    "release": str,
    "window_start": float,
    "window_end": float,
    "count": int,
    "errors": int,
    "dropped": int,
    "received_at": float,
}
#: v3: the scalars, then the whole window as ``payload``: the wire bytes the device sent.
_WINDOW_COLUMNS = (*_WINDOW_SCALARS, "payload")



def _schema_v1(db: sqlite_utils.Database) -> None:
    db["devices"].create(
        {
            "device_id": str,
            "first_seen": float,
            "last_seen": float,
            "online": bool,
            "boot_id": str,
            "agent_version": str,
            "hardware": str,
            "runtimes": str,
            "models": str,
            "offline_reason": str,
        },
        pk="device_id",
        not_null=["first_seen", "last_seen", "online"],
    )
    db["windows"].create(
        {**_WINDOW_SCALARS, **dict.fromkeys(_JSON_WINDOW_FIELDS, str)},
        pk=("device_id", "boot_id", "seq"),
        not_null=[*_WINDOW_SCALARS, *(f for f in _JSON_WINDOW_FIELDS if f != "feedback")],
    )
    db["windows"].create_index(["device_id", "window_start"])
    db["windows"].create_index(["device_id", "model"])
    db["events"].create(
        {
            "device_id": str,
            "boot_id": str,
            "seq": int,
            "ts": float,
            "type": str,
            "model": str,
            "detail": str,
            "received_at": float,
        },
        pk=("device_id", "boot_id", "seq"),
        not_null=["ts", "type", "detail", "received_at"],
    )
    db["events"].create_index(["device_id", "ts"])
    db["rejects"].create(
        {"reason": str, "count": int, "last_detail": str, "last_topic": str, "last_seen": float},
        pk="reason",
        not_null=["count", "last_seen"],
    )


def _schema_v2(db: sqlite_utils.Database) -> None:
    db["audit"].create(
        {
            "id": int,
            "ts": float,
            "actor": str,
            "action": str,
            "subject": str,
            "detail": str,
            "prev_hash": str,
            "hash": str,
        },
        pk="id",
        not_null=["ts", "actor", "action", "subject", "detail", "prev_hash", "hash"],
    )
    for verb in ("UPDATE", "DELETE"):
        db.execute(
            f"CREATE TRIGGER audit_no_{verb.lower()} BEFORE {verb} ON audit "
            "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END"
        )
    db["desired"].create(
        {
            "device_id": str,
            "seq": int,
            "issued": float,
            "expires": float,
            "campaign": str,
            "models": str,
            "created_at": float,
            "published_at": float,
        },
        pk=("device_id", "seq"),
        not_null=["issued", "expires", "models", "created_at"],
    )


def _schema_v3(db: sqlite_utils.Database) -> None:
    """Windows keep their histograms as the device sent them: the zlib-compressed JSON payload, which
    ``protocol.decode`` checked on the way in, replaces the JSON text columns. A third of the bytes, nothing to
    re-encode on the ingest's hot path, and one index fewer to update per window."""
    scalars = list(_WINDOW_SCALARS)
    db["windows_v3"].create(
        {**_WINDOW_SCALARS, "payload": bytes}, pk=("device_id", "boot_id", "seq"), not_null=_WINDOW_COLUMNS
    )
    rows = db.execute(f"SELECT {', '.join(scalars)}, {', '.join(_JSON_WINDOW_FIELDS)} FROM windows")
    insert = f"INSERT INTO windows_v3 VALUES ({', '.join('?' * len(_WINDOW_COLUMNS))})"
    while chunk := rows.fetchmany(1000):
        converted = []
        for row in chunk:
            window = dict(zip(scalars, row, strict=False))
            for field, text in zip(_JSON_WINDOW_FIELDS, row[len(scalars) :], strict=True):
                if text is not None:
                    window[field] = json.loads(text)
            message = {"v": protocol.SCHEMA_VERSION, **window}
            del message["received_at"]
            converted.append((*row[: len(scalars)], protocol.encode(protocol.Kind.TELEMETRY, message)))
        db.conn.executemany(insert, converted)
    db.execute("DROP TABLE windows")
    db.execute("ALTER TABLE windows_v3 RENAME TO windows")
    db["windows"].create_index(["device_id", "window_start"])


def _schema_v4(db: sqlite_utils.Database) -> None:
    """Devices the fleet enrolled, heard from or not: `fleet assign` refuses a device that is neither (a typo)."""
    db["enrollments"].create(
        {"device_id": str, "enrolled_at": float, "detail": str}, pk="device_id", not_null=["enrolled_at", "detail"]
    )
    db.execute(
        "INSERT OR IGNORE INTO enrollments (device_id, enrolled_at, detail) "
        "SELECT subject, ts, detail FROM audit WHERE action = 'enroll' ORDER BY id"
    )


MIGRATIONS: Sequence[Callable[[sqlite_utils.Database], None]] = (_schema_v1, _schema_v2, _schema_v3, _schema_v4)
SCHEMA_VERSION = len(MIGRATIONS)


def _user_version(db: sqlite_utils.Database) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite_utils.Database) -> int:
    """Bring the schema up to :data:`SCHEMA_VERSION`, one transaction per step; returns the version found.

    Each step takes the write lock first and re-reads the version, so two processes opening a new database at
    once (`fleet serve` and a CLI command) cannot both run it.
    """
    found = _user_version(db)
    if found > SCHEMA_VERSION:
        raise StoreUnavailable(
            "schema_too_new",
            f"the database has schema v{found}, newer than this fleet manager (v{SCHEMA_VERSION})",
            "upgrade edgefleet to the version that wrote it",
        )
    version = found
    while version < SCHEMA_VERSION:
        db.conn.execute("BEGIN IMMEDIATE")
        try:
            version = _user_version(db)
            if version < SCHEMA_VERSION:
                MIGRATIONS[version](db)
                version += 1
                db.execute(f"PRAGMA user_version = {version}")
            db.conn.execute("COMMIT")
        except BaseException:
            db.conn.execute("ROLLBACK")
            raise
    return found


