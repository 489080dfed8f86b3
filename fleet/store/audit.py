"""The audit log's hash chain, apart from any database: how a row is hashed and how a chain is checked.

Each row's hash is sha256 over the canonical JSON of its content and the previous row's hash, so editing, removing or
reordering a row breaks the chain. Removing rows from the end cannot be seen from the rows alone: keep the head hash
somewhere else to catch that. Every store backend appends and verifies with these functions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

from agent.canonical import canonical_json
from fleet.store.rows import AuditCheck, AuditEntry

#: The previous hash of the first audit row.
AUDIT_GENESIS = "0" * 64
#: The fields a row's hash covers; ``detail`` as its canonical JSON text.
HASHED_FIELDS = ("id", "ts", "actor", "action", "subject", "detail", "prev_hash")


def audit_hash(row: Mapping[str, Any]) -> str:
    """sha256 over an audit row's canonical JSON (id, ts, actor, action, subject, detail text, prev_hash)."""
    return hashlib.sha256(canonical_json({f: row[f] for f in HASHED_FIELDS})).hexdigest()


def next_row(
    head: tuple[int, str] | None, ts: float, actor: str, action: str, subject: str, detail: Mapping[str, Any]
) -> dict[str, Any]:
    """The row that follows ``head`` ((id, hash) of the last row, None for an empty log), hash included."""
    row: dict[str, Any] = {
        "id": head[0] + 1 if head else 1,
        "ts": ts,
        "actor": actor,
        "action": action,
        "subject": subject,
        "detail": canonical_json(detail).decode(),
        "prev_hash": head[1] if head else AUDIT_GENESIS,
    }
    row["hash"] = audit_hash(row)
    return row


def verify_chain(entries: Iterable[AuditEntry]) -> AuditCheck:
    """Walk the chain from the first row: ids count up from 1, each row links to the previous hash, and each
    hash matches the row's content."""
    prev, n = AUDIT_GENESIS, 0
    for entry in entries:
        n += 1
        if entry.id != n:
            return AuditCheck(False, n - 1, prev, entry.id, f"expected row {n}: rows are missing")
        if entry.prev_hash != prev:
            return AuditCheck(False, n - 1, prev, entry.id, "does not link to the row before it")
        row = {
            "id": entry.id,
            "ts": entry.ts,
            "actor": entry.actor,
            "action": entry.action,
            "subject": entry.subject,
            "detail": entry.detail_text,
            "prev_hash": entry.prev_hash,
        }
        if audit_hash(row) != entry.hash:
            return AuditCheck(False, n - 1, prev, entry.id, "its content does not match its hash")
        prev = entry.hash
    return AuditCheck(True, n, prev)
