"""The SQLite store's rollout campaigns: campaigns, executions, gate decisions, and the controller's reading place in
the events and windows. :class:`~fleet.store.sqlite.SqliteStore` mixes it in; the rules live in :mod:`fleet.ops`
and :mod:`fleet.rollout`, the store only keeps state and moves it atomically.

Every change of a campaign's state is a compare-and-set (the state it was read in must still hold) written with its
audit entry in one transaction: an operator's pause and the controller's rollback cannot both win.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, replace
from typing import Any

from agent import protocol
from fleet.store.rows import Campaign, Decision, Execution, RolloutUpdate, StoredEvent, StoredWindow
from fleet.store.schema import dumps
from fleet.store.sqlite_reads import WriteHost, _event, loads

_EXEC_COLUMNS = tuple(Execution.__dataclass_fields__)
_UPSERT_EXEC = (
    f"INSERT OR REPLACE INTO executions ({', '.join(_EXEC_COLUMNS)}) VALUES ({', '.join('?' * len(_EXEC_COLUMNS))})"
)


class SqliteCampaigns:
    """Campaign methods over the host store's connection, lock and audit chain."""

    def create_campaign(
        self: WriteHost,
        campaign: Campaign,
        executions: Sequence[Execution],
        exclusive_states: Collection[str],
        detail: Mapping[str, Any],
    ) -> tuple[Campaign | None, dict[str, list[str]]]:
        """Record a new campaign (its id is given here: ``rollout-N``) and its executions, audited as
        ``rollout_create``, unless a campaign of the same model in ``exclusive_states`` already holds one of its
        devices: then nothing is written and the overlap comes back (campaign id -> device ids)."""
        device_ids = [e.device_id for e in executions]
        with self._write() as conn:
            overlap: dict[str, list[str]] = {}
            marks = ", ".join("?" * len(exclusive_states))
            for start in range(0, len(device_ids), 500):
                chunk = device_ids[start : start + 500]
                rows = conn.execute(
                    f"SELECT c.id, e.device_id FROM executions e JOIN campaigns c ON c.id = e.campaign_id "
                    f"WHERE c.model = ? AND c.state IN ({marks}) AND e.device_id IN ({', '.join('?' * len(chunk))}) "
                    "ORDER BY c.id, e.device_id",
                    (campaign.model, *exclusive_states, *chunk),
                ).fetchall()
                for cid, device_id in rows:
                    overlap.setdefault(cid, []).append(device_id)
            if overlap:
                return None, overlap
            n = conn.execute("SELECT count(*) FROM campaigns").fetchone()[0] + 1
            made = replace(campaign, id=f"rollout-{n}")
            row = asdict(made)
            row["spec"], row["gates"] = dumps(made.spec), dumps(made.gates)
            conn.execute(
                f"INSERT INTO campaigns ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values())
            )
            conn.executemany(_UPSERT_EXEC, [_exec_row(replace(e, campaign_id=made.id)) for e in executions])
            self._append_audit(conn, made.actor, "rollout_create", made.id, detail)
        return made, {}

    def campaigns(self: WriteHost, states: Collection[str] | None = None) -> list[Campaign]:
        """Campaigns, oldest first; only those in ``states`` when given."""
        if states is None:
            rows = self._rows("SELECT * FROM campaigns ORDER BY created_at, id")
        else:
            marks = ", ".join("?" * len(states))
            rows = self._rows(f"SELECT * FROM campaigns WHERE state IN ({marks}) ORDER BY created_at, id", (*states,))
        return [_campaign(r) for r in rows]

    def campaign(self: WriteHost, campaign_id: str) -> Campaign | None:
        rows = self._rows("SELECT * FROM campaigns WHERE id = ?", (campaign_id,))
        return _campaign(rows[0]) if rows else None

    def executions(self: WriteHost, campaign_id: str, states: Collection[str] | None = None) -> list[Execution]:
        """A campaign's executions in wave order (the order devices are sent the release); only those in ``states``
        when given."""
        if states is None:
            rows = self._rows("SELECT * FROM executions WHERE campaign_id = ? ORDER BY position", (campaign_id,))
        else:
            marks = ", ".join("?" * len(states))
            rows = self._rows(
                f"SELECT * FROM executions WHERE campaign_id = ? AND state IN ({marks}) ORDER BY position",
                (campaign_id, *states),
            )
        return [Execution(**r) for r in rows]

    def decisions(self: WriteHost, campaign_id: str) -> list[Decision]:
        """A campaign's recorded gate decisions, oldest first."""
        rows = self._rows("SELECT * FROM rollout_decisions WHERE campaign_id = ? ORDER BY id", (campaign_id,))
        return [Decision(**{**r, "figures": loads(r["figures"])}) for r in rows]

    def move_campaign(
        self: WriteHost,
        campaign_id: str,
        expected: str,
        new: str,
        *,
        actor: str,
        action: str,
        detail: Mapping[str, Any],
        reason: str | None = None,
    ) -> Campaign | None:
        """Move a campaign from ``expected`` to ``new`` and audit it as ``action``, in one transaction; None (and no
        change) if it is no longer in ``expected``. ``reason`` replaces the stored one when given."""
        now = time.time()
        with self._write() as conn:
            found = conn.execute("SELECT state FROM campaigns WHERE id = ?", (campaign_id,)).fetchone()
            if found is None or found[0] != expected:
                return None
            conn.execute(
                "UPDATE campaigns SET state = ?, updated_at = ?, reason = coalesce(?, reason) WHERE id = ?",
                (new, now, reason, campaign_id),
            )
            self._append_audit(conn, actor, action, campaign_id, {"from": expected, "to": new, **detail})
            row = conn.execute("SELECT * FROM campaigns WHERE id = ?", (campaign_id,)).fetchone()
            names = [d[0] for d in conn.execute("SELECT * FROM campaigns LIMIT 0").description]
        return _campaign(dict(zip(names, row, strict=True)))

    def save_rollout(self: WriteHost, update: RolloutUpdate) -> None:
        """Write one round of the controller (:class:`RolloutUpdate`) in one transaction."""
        if not update:
            return
        now = time.time()
        with self._write() as conn:
            conn.executemany(_UPSERT_EXEC, [_exec_row(replace(e, updated_at=now)) for e in update.executions])
            for campaign_id, fields in update.campaigns.items():
                sets = ", ".join(f"{name} = ?" for name in fields)
                values = [dumps(v) if isinstance(v, list | dict) else v for v in fields.values()]
                conn.execute(f"UPDATE campaigns SET {sets}, updated_at = ? WHERE id = ?", (*values, now, campaign_id))
            conn.executemany(
                "INSERT INTO rollout_decisions (campaign_id, ts, wave, gate, verdict, figures, action) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (d.campaign_id, d.ts, d.wave, d.gate, d.verdict, dumps(d.figures), d.action)
                    for d in update.decisions
                ],
            )
            for actor, action, subject, detail in update.audit:
                self._append_audit(conn, actor, action, subject, detail)
            conn.executemany(
                "INSERT OR REPLACE INTO rollout_cursor (name, rowid) VALUES (?, ?)", list(update.cursors.items())
            )

    def rollout_cursors(self: WriteHost) -> dict[str, int]:
        """Where the controller stopped reading (name -> last rowid read)."""
        return {r["name"]: r["rowid"] for r in self._rows("SELECT name, rowid FROM rollout_cursor")}

    def events_after(self: WriteHost, rowid: int, types: Collection[str], limit: int = 5000) -> list[StoredEvent]:
        """Events of ``types`` stored after ``rowid``, in the order they were stored."""
        marks = ", ".join("?" * len(types))
        rows = self._rows(
            f"SELECT rowid AS _rowid, * FROM events WHERE rowid > ? AND type IN ({marks}) ORDER BY rowid LIMIT ?",
            (rowid, *types, limit),
        )
        return [StoredEvent(r.pop("_rowid"), _event(r)) for r in rows]

    def last_event_rowid(self: WriteHost) -> int:
        return int(self._rows("SELECT coalesce(max(rowid), 0) AS n FROM events")[0]["n"])

    def windows_after(
        self: WriteHost, rowid: int, model: str, devices: Collection[str], limit: int = 5000
    ) -> tuple[list[StoredWindow], int]:
        """Windows of ``model`` from ``devices`` stored after ``rowid`` (decoded), and the last rowid looked at.
        Windows of other devices are skipped before they are decoded."""
        rows = self._rows(
            "SELECT rowid AS _rowid, device_id, received_at, payload FROM windows "
            "WHERE rowid > ? AND model = ? ORDER BY rowid LIMIT ?",
            (rowid, model, limit),
        )
        last = rows[-1]["_rowid"] if rows else rowid
        found = [
            StoredWindow(r["_rowid"], protocol.decode(protocol.Kind.TELEMETRY, r["payload"]), r["received_at"])
            for r in rows
            if r["device_id"] in devices
        ]
        return found, last

    def last_window_rowid(self: WriteHost) -> int:
        return int(self._rows("SELECT coalesce(max(rowid), 0) AS n FROM windows")[0]["n"])

    def first_window_rowid_since(self: WriteHost, since: float) -> int:
        """The rowid just before the first window received at ``since`` or later (where a baseline starts)."""
        rows = self._rows("SELECT coalesce(min(rowid), 0) AS n FROM windows WHERE received_at >= ?", (since,))
        first = int(rows[0]["n"])
        return max(first - 1, 0) if first else self.last_window_rowid()


def _exec_row(e: Execution) -> tuple[Any, ...]:
    return tuple(getattr(e, name) for name in _EXEC_COLUMNS)


def _campaign(row: Mapping[str, Any]) -> Campaign:
    return Campaign(**{**row, "spec": loads(row["spec"]), "gates": loads(row["gates"]) or []})
