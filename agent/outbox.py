"""Bounded, durable store-and-forward for what the device publishes with QoS 1 (telemetry and events).

Messages wait here, in SQLite, until the fleet says it stored them (its acknowledgement on the device's ``ack``
topic, see :mod:`agent.link`), so they survive broker outages, brokers that restart without their state, and reboots.
Each message gets a ``seq`` that never repeats for this outbox (the fleet drops duplicates by it). The outbox is
bounded in rows and payload bytes: past a bound the OLDEST telemetry windows are dropped, and the number dropped is
reported, exactly once, in the ``dropped`` field of the next telemetry message. Events (installs, rollbacks, ...)
are never dropped.

Durability: WAL with ``synchronous=NORMAL``. A killed agent (SIGKILL, crash) loses nothing committed; a power cut
may lose the last few commits (never corrupts the file). The trade buys appends without an fsync each, which
matters on SD cards (latency and wear); device state that must survive power loss is written elsewhere with fsync.

Exactly-once drop accounting: a telemetry message carries the drops it reports in a column too, so when a
message that reported drops is itself dropped, those drops are owed again. Every step happens in the same
transaction as the append or eviction, so a crash can neither lose nor double count a drop.

Opening runs ``PRAGMA quick_check``, so a damaged file is reported at start, naming the file and the fix, rather
than failing midway. ``max_bytes`` bounds payload bytes; the file is somewhat larger (page overhead, the WAL before
a checkpoint), and freed pages are reused rather than returned to the filesystem. One process should own an outbox.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import Counter, deque
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from agent.logs import event
from agent.protocol import Kind, encode

log = logging.getLogger(__name__)

#: PRAGMA user_version of the schema below; bump it with a migration when the schema changes.
SCHEMA_VERSION = 2
#: How long a statement waits for another connection's lock (a status command reading stats) before failing.
_BUSY_TIMEOUT_S = 5.0
_QOS = 1
_KINDS = (Kind.TELEMETRY, Kind.EVENTS)

# Row and byte totals live in ``state`` and triggers keep them right, so bounds are checked without a table scan.
_SCHEMA = f"""
BEGIN;
CREATE TABLE outbox (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    created REAL NOT NULL,
    dropped INTEGER NOT NULL DEFAULT 0,  -- drops this telemetry message reports; owed again if it is dropped
    boot_id TEXT NOT NULL DEFAULT ''  -- the boot that made it: an acknowledgement names it ('' from schema 1: any)
);
CREATE INDEX outbox_kind ON outbox (kind, seq);
CREATE TABLE state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    next_seq INTEGER NOT NULL,
    dropped_total INTEGER NOT NULL,
    dropped_unreported INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    telemetry_rows INTEGER NOT NULL
);
INSERT INTO state VALUES (1, 1, 0, 0, 0, 0, 0);
CREATE TRIGGER outbox_inserted AFTER INSERT ON outbox BEGIN
    UPDATE state SET rows = rows + 1, bytes = bytes + length(NEW.payload),
        telemetry_rows = telemetry_rows + (NEW.kind = 'telemetry');
END;
CREATE TRIGGER outbox_deleted AFTER DELETE ON outbox BEGIN
    UPDATE state SET rows = rows - 1, bytes = bytes - length(OLD.payload),
        telemetry_rows = telemetry_rows - (OLD.kind = 'telemetry');
END;
PRAGMA user_version = {SCHEMA_VERSION};
COMMIT;
"""
#: Schema 1 -> 2: the boot id of each message, so that an acknowledgement meant for another outbox (a device whose
#: state folder was replaced, whose seqs therefore start again) deletes nothing.
_MIGRATE_1_2 = """
BEGIN;
ALTER TABLE outbox ADD COLUMN boot_id TEXT NOT NULL DEFAULT '';
PRAGMA user_version = 2;
COMMIT;
"""


class OutboxError(Exception):
    """The outbox cannot be used; the message names the file and what to do."""


class OutboxFull(OutboxError):
    """An event could not be stored because the disk (or the database's size limit) is full, and the events held in
    memory until it has room (:data:`MAX_HELD_EVENTS`) are already as many as are kept."""


#: Events a full disk refused, kept in memory (in order) and stored before anything newer once there is room: a full
#: disk must not silence the device's reports of why it is stuck. Past this many, ``append`` raises OutboxFull.
MAX_HELD_EVENTS = 1000


@dataclass(frozen=True, slots=True)
class Entry:
    seq: int
    kind: Kind
    topic: str
    payload: bytes
    qos: int


class Outbox:
    """A bounded SQLite queue of encoded messages, oldest first. Thread-safe."""

    def __init__(self, path: Path, *, max_rows: int = 10_000, max_bytes: int = 20 * 2**20) -> None:
        if max_rows < 1 or max_bytes < 1:
            raise ValueError("max_rows and max_bytes must be >= 1")
        self.path = path
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        # Drops that could not even be counted in the database (disk full); folded into the next transaction.
        self._uncounted_drops = 0
        self._held: deque[tuple[str, dict[str, Any]]] = deque()
        self._over_bounds = False
        self._db = self._open(path)
        event(log, "outbox_opened", path=str(path), **self._stats())

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        db: sqlite3.Connection | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            if db.execute("PRAGMA journal_mode=WAL").fetchone()[0] != "wal":
                event(log, "outbox_not_wal", logging.WARNING, path=str(path))
            db.execute("PRAGMA synchronous=NORMAL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                db.close()
                raise OutboxError(
                    f"outbox {path} has schema version {version}, newer than this agent's {SCHEMA_VERSION}: "
                    "run a newer agent, or move the file aside to start an empty outbox"
                )
            if version == 0:
                db.executescript(_SCHEMA)
            elif version == 1:
                db.executescript(_MIGRATE_1_2)
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {check}")
        except (sqlite3.DatabaseError, OSError) as exc:
            if db is not None:
                db.close()
            raise OutboxError(
                f"cannot open outbox {path}: {exc}. It only holds unsent telemetry and events: stop the agent, "
                f"move {path} (and any {path.name}-wal, {path.name}-shm beside it) aside, and start again empty"
            ) from exc
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def append(self, kind: Kind, topic: str, message: dict[str, Any]) -> int | None:
        """Store one message; sets ``message["seq"]`` (and ``message["dropped"]`` for telemetry). Returns seq.

        A telemetry window that does not fit on a full disk is dropped and counted, not raised. An event that does
        not fit is held in memory and stored, in order, before the next message that fits (or at :meth:`store_held`);
        it returns None, as it has no seq yet. Past :data:`MAX_HELD_EVENTS` held events it raises :class:`OutboxFull`.
        """
        if kind not in _KINDS:
            raise ValueError(f"the outbox holds telemetry and events, not {kind.value}")
        with self._lock:
            try:
                self._store_held()
                evicted, carried, over = self._append(kind, topic, message)
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode != sqlite3.SQLITE_FULL:
                    raise
                if kind is Kind.EVENTS:
                    self._hold(topic, message)
                    return None
                self._count_lost_window()
                return int(message["seq"])
            self._uncounted_drops = 0
            seq = int(message["seq"])
            if evicted:
                event(log, "outbox_dropped", logging.WARNING, reason="bounds", windows=evicted, reports_owed=carried)
            if over != self._over_bounds:
                self._over_bounds = over
                stats = self._stats()
                name = "outbox_over_bounds" if over else "outbox_within_bounds"
                event(log, name, logging.WARNING if over else logging.INFO, **stats)
        return seq

    def store_held(self) -> int:
        """Store the events a full disk made us hold, if there is room now; return how many are still held."""
        with self._lock:
            try:
                self._store_held()
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode != sqlite3.SQLITE_FULL:
                    raise
            return len(self._held)

    def _hold(self, topic: str, message: dict[str, Any]) -> None:
        if len(self._held) >= MAX_HELD_EVENTS:
            raise OutboxFull(
                f"outbox {self.path}: disk full and {MAX_HELD_EVENTS} events already held in memory, "
                f"event {message.get('type')} not stored: free space on {self.path.parent}"
            )
        self._held.append((topic, message))
        event(log, "outbox_event_held", logging.WARNING, reason="disk_full", type=message.get("type"),
              held=len(self._held), path=str(self.path))  # fmt: skip

    def _store_held(self) -> None:
        """Store held events oldest first; the first that does not fit raises SQLITE_FULL and stays held."""
        while self._held:
            topic, message = self._held[0]
            self._append(Kind.EVENTS, topic, message)
            self._held.popleft()
            if not self._held:
                event(log, "outbox_held_events_stored", path=str(self.path))

    def _append(self, kind: Kind, topic: str, message: dict[str, Any]) -> tuple[int, int, bool]:
        with self._transaction() as db:
            seq, total, owed = db.execute("SELECT next_seq, dropped_total, dropped_unreported FROM state").fetchone()
            total += self._uncounted_drops
            owed += self._uncounted_drops
            message["seq"] = seq
            if kind is Kind.TELEMETRY:
                message["dropped"], owed = owed, 0
            payload = encode(kind, message)
            db.execute(
                "INSERT INTO outbox (seq, kind, topic, payload, qos, created, dropped, boot_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (seq, kind.value, topic, payload, _QOS, time.time(), message.get("dropped", 0), message["boot_id"]),
            )
            db.execute(
                "UPDATE state SET next_seq = ?, dropped_total = ?, dropped_unreported = ?", (seq + 1, total, owed)
            )
            return self._evict()

    def _evict(self) -> tuple[int, int, bool]:
        """Drop the oldest telemetry until within bounds. Returns (windows dropped, reports owed again, still over)."""
        rows, size = self._db.execute("SELECT rows, bytes FROM state").fetchone()
        excess_rows, excess_bytes = rows - self.max_rows, size - self.max_bytes
        dropped = freed = carried = 0
        last_seq = None
        oldest = self._db.execute(
            "SELECT seq, length(payload), dropped FROM outbox WHERE kind = ? ORDER BY seq", (Kind.TELEMETRY.value,)
        )
        for seq, length, reported in oldest:
            if dropped >= excess_rows and freed >= excess_bytes:
                break
            dropped, freed, carried, last_seq = dropped + 1, freed + length, carried + reported, seq
        oldest.close()
        if last_seq is not None:
            self._db.execute("DELETE FROM outbox WHERE kind = ? AND seq <= ?", (Kind.TELEMETRY.value, last_seq))
            self._db.execute(
                "UPDATE state SET dropped_total = dropped_total + ?, dropped_unreported = dropped_unreported + ?",
                (dropped, dropped + carried),
            )
        return dropped, carried, dropped < excess_rows or freed < excess_bytes

    def _count_lost_window(self) -> None:
        """Count a window the full disk refused and burn its seq; only in memory if even that cannot be written."""
        lost = self._uncounted_drops + 1
        try:
            with self._transaction() as db:
                db.execute(
                    "UPDATE state SET next_seq = next_seq + 1, dropped_total = dropped_total + ?, "
                    "dropped_unreported = dropped_unreported + ?",
                    (lost, lost),
                )
            self._uncounted_drops = 0
        except sqlite3.OperationalError:
            self._uncounted_drops = lost
        event(log, "outbox_dropped", logging.WARNING, reason="disk_full", windows=1, path=str(self.path))

    def pending(self, limit: int, exclude: Collection[int] = ()) -> list[Entry]:
        """Up to ``limit`` stored messages, oldest first, skipping the seqs in ``exclude`` (already in flight)."""
        skip = set(exclude)
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, kind, topic, payload, qos FROM outbox ORDER BY seq LIMIT ?", (limit + len(skip),)
            ).fetchall()
        entries = [Entry(seq, Kind(kind), topic, bytes(payload), qos) for seq, kind, topic, payload, qos in rows]
        return [e for e in entries if e.seq not in skip][:limit]

    def ack(self, seq: int, boot_id: str) -> None:
        """Forget one message the fleet stored; see :meth:`acknowledge`."""
        self.acknowledge(boot_id, [(seq, seq)])

    def acknowledge(self, boot_id: str, ranges: Iterable[tuple[int, int]]) -> Counter[Kind]:
        """Forget the messages of boot ``boot_id`` the fleet says it stored: inclusive (first, last) seq ranges.
        Returns how many of each kind left the outbox; seqs it no longer holds (a duplicate acknowledgement, a dropped
        window) or that another boot made (an acknowledgement meant for an outbox this one replaced) count nothing,
        so each message is counted once.

        If the disk is too full even to delete, the messages stay and are sent again; the fleet drops the duplicates.
        """
        removed: Counter[Kind] = Counter()
        with self._lock:
            try:
                with self._transaction() as db:
                    for first, last in ranges:
                        for (kind,) in db.execute(
                            "DELETE FROM outbox WHERE seq BETWEEN ? AND ? AND boot_id IN (?, '') RETURNING kind",
                            (first, last, boot_id),
                        ).fetchall():
                            removed[Kind(kind)] += 1
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode != sqlite3.SQLITE_FULL:
                    raise
                event(log, "outbox_ack_failed", logging.WARNING, reason="disk_full", path=str(self.path))
                return Counter()
        return removed

    def stats(self) -> dict[str, int]:
        with self._lock:
            return self._stats()

    def _stats(self) -> dict[str, int]:
        rows, size, telemetry, total, owed, next_seq = self._db.execute(
            "SELECT rows, bytes, telemetry_rows, dropped_total, dropped_unreported, next_seq FROM state"
        ).fetchone()
        return {
            "rows": rows,
            "bytes": size,
            "telemetry_rows": telemetry,
            "event_rows": rows - telemetry,
            "dropped_total": total + self._uncounted_drops,
            "dropped_unreported": owed + self._uncounted_drops,
            "next_seq": next_seq,
            "held_events": len(self._held),
        }

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
