"""Per-model slots, ``active``, ``previous`` and ``staged``: what the device serves, and what it can go back to.

Files live under ``<state_dir>/models/<name>/``, each named by its content, written once and never changed::

    <sha256 of the model><suffix>      a verified model file (.onnx, .tflite)
    <sha256 of the card>.card.json     its signed model card (smoke test, drift reference, probation limits)
    incoming/                          downloads under way

A slot is a :class:`SlotRecord` naming such files: release (``name:version``), TUF release counter, sha256 and
length of the model, runtime, the card's sha256 and the TUF target path. File paths are derived from the hashes,
never stored, so a damaged state row cannot point the agent at some other file.

:class:`SlotStore` keeps every model's slots together with its install state (:mod:`agent.update.install`) in one row of
a SQLite database (WAL, ``synchronous=FULL``): switching slots is one transaction, so a SIGKILL or a power cut
leaves the old row or the new one, never half of a switch.

An empty ``active`` slot means the factory model: the ``[[models]]`` entry of agent.toml, served from its
configured path with the release configured there. It is every model's last fallback, so an empty ``previous``
also means "back to the factory model".

Before a slot is served it is verified again (:func:`slot_problem`): length, then sha256, compared in constant time.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import ModelConfig
from agent.files import fsync_path
from agent.logs import event
from agent.targets import RUNTIME_BY_SUFFIX, SUFFIX_BY_RUNTIME

log = logging.getLogger(__name__)

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1024 * 1024
_CARD_SUFFIX = ".card.json"
_BUSY_TIMEOUT_S = 5.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (name TEXT PRIMARY KEY, slots TEXT NOT NULL, install TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_problem(path: Path, sha256: str, length: int | None = None) -> str | None:
    """Why ``path`` is not the file with this sha256 (and length), or None if it is. Constant-time compare."""
    try:
        if length is not None and path.stat().st_size != length:
            return "length_mismatch"
        actual = sha256_file(path)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    return None if hmac.compare_digest(actual.encode(), sha256.encode()) else "hash_mismatch"


@dataclass(frozen=True)
class SlotRecord:
    """One verified release on this device. ``target`` is None for the factory model (agent.toml)."""

    release: str
    counter: int
    sha256: str
    length: int
    runtime: str
    path: Path
    card: Path | None
    card_sha256: str | None
    target: str | None

    @property
    def factory(self) -> bool:
        return self.target is None

    def model_config(self, name: str, threads: int | None) -> ModelConfig:
        """How to serve this slot: a release with its signed runtime (the one its smoke test ran), the factory
        model as agent.toml configures it."""
        return ModelConfig(name=name, path=self.path, card=self.card, release=self.release, threads=threads,
                           runtime=None if self.factory else self.runtime)  # fmt: skip

    def summary(self) -> dict[str, Any]:
        """What status shows: enough to tell releases apart, no paths."""
        return {"release": self.release, "counter": self.counter, "sha256": self.sha256[:12], "factory": self.factory}

    def to_dict(self) -> dict[str, Any]:
        return {
            "release": self.release,
            "counter": self.counter,
            "sha256": self.sha256,
            "length": self.length,
            "runtime": self.runtime,
            "card_sha256": self.card_sha256,
            "target": self.target,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], model_dir: Path) -> SlotRecord:
        """A stored record, its file paths derived from its hashes. Raises ValueError for anything malformed."""
        sha256, card_sha256, runtime = data["sha256"], data["card_sha256"], data["runtime"]
        if not (isinstance(sha256, str) and _SHA256_RE.fullmatch(sha256)) or runtime not in SUFFIX_BY_RUNTIME:
            raise ValueError("bad slot record")
        if not (isinstance(card_sha256, str) and _SHA256_RE.fullmatch(card_sha256)):
            raise ValueError("bad slot record card")
        return cls(
            release=str(data["release"]),
            counter=int(data["counter"]),
            sha256=sha256,
            length=int(data["length"]),
            runtime=runtime,
            path=model_dir / f"{sha256}{SUFFIX_BY_RUNTIME[runtime]}",
            card=model_dir / f"{card_sha256}{_CARD_SUFFIX}",
            card_sha256=card_sha256,
            target=str(data["target"]),
        )


def factory_record(cfg: ModelConfig) -> SlotRecord:
    """The model agent.toml configures, as a slot. Its hash is taken as found: the configuration is the trust root."""
    try:
        sha256, length = sha256_file(cfg.path), cfg.path.stat().st_size
    except OSError:
        sha256, length = "", 0  # loading it fails with the runtime layer's message, as without updates
    return SlotRecord(
        release=cfg.release,
        counter=0,
        sha256=sha256,
        length=length,
        runtime=RUNTIME_BY_SUFFIX.get(cfg.path.suffix, ""),
        path=cfg.path,
        card=cfg.card,
        card_sha256=None,
        target=None,
    )


def slot_problem(record: SlotRecord) -> str | None:
    """Why a stored slot must not be served (its model or card file is missing or changed), or None."""
    problem = file_problem(record.path, record.sha256, record.length)
    if problem is None and record.card is not None and record.card_sha256 is not None:
        card_problem = file_problem(record.card, record.card_sha256)
        problem = f"card {card_problem}" if card_problem else None
    return problem


@dataclass(frozen=True)
class ModelSlots:
    """A model's slots; an empty ``active`` or ``previous`` is the factory model."""

    active: SlotRecord | None = None
    previous: SlotRecord | None = None
    staged: SlotRecord | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "active": self.active.to_dict() if self.active else None,
            "previous": self.previous.to_dict() if self.previous else None,
            "staged": self.staged.to_dict() if self.staged else None,
        }


class SlotStore:
    """The slot files and the state database of one agent. Thread-safe."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "models"
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / "install.sqlite"
        self._lock = threading.Lock()
        self._db = self._open(self.path)

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # slot switches must survive a power cut, not only a SIGKILL
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {check}")
            db.executescript(_SCHEMA)
        except BaseException:
            db.close()
            raise
        return db

    @classmethod
    def _open(cls, path: Path) -> sqlite3.Connection:
        """Open the database; a damaged one is moved aside, so the device starts over on its factory models."""
        try:
            return cls._connect(path)
        except sqlite3.DatabaseError as exc:
            aside = path.with_name(f"{path.name}.damaged-{int(time.time())}")
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{path}{suffix}", f"{aside}{suffix}")
            event(log, "slot_store_reset", logging.ERROR, path=str(path), moved_to=str(aside), reason=str(exc))
            return cls._connect(path)

    def model_dir(self, name: str) -> Path:
        return self.root / name

    def incoming_dir(self, name: str) -> Path:
        return self.model_dir(name) / "incoming"

    # -- state rows ---------------------------------------------------------------------------------------------

    def load(self, name: str) -> tuple[ModelSlots, dict[str, Any]]:
        """A model's slots and install record (empty if the model has none yet, or its slot records are damaged)."""
        with self._lock:
            row = self._db.execute("SELECT slots, install FROM models WHERE name = ?", (name,)).fetchone()
        if row is None:
            return ModelSlots(), {}
        stored, install = json.loads(row[0]), json.loads(row[1])
        slots = {}
        for slot in ("active", "previous", "staged"):
            try:
                slots[slot] = SlotRecord.from_dict(stored[slot], self.model_dir(name)) if stored.get(slot) else None
            except (KeyError, TypeError, ValueError):
                event(log, "slot_record_unreadable", logging.ERROR, model=name, slot=slot)
                slots[slot] = None
        return ModelSlots(**slots), install

    def save(self, name: str, slots: ModelSlots, install: Mapping[str, Any]) -> None:
        """Replace a model's slots and install record in one durable transaction."""
        row = (name, json.dumps(slots.to_dict()), json.dumps(install))
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO models (name, slots, install) VALUES (?, ?, ?)", row)

    def get(self, key: str) -> Any:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    # -- files --------------------------------------------------------------------------------------------------

    def cached(self, name: str, sha256: str, length: int, runtime: str) -> Path | None:
        """The model file with this hash if this device already holds it intact (a retry, or a return to it)."""
        path = self.model_dir(name) / f"{sha256}{SUFFIX_BY_RUNTIME[runtime]}"
        return path if path.exists() and file_problem(path, sha256, length) is None else None

    def stage(self, name: str, downloaded: Path, fields: Mapping[str, Any], card: Mapping[str, Any]) -> SlotRecord:
        """Put a downloaded file under its content name with its card beside it; return its slot record.

        ``fields`` are the record's release, counter, sha256, length, runtime and target. The file must already have
        been verified against them (:func:`file_problem`); the card is written as canonical JSON and hashed.
        """
        card_bytes = json.dumps(card, sort_keys=True, separators=(",", ":")).encode()
        record = SlotRecord.from_dict(
            {**fields, "card_sha256": hashlib.sha256(card_bytes).hexdigest()}, self.model_dir(name)
        )
        if record.card is not None and file_problem(record.card, str(record.card_sha256)) is not None:
            temp = record.card.with_name(f".{record.card.name}.tmp")
            with open(temp, "wb") as f:
                f.write(card_bytes)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, record.card)
        if downloaded != record.path:
            os.replace(downloaded, record.path)
        fsync_path(record.path.parent)
        return record

    def collect_garbage(self, name: str, slots: ModelSlots) -> None:
        """Delete the files no slot names any more, and leftover downloads: they can never be served."""
        folder = self.model_dir(name)
        keep = {p.name for r in (slots.active, slots.previous, slots.staged) if r for p in (r.path, r.card) if p}
        removed = []
        for path in folder.iterdir() if folder.is_dir() else ():
            if path.is_file() and path.name not in keep:
                path.unlink(missing_ok=True)
                removed.append(path.name)
        incoming = self.incoming_dir(name)
        for path in incoming.iterdir() if incoming.is_dir() else ():
            path.unlink(missing_ok=True)
            removed.append(f"incoming/{path.name}")
        if removed:
            event(log, "slot_files_removed", model=name, files=removed)

    def close(self) -> None:
        with self._lock:
            self._db.close()
