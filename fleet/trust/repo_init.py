"""Making a fleet's TUF repository (``fleet init``), and what every use of it shares: its expiry policy, its error and
reading its metadata folder. :class:`fleet.trust.repository.Repository` reads and changes it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Targets, Timestamp

from agent.files import fsync_path, write_atomic
from agent.logs import event
from fleet.errors import FleetError
from fleet.store.api import RepoCommits
from fleet.trust.history import Read, read_committed, sha256
from fleet.trust.keys import KeyStore

log = logging.getLogger(__name__)

DEFAULT_MAX_TARGET_BYTES = 512 * 1024 * 1024
ONLINE_ROLES = ("targets", "snapshot", "timestamp")


class RepositoryError(FleetError):
    """The repository is missing, already exists, or its files do not verify (``repository_inconsistent``: they are
    not the history the fleet wrote; ``metadata_exists``: a versioned file to be written is already there)."""

    def __init__(self, detail: str, fix: str = "", reason: str = "repository") -> None:
        super().__init__(reason, detail, fix)


@dataclass(frozen=True)
class ExpiryPolicy:
    """How long each role's metadata stays valid after it is signed."""

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)

    def to_dict(self) -> dict[str, float]:
        return {role: value.total_seconds() for role, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, float]) -> ExpiryPolicy:
        return cls(**{role: timedelta(seconds=data[role]) for role in ("root", "targets", "snapshot", "timestamp")})


def utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC).replace(microsecond=0)


def create_repository(
    home: Path,
    *,
    root_threshold: int = 1,
    root_keys: int = 1,
    expiry: ExpiryPolicy | None = None,
    max_target_bytes: int = DEFAULT_MAX_TARGET_BYTES,
    force: bool = False,
    clock: Callable[[], float] = time.time,
    ledger: RepoCommits | None = None,
) -> dict[str, Any]:
    """Create the keys and version 1 of root, targets, snapshot and timestamp; return a summary (no secrets).

    Refuses if ``<home>/keys`` or ``<home>/repo`` has anything in it, unless ``force`` (which replaces both:
    every device enrolled with the old root must be enrolled again). Everything is built in a staging folder and
    renamed into place, so a failed init leaves no half-made repository. ``ledger`` records the new repository
    as the fleet's last change (a record of a repository it replaces no longer applies).
    """
    if not 1 <= root_threshold <= root_keys:
        raise ValueError(f"root threshold {root_threshold} must be between 1 and the {root_keys} root keys")
    home = Path(home)
    expiry = expiry or ExpiryPolicy()
    repo_dir, keys_dir = home / "repo", home / "keys"
    existing = [p for p in (repo_dir, keys_dir) if p.exists() and any(p.iterdir())]
    if existing and not force:
        raise RepositoryError(f"{', '.join(map(str, existing))} already exist: refusing to overwrite without force")
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    staging = Path(tempfile.mkdtemp(prefix=".init-", dir=home))
    try:
        keystore = KeyStore(staging / "keys")
        for role in (*ONLINE_ROLES, "director"):
            keystore.generate(role)
        keystore.generate("root", root_keys)
        root_md = _initial_metadata(staging / "repo", keystore, root_threshold, expiry, utc(clock()))
        config = {"expiry": expiry.to_dict(), "max_target_bytes": max_target_bytes}
        write_atomic(staging / "repo" / "config.json", json.dumps(config, indent=1).encode())
        for path in (repo_dir, keys_dir):
            if path.exists():
                shutil.rmtree(path)
        os.rename(staging / "keys", keys_dir)
        os.rename(staging / "repo", repo_dir)
        fsync_path(home)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if ledger is not None:
        state, _ = read_committed(metadata_reader(repo_dir / "metadata"))
        assert state is not None, "a repository just made is consistent"
        ledger.record_repo_commit(state.record())
    root = root_md.signed
    roles = {
        role: {
            "keyids": list(root.roles[role].keyids),
            "threshold": root.roles[role].threshold,
            "online": role != "root",
        }
        for role in ("root", *ONLINE_ROLES)
    }
    summary = {
        "repo": str(repo_dir),
        "keys": str(keys_dir),
        "roles": roles,
        "director": {"keyid": KeyStore(keys_dir).signer("director").public_key.keyid, "online": True},
        "root_expires": root.expires.isoformat(),
        "trusted_root_sha256": sha256((repo_dir / "metadata" / "root.json").read_bytes()),
        "offline_keys": [f"{keys_dir}/root-{i}.pem" for i in range(1, root_keys + 1)],
        "note": "root is an offline role: move root-*.pem to offline storage; only root rotation needs them",
    }
    event(log, "repository_initialized", repo=str(repo_dir), roles=roles, director=summary["director"])
    return summary


def _initial_metadata(
    repo_dir: Path, keystore: KeyStore, root_threshold: int, expiry: ExpiryPolicy, now: datetime
) -> Metadata[Root]:
    metadata_dir = repo_dir / "metadata"
    metadata_dir.mkdir(parents=True)
    (repo_dir / "targets").mkdir()
    root = Root(expires=now + expiry.root, consistent_snapshot=True)
    root_signers = keystore.signers("root")
    for signer in root_signers:
        root.add_key(signer.public_key, "root")
    root.roles["root"].threshold = root_threshold
    for role in ONLINE_ROLES:
        root.add_key(keystore.signer(role).public_key, role)
    root_md = Metadata(root)
    for signer in root_signers:
        root_md.sign(signer, append=True)
    targets_md = Metadata(Targets(expires=now + expiry.targets))
    targets_md.sign(keystore.signer("targets"))
    targets_bytes = targets_md.to_bytes()
    snapshot_meta = {"targets.json": MetaFile(1, len(targets_bytes), {"sha256": sha256(targets_bytes)})}
    snapshot_md = Metadata(Snapshot(expires=now + expiry.snapshot, meta=snapshot_meta))
    snapshot_md.sign(keystore.signer("snapshot"))
    snapshot_bytes = snapshot_md.to_bytes()
    timestamp_meta = MetaFile(1, len(snapshot_bytes), {"sha256": sha256(snapshot_bytes)})
    timestamp_md = Metadata(Timestamp(expires=now + expiry.timestamp, snapshot_meta=timestamp_meta))
    timestamp_md.sign(keystore.signer("timestamp"))
    root_bytes = root_md.to_bytes()
    for name, data in (
        ("1.root.json", root_bytes),
        ("root.json", root_bytes),
        ("1.targets.json", targets_bytes),
        ("1.snapshot.json", snapshot_bytes),
        ("timestamp.json", timestamp_md.to_bytes()),
    ):
        write_atomic(metadata_dir / name, data)
    return root_md


def metadata_reader(folder: Path) -> Read:
    """Read a metadata file by name: its bytes, or None if it is missing."""

    def read(name: str) -> bytes | None:
        try:
            return (folder / name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:  # unreadable, not missing
            raise RepositoryError(f"cannot read {folder / name}: {exc.strerror}", "fix its mode, restore it") from None

    return read
