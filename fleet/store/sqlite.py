"""The fleet store in SQLite (WAL) through sqlite-utils: devices, telemetry windows, events, rejects, the desired
state signed for each device, and the audit log (the :mod:`fleet.store.api` protocols, one database file).

Writes come in batches from the ingest, one transaction each, so the fleet keeps up with the broker. Windows and
events are keyed by (device_id, boot_id, seq) and inserted with INSERT OR IGNORE: a message the broker redelivers
(the ingest acks only after commit) is absorbed here, which makes storage exactly-once. A copy that differs from the
stored message (a forged window sent ahead of the real one, say) is a ``conflict`` reject, counted and logged.

Gaps (the seqs of a device that no stored window or event holds) are computed when read, with window functions over
the device's windows and events: nothing is kept for them, so the ingest's write path pays nothing.

A device's ``last_seen`` is when the fleet received its latest message: device clocks may be wrong, the fleet's is
the one clock every device is compared on. The audit log is append-only (triggers refuse UPDATE and DELETE) and
hash-chained (:mod:`fleet.store.audit`).

Every ``sqlite3`` error leaves as a :class:`~fleet.errors.FleetError`: :class:`~fleet.errors.StoreUnavailable` when
the database cannot work right now (locked, full, read-only, damaged), ``unstorable`` when it refused the data.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import sqlite_utils

from agent import protocol
from agent.logs import event
from fleet.errors import StoreUnavailable
from fleet.store.audit import next_row, verify_chain
from fleet.store.rows import (
    AuditCheck,
    AuditEntry,
    DesiredRecord,
    Reject,
    RepoCommit,
)
from fleet.store.schema import (
    BIRTH,
    INSERT_EVENT,
    INSERT_WINDOW,
    OFFLINE,
    REGISTER_DEVICE,
    REJECT,
    SCHEMA_VERSION,
    SEEN_DEVICE,
    conflicting,
    dumps,
    event_row,
    migrate,
    repo_commit_row,
    window_row,
)
from fleet.store.sqlite_campaigns import SqliteCampaigns
from fleet.store.sqlite_drift import SqliteDrift
from fleet.store.sqlite_reads import SqliteReads, loads, store_error

log = logging.getLogger(__name__)

_DEVICE_JSON_FIELDS = ("hardware", "runtimes", "models")
#: Longest topic and detail text kept for a reject: enough to find the sender, never a payload dump.
_REJECT_TEXT_MAX = 256
#: Rows per conflict lookup: keeps its parameters (7 an event) under SQLite's default limit of 32,766.
_CONFLICT_CHUNK = 4000

def _storable(text: str) -> str:
    """Reject texts quote what a device sent, which may hold lone surrogates that SQLite's UTF-8 cannot carry."""
    return text[:_REJECT_TEXT_MAX].encode("utf-8", "backslashreplace").decode("utf-8")


def _conflict_reject(kind: str, device_id: str, boot_id: str, seq: int, size: int) -> Reject:
    """A copy that differs from the message stored under its key; the topic is the tail after the prefix."""
    detail = f"{kind} seq {seq} of {device_id} boot {boot_id} differs from the one stored under that key"
    return Reject("conflict", f"{device_id}/{kind}", detail, size)


class SqliteStore(SqliteCampaigns, SqliteDrift, SqliteReads):
    """One SQLite database. Safe to share between threads: one connection, serialized by a lock.

    ``read_only`` opens the file without writing anything, not even the writers' lock file or the WAL switch, so
    read commands work on a home they may not write (a backup, another user's fleet); it needs the schema current.
    """

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._turn: Any = None
        try:
            self._open()
        except sqlite3.Error as exc:
            raise store_error(exc, self.path) from None
        except OSError as exc:  # the writers' lock file next to the database
            raise StoreUnavailable(
                "unwritable", f"cannot open {exc.filename}: {exc.strerror}", "run as the home's owner, or fix its mode"
            ) from None

    def _open(self) -> None:
        if self.read_only:
            conn = self._connect_read_only()
        else:
            # The ingest writes on paho's thread while others read stats, hence check_same_thread=False + a lock.
            conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        self.db = sqlite_utils.Database(conn)
        self._lock = threading.Lock()
        if self.read_only:
            found = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if found != SCHEMA_VERSION:
                conn.close()
                raise StoreUnavailable(
                    "schema_mismatch",
                    f"{self.path} has schema v{found}, this fleet manager reads v{SCHEMA_VERSION}",
                    "run `fleet init` as the home's owner to migrate it",
                )
            return
        # Writers of every process queue on this file's lock before SQLite's: the kernel wakes the next one the
        # moment it is free, where SQLite's busy handler sleeps 1-100 ms between tries (ingest workers: +4%).
        self._turn = open(self.path.with_name(self.path.name + ".writers"), "a")  # noqa: SIM115
        self.db.enable_wal()
        # NORMAL under WAL survives a crash of this process (what commit-then-ack relies on); only a power loss
        # can lose the last commits, and the broker's own persistence loses more than that in that case.
        self.db.execute("PRAGMA synchronous = NORMAL")
        migrate(self.db)

    def _connect_read_only(self) -> sqlite3.Connection:
        """A connection that writes nothing. SQLite reads a WAL database through its ``-shm`` file, which it must
        create if it is missing: in a folder this process may not write, and with no ``-wal`` file (no writer has
        anything uncheckpointed), the file is read as immutable instead."""
        uri = self.path.absolute().as_uri()
        conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, check_same_thread=False)
        try:
            conn.execute("PRAGMA user_version").fetchone()
        except sqlite3.OperationalError:
            conn.close()
            if self.path.with_name(self.path.name + "-wal").exists():
                raise
            conn = sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, check_same_thread=False)
        return conn

    def close(self) -> None:
        with self._lock:
            self.db.close()
            if self._turn is not None:
                self._turn.close()

    @contextlib.contextmanager
    def _writer_turn(self) -> Iterator[None]:
        """This process's turn to write, among all processes using the database through a store."""
        if self._turn is None:
            raise StoreUnavailable("read_only", f"{self.path} was opened read-only", "open it for writing")
        fcntl.flock(self._turn, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._turn, fcntl.LOCK_UN)

    def leave_checkpoints_to_others(self) -> None:
        """Stop this connection's commits from checkpointing the write-ahead log (SQLite's default: every 1,000
        pages, inside the commit that crosses it, fsync included); someone must then call :meth:`checkpoint`."""
        with self._lock, self._guard():
            self.db.execute("PRAGMA wal_autocheckpoint = 0")

    def checkpoint(self) -> None:
        """Copy what the write-ahead log holds into the database, as far as readers allow; never blocks writers."""
        with self._lock, self._guard():
            self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    # -- the ingest's writes --------------------------------------------------------------------------------------

    def write_batch(
        self,
        status: Sequence[Mapping[str, Any]] = (),
        windows: Sequence[Mapping[str, Any]] = (),
        events: Sequence[Mapping[str, Any]] = (),
        rejects: Sequence[Reject] = (),
        received_at: float | None = None,
        payloads: Sequence[bytes] | None = None,
        conflicts: list[Reject] | None = None,
    ) -> int:
        """Store validated messages in one transaction; returns how many windows and events were new.

        ``payloads`` are the windows' bytes as they came off the wire (what ``protocol.decode`` turned into
        ``windows``), stored as they are; without them, the windows are encoded here. Statuses apply in the given
        order. The difference between the windows and events given and the number returned is the copies of stored
        ones: duplicates absorbed, and conflicts (a copy that differs from what is stored under its key, see
        :meth:`_conflicts`), which are recorded as ``conflict`` rejects, logged, and appended to ``conflicts`` if
        given. A batch without copies costs no query more.
        """
        now = time.time() if received_at is None else received_at
        if payloads is None:
            payloads = [protocol.encode(protocol.Kind.TELEMETRY, {"v": protocol.SCHEMA_VERSION, **w}) for w in windows]
        window_rows = [window_row(w, p, now) for w, p in zip(windows, payloads, strict=True)]
        event_rows = [event_row(e, now) for e in events]
        seen = {m["device_id"]: m["boot_id"] for m in (*windows, *events)}
        with self._lock, self._writer_turn(), self._guard(), self.db.atomic():
            conn = self.db.conn
            for s in status:
                self._apply_status(conn, s, now)
            conn.executemany(SEEN_DEVICE, [(d, now, now, boot) for d, boot in seen.items()])
            new_windows = conn.executemany(INSERT_WINDOW, window_rows).rowcount if window_rows else 0
            new_events = conn.executemany(INSERT_EVENT, event_rows).rowcount if event_rows else 0
            found: list[tuple[str, str, str, int, int]] = []
            if new_windows < len(window_rows) or new_events < len(event_rows):
                found = self._conflicts(
                    conn,
                    window_rows if new_windows < len(window_rows) else (),
                    event_rows if new_events < len(event_rows) else (),
                )
            found_rejects = [_conflict_reject(*key) for key in found]
            conn.executemany(REJECT, self._reject_rows([*rejects, *found_rejects] if found else rejects, now))
        for kind, device_id, boot_id, seq, size in found:
            event(log, "ingest_conflict", logging.WARNING, kind=kind, device_id=device_id, boot_id=boot_id, seq=seq,
                  size=size)  # fmt: skip
        if conflicts is not None:
            conflicts.extend(found_rejects)
        return new_windows + new_events

    @staticmethod
    def _conflicts(
        conn: sqlite3.Connection, window_rows: Sequence[tuple[Any, ...]], event_rows: Sequence[tuple[Any, ...]]
    ) -> list[tuple[str, str, str, int, int]]:
        """The (kind, device_id, boot_id, seq, size) of each row of a batch (already inserted or ignored) whose key
        holds a different message.

        One query per batch (per 4,000 rows): a window differs when its wire bytes do, an event when its type,
        time, model or detail does. A row this very batch stored is itself, so only copies can differ.
        """
        found: list[tuple[str, str, str, int, int]] = []
        for start in range(0, max(len(window_rows), len(event_rows)), _CONFLICT_CHUNK):
            end = start + _CONFLICT_CHUNK
            sql, params = conflicting(window_rows[start:end], event_rows[start:end])
            found.extend(conn.execute(sql, params).fetchall())
        return found

    @staticmethod
    def _apply_status(conn: sqlite3.Connection, s: Mapping[str, Any], now: float) -> None:
        device_id, boot_id = s["device_id"], s["boot_id"]
        if s["state"] == "online":
            conn.execute(
                BIRTH,
                (
                    device_id,
                    now,
                    now,
                    boot_id,
                    s.get("agent_version"),
                    *(dumps(s.get(f)) for f in _DEVICE_JSON_FIELDS),
                ),
            )
        else:
            conn.execute(REGISTER_DEVICE, (device_id, now, now, boot_id))
            conn.execute(OFFLINE, (s.get("reason"), device_id, boot_id))

    @staticmethod
    def _reject_rows(rejects: Sequence[Reject], now: float) -> list[tuple[Any, ...]]:
        """One row per reason: its count in this batch and the last example of it."""
        counts: dict[str, int] = {}
        last: dict[str, Reject] = {}
        for r in rejects:
            counts[r.reason] = counts.get(r.reason, 0) + 1
            last[r.reason] = r
        return [
            (reason, n, _storable(last[reason].detail), _storable(last[reason].topic), now)
            for reason, n in counts.items()
        ]

    # -- desired state and audit (one short transaction each) ------------------------------------------------------

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A transaction that takes the write lock at once, so read-then-write steps (next seq, chain head) cannot
        interleave with another process doing the same."""
        with self._lock, self._writer_turn(), self._guard():
            conn = self.db.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def add_desired(
        self,
        device_id: str,
        updates: Mapping[str, Mapping[str, Any]],
        issued: float,
        expires: float,
        campaign: str | None,
        sign: Callable[[int, dict[str, Any]], bytes],
    ) -> tuple[DesiredRecord, bytes]:
        """Record the device's next desired state and return it with its signed payload, not yet published.

        The models are the last published state's with ``updates`` applied, and seq is one above any seq ever
        recorded for the device (published or not): a seq is never reused, so a device never sees a replay.
        ``sign(seq, models)`` runs inside the transaction, so the recorded row and the signature always agree.
        """
        created = time.time()
        with self._write() as conn:
            last = conn.execute(
                "SELECT models FROM desired WHERE device_id = ? AND published_at IS NOT NULL ORDER BY seq DESC LIMIT 1",
                (device_id,),
            ).fetchone()
            models = {**(json.loads(last[0]) if last else {}), **updates}
            next_seq = "SELECT coalesce(max(seq), 0) + 1 FROM desired WHERE device_id = ?"
            seq: int = conn.execute(next_seq, (device_id,)).fetchone()[0]
            payload = sign(seq, models)
            conn.execute(
                "INSERT INTO desired (device_id, seq, issued, expires, campaign, models, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (device_id, seq, issued, expires, campaign, dumps(models), created),
            )
        return DesiredRecord(device_id, seq, issued, expires, campaign, models, created), payload

    def mark_desired_published(self, device_id: str, seq: int, actor: str, detail: Mapping[str, Any]) -> None:
        """The broker acknowledged the state: it is now the device's current one, and the assignment is audited."""
        with self._write() as conn:
            conn.execute(
                "UPDATE desired SET published_at = ? WHERE device_id = ? AND seq = ?", (time.time(), device_id, seq)
            )
            self._append_audit(conn, actor, "assign", device_id, {"seq": seq, **detail})

    def desired(self, device_id: str) -> DesiredRecord | None:
        """The last desired state published for the device (what its retained topic holds), or None."""
        rows = self._rows(
            "SELECT * FROM desired WHERE device_id = ? AND published_at IS NOT NULL ORDER BY seq DESC LIMIT 1",
            (device_id,),
        )
        if not rows:
            return None
        row = rows[0]
        return DesiredRecord(**{**row, "models": loads(row["models"])})

    def record_enrollment(self, device_id: str, actor: str, detail: Mapping[str, Any]) -> None:
        """Remember that the device was enrolled (again, if it was before) and audit it, in one transaction."""
        with self._write() as conn:
            entry = self._append_audit(conn, actor, "enroll", device_id, detail)
            conn.execute(
                "INSERT OR REPLACE INTO enrollments (device_id, enrolled_at, detail) VALUES (?, ?, ?)",
                (device_id, entry.ts, entry.detail_text),
            )

    def known(self, device_ids: Sequence[str]) -> set[str]:
        """Which of these devices the fleet enrolled or has heard from."""
        found: set[str] = set()
        for start in range(0, len(device_ids), 500):  # SQLite's bound-parameter limit, with room to spare
            chunk = list(device_ids[start : start + 500])
            marks = ", ".join("?" * len(chunk))
            rows = self._rows(
                f"SELECT device_id FROM devices WHERE device_id IN ({marks}) "
                f"UNION SELECT device_id FROM enrollments WHERE device_id IN ({marks})",
                (*chunk, *chunk),
            )
            found.update(r["device_id"] for r in rows)
        return found

    def append_audit(self, actor: str, action: str, subject: str, detail: Mapping[str, Any]) -> AuditEntry:
        """Add one row to the audit chain and return it."""
        with self._write() as conn:
            return self._append_audit(conn, actor, action, subject, detail)

    @staticmethod
    def _append_audit(
        conn: sqlite3.Connection, actor: str, action: str, subject: str, detail: Mapping[str, Any]
    ) -> AuditEntry:
        head = conn.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
        row = next_row(tuple(head) if head else None, time.time(), actor, action, subject, detail)
        conn.execute(f"INSERT INTO audit ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
        return _audit_entry(row)

    def audit(self) -> list[AuditEntry]:
        """The audit log, oldest first."""
        return [_audit_entry(row) for row in self._rows("SELECT * FROM audit ORDER BY id")]

    def record_repo_commit(self, commit: RepoCommit) -> None:
        """Append what a change left in the TUF repository (``recorded_at`` 0 is stamped now); the newest row is the
        record :meth:`last_repo_commit` returns."""
        row = repo_commit_row(commit)
        row["recorded_at"] = row["recorded_at"] or time.time()
        with self._write() as conn:
            conn.execute(
                f"INSERT INTO repo_commits ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values())
            )

    def verify_audit(self) -> AuditCheck:
        """Walk the hash chain from the first row (:func:`fleet.store.audit.verify_chain`)."""
        return verify_chain(self.audit())

def _audit_entry(row: Mapping[str, Any]) -> AuditEntry:
    """A stored row as an entry; a detail that no longer parses (someone edited the file) is kept as its text."""
    try:
        detail = json.loads(row["detail"])
    except ValueError:
        detail = row["detail"]
    return AuditEntry(
        row["id"], row["ts"], row["actor"], row["action"], row["subject"], detail, row["prev_hash"], row["hash"],
        row["detail"],
    )  # fmt: skip
