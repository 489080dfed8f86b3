"""The fleet's TUF repository: model releases as signed targets, written with python-tuf's Metadata API.

Layout under ``<home>/repo/`` (``fleet.trust.repo_server`` serves ``metadata/`` and ``targets/`` only)::

    config.json                        expiry policy and limits
    metadata/<N>.root.json             every root version: clients walk root rotations by version
    metadata/root.json                 the newest root, what devices are enrolled with
    metadata/<N>.targets.json          consistent snapshots: each version under its own name, never rewritten
    metadata/<N>.snapshot.json
    metadata/timestamp.json            the one file replaced in place: the commit point
    targets/models/<name>/<version>/<sha256>.<file>    hash-prefixed, as ngclient asks for with consistent snapshots

A change (publish, revoke, renewal) first writes new files under new names (target file, targets, snapshot), then
renames timestamp.json into place: before that rename every client, and this class, sees the previous state; after
it, the new one. On any error before it the new files are removed, so a failed change changes nothing. Changes are
serialized with an flock on ``.lock``.

Each target carries signed custom metadata, the facts a device decides on (read by ``agent.update.tuf_client``)::

    {"name", "version", "release", "min_release", "runtime", "hardware": {"machines": [...]}, "card": "<JSON text>"}

``release`` counts up per model name; ``min_release`` is the model's revocation floor, the same on each of its
targets. ``card`` is the model card (I/O schema, quantization, drift reference, smoke test, provenance plus the
source commit) as one JSON string: TUF's canonical JSON cannot encode floats, and cards are full of them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_exceptions
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

from agent.canonical import strict_json
from agent.files import PUBLIC_FILE_MODE, fsync_path, stage, write_atomic
from agent.logs import event
from agent.targets import RUNTIME_BY_SUFFIX, parse_target_path, safe_component, target_path
from fleet.errors import FleetError
from fleet.trust.keys import KeyStore
from fleet.trust.releases import (
    ReleaseError,
    ReleaseInfo,
    UnknownRelease,
    card_sha256,
    checked_card_text,
    checked_machines,
    release_info,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_TARGET_BYTES = 512 * 1024 * 1024
_COPY_CHUNK = 1024 * 1024
_ONLINE_ROLES = ("targets", "snapshot", "timestamp")
#: Repository files are public (everything in them is signed); any static server may read them.
class RepositoryError(FleetError):
    """The repository is missing, already exists, or its files do not verify."""

    def __init__(self, detail: str, fix: str = "") -> None:
        super().__init__("repository", detail, fix)


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


@dataclass
class _Metadata:
    """The committed state: what timestamp.json points to, verified against root."""

    root: Metadata[Root]
    timestamp: Metadata[Timestamp]
    snapshot: Metadata[Snapshot]
    targets: Metadata[Targets]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC).replace(microsecond=0)


class Repository:
    """One fleet's TUF repository at ``<home>/repo/``, signed with the keys in ``<home>/keys/``.

    ``clock`` (unix seconds) dates new metadata; tests pass a fake one.
    """

    def __init__(self, home: Path, clock: Callable[[], float] = time.time) -> None:
        self.home = Path(home)
        self.dir = self.home / "repo"
        self.metadata_dir = self.dir / "metadata"
        self.targets_dir = self.dir / "targets"
        self.keys = KeyStore(self.home / "keys")
        self._clock = clock
        try:
            config = strict_json((self.dir / "config.json").read_bytes())
        except FileNotFoundError:
            raise RepositoryError(f"no repository in {self.home}", "run `fleet init`") from None
        self.expiry = ExpiryPolicy.from_dict(config["expiry"])
        self.max_target_bytes: int = config["max_target_bytes"]

    # ----------------------------------------------------------------------------------------------------------
    # Creating a repository

    @classmethod
    def init(
        cls,
        home: Path,
        *,
        root_threshold: int = 1,
        root_keys: int = 1,
        expiry: ExpiryPolicy | None = None,
        max_target_bytes: int = DEFAULT_MAX_TARGET_BYTES,
        force: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> dict[str, Any]:
        """Create the keys and version 1 of root, targets, snapshot and timestamp; return a summary (no secrets).

        Refuses if ``<home>/keys`` or ``<home>/repo`` has anything in it, unless ``force`` (which replaces both:
        every device enrolled with the old root must be enrolled again). Everything is built in a staging folder and
        renamed into place, so a failed init leaves no half-made repository.
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
            for role in (*_ONLINE_ROLES, "director"):
                keystore.generate(role)
            keystore.generate("root", root_keys)
            root_md = cls._initial_metadata(staging / "repo", keystore, root_threshold, expiry, _utc(clock()))
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
        root = root_md.signed
        roles = {
            role: {
                "keyids": list(root.roles[role].keyids),
                "threshold": root.roles[role].threshold,
                "online": role != "root",
            }
            for role in ("root", *_ONLINE_ROLES)
        }
        summary = {
            "repo": str(repo_dir),
            "keys": str(keys_dir),
            "roles": roles,
            "director": {"keyid": KeyStore(keys_dir).signer("director").public_key.keyid, "online": True},
            "root_expires": root.expires.isoformat(),
            "trusted_root_sha256": _sha256((repo_dir / "metadata" / "root.json").read_bytes()),
            "offline_keys": [f"{keys_dir}/root-{i}.pem" for i in range(1, root_keys + 1)],
            "note": "root is an offline role: move root-*.pem to offline storage; only root rotation needs them",
        }
        event(log, "repository_initialized", repo=str(repo_dir), roles=roles, director=summary["director"])
        return summary

    @staticmethod
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
        for role in _ONLINE_ROLES:
            root.add_key(keystore.signer(role).public_key, role)
        root_md = Metadata(root)
        for signer in root_signers:
            root_md.sign(signer, append=True)
        targets_md = Metadata(Targets(expires=now + expiry.targets))
        targets_md.sign(keystore.signer("targets"))
        targets_bytes = targets_md.to_bytes()
        snapshot_meta = {"targets.json": MetaFile(1, len(targets_bytes), {"sha256": _sha256(targets_bytes)})}
        snapshot_md = Metadata(Snapshot(expires=now + expiry.snapshot, meta=snapshot_meta))
        snapshot_md.sign(keystore.signer("snapshot"))
        snapshot_bytes = snapshot_md.to_bytes()
        timestamp_meta = MetaFile(1, len(snapshot_bytes), {"sha256": _sha256(snapshot_bytes)})
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

    # ----------------------------------------------------------------------------------------------------------
    # Reading

    def trusted_root(self) -> bytes:
        """The newest root.json: what a device is enrolled with (its trust anchor)."""
        return (self.metadata_dir / "root.json").read_bytes()

    def releases(self) -> list[dict[str, Any]]:
        """Every release, by model name then release counter."""
        infos = [release_info(t) for t in self._load().targets.signed.targets.values()]
        return [info.as_dict() for info in sorted(infos, key=lambda i: (i.name, i.release))]

    def release(self, name: str, version: str) -> dict[str, Any]:
        """One release with its signed hardware list and model card."""
        target = self._find(self._load(), name, version)
        return {
            **release_info(target).as_dict(),
            "hardware": target.custom["hardware"],
            "card": strict_json(target.custom["card"]),
        }

    def _load(self) -> _Metadata:
        """Follow timestamp -> snapshot -> targets, as a client does, and verify each against root.

        Verifying our own files keeps a tampered repository folder from being re-signed by the online keys.
        """
        read = self.metadata_dir.joinpath
        try:
            root = Metadata[Root].from_bytes(read("root.json").read_bytes())
            root.signed.verify_delegate(Root.type, root.signed_bytes, root.signatures)
            timestamp = Metadata[Timestamp].from_bytes(read("timestamp.json").read_bytes())
            snapshot_version = timestamp.signed.snapshot_meta.version
            snapshot = Metadata[Snapshot].from_bytes(read(f"{snapshot_version}.snapshot.json").read_bytes())
            targets_version = snapshot.signed.meta["targets.json"].version
            targets = Metadata[Targets].from_bytes(read(f"{targets_version}.targets.json").read_bytes())
            for md in (timestamp, snapshot, targets):
                root.signed.verify_delegate(md.signed.type, md.signed_bytes, md.signatures)
        except (OSError, KeyError, ValueError, tuf_exceptions.RepositoryError) as exc:
            raise RepositoryError(f"repository metadata in {self.metadata_dir} is unusable: {exc}") from exc
        return _Metadata(root, timestamp, snapshot, targets)

    @staticmethod
    def _find(state: _Metadata, name: str, version: str) -> TargetFile:
        for target in state.targets.signed.targets.values():
            if (target.custom["name"], target.custom["version"]) == (name, version):
                return target
        raise UnknownRelease(f"{name}:{version}")

    # ----------------------------------------------------------------------------------------------------------
    # Changing

    def publish(
        self,
        model_file: Path,
        name: str,
        version: str,
        card: Mapping[str, Any],
        *,
        hardware: Mapping[str, Any] | None = None,
        source_commit: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> ReleaseInfo:
        """Add ``models/<name>/<version>/<file>`` with its signed custom metadata; the new release is live on return.

        Inputs are checked before anything is written; ``hardware`` defaults to every supported machine.
        ``progress(n)`` is called as each chunk of ``n`` bytes of the model is copied in (a progress bar).
        """
        model_file = Path(model_file)
        runtime, size = self._check_model_file(model_file)
        if not safe_component(name):
            raise ReleaseError("bad_name", f"{name[:80]!r}: use [A-Za-z0-9_.+-], not starting with a dot")
        if not safe_component(version):
            raise ReleaseError("bad_version", f"{version[:80]!r}: use [A-Za-z0-9_.+-], not starting with a dot")
        path = target_path(name, version, model_file.name)
        card_text = checked_card_text(card, source_commit)
        described_sha256 = card_sha256(card, model_file.name)
        machines = checked_machines(hardware)
        with self._lock():
            state = self._load()
            targets = state.targets.signed.targets
            model_targets = [t for t in targets.values() if t.custom["name"] == name]
            if any(t.custom["version"] == version for t in model_targets):
                raise ReleaseError("duplicate", f"{name}:{version} is already published")
            release = max((t.custom["release"] for t in model_targets), default=0) + 1
            floor = max((t.custom["min_release"] for t in model_targets), default=1)
            stored, sha256, created = self._store_target(model_file, path, size, progress)
            try:
                if described_sha256 not in (None, sha256):
                    raise ReleaseError("card_mismatch", f"the card describes another {model_file.name}")
                custom = {
                    "name": name,
                    "version": version,
                    "release": release,
                    "min_release": floor,
                    "runtime": runtime,
                    "hardware": {"machines": machines},
                    "card": card_text,
                }
                targets[path] = TargetFile(size, {"sha256": sha256}, path, {"custom": custom})
                versions = self._commit(state, targets_changed=True)
            except BaseException:
                stored.unlink(missing_ok=True)
                for folder in reversed(created):
                    folder.rmdir()
                raise
        info = release_info(targets[path])
        event(log, "release_published", model=name, version=version, release=release, sha256=sha256, **versions)
        return info

    def revoke(self, name: str, version: str) -> ReleaseInfo:
        """Raise the model's ``min_release`` above this release, so devices refuse it (and every older one).

        Revoking a release that is already below the floor changes nothing.
        """
        with self._lock():
            state = self._load()
            revoked = release_info(self._find(state, name, version))
            new_floor = revoked.release + 1
            if new_floor <= revoked.min_release:
                return revoked
            for target in state.targets.signed.targets.values():
                if target.custom["name"] == name:
                    target.custom["min_release"] = new_floor
            versions = self._commit(state, targets_changed=True)
            info = release_info(self._find(state, name, version))
        event(log, "release_revoked", model=name, version=version, min_release=new_floor, **versions)
        return info

    def renew_online(self, now: float | None = None, margin: timedelta = timedelta(hours=12)) -> dict[str, int]:
        """Re-sign online metadata that expires within ``margin``; return the new versions ({} if none was due).

        Timestamp is renewed when due, snapshot when due (which needs a new timestamp), targets when due (which
        needs both). ``fleet serve`` calls this periodically, with ``margin`` well above its period.
        """
        now = self._clock() if now is None else now
        limit = _utc(now) + margin
        with self._lock():
            state = self._load()
            targets_due = state.targets.signed.expires <= limit
            snapshot_due = targets_due or state.snapshot.signed.expires <= limit
            if not (snapshot_due or state.timestamp.signed.expires <= limit):
                return {}
            versions = self._commit(state, targets_changed=targets_due, snapshot_changed=snapshot_due, now=now)
        event(log, "metadata_renewed", **versions)
        return versions

    def _commit(
        self, state: _Metadata, *, targets_changed: bool, snapshot_changed: bool = False, now: float | None = None
    ) -> dict[str, int]:
        """Sign and write new versions (targets -> snapshot -> timestamp); the timestamp.json rename commits them."""
        signed_at = _utc(self._clock() if now is None else now)
        versions: dict[str, int] = {}
        new_files: list[Path] = []
        try:
            if targets_changed:
                data = self._resign(state, state.targets, signed_at + self.expiry.targets)
                new_files.append(self._write_version(f"{state.targets.signed.version}.targets.json", data))
                meta = MetaFile(state.targets.signed.version, len(data), {"sha256": _sha256(data)})
                state.snapshot.signed.meta["targets.json"] = meta
                versions["targets"] = state.targets.signed.version
            if targets_changed or snapshot_changed:
                data = self._resign(state, state.snapshot, signed_at + self.expiry.snapshot)
                new_files.append(self._write_version(f"{state.snapshot.signed.version}.snapshot.json", data))
                meta = MetaFile(state.snapshot.signed.version, len(data), {"sha256": _sha256(data)})
                state.timestamp.signed.snapshot_meta = meta
                versions["snapshot"] = state.snapshot.signed.version
            data = self._resign(state, state.timestamp, signed_at + self.expiry.timestamp)
            versions["timestamp"] = state.timestamp.signed.version
            staged = stage(self.metadata_dir / "timestamp.json", data)
            new_files.append(staged)
            os.replace(staged, self.metadata_dir / "timestamp.json")  # the commit point
        except BaseException:
            for path in new_files:
                path.unlink(missing_ok=True)
            raise
        fsync_path(self.metadata_dir)
        return versions

    def _resign(self, state: _Metadata, md: Metadata[Any], expires: datetime) -> bytes:
        """Bump version and expiry, sign with the role's online key, and check root accepts the result."""
        md.signed.version += 1
        md.signed.expires = expires
        md.sign(self.keys.signer(md.signed.type))
        state.root.signed.verify_delegate(md.signed.type, md.signed_bytes, md.signatures)
        return md.to_bytes()

    def _write_version(self, name: str, data: bytes) -> Path:
        """Write a versioned file. Its version is above the committed one, so no client has seen that name: a file
        already there can only be left over from a change that crashed before its commit, and is replaced."""
        path = self.metadata_dir / name
        write_atomic(path, data)
        return path

    def _check_model_file(self, model_file: Path) -> tuple[str, int]:
        runtime = RUNTIME_BY_SUFFIX.get(model_file.suffix)
        if runtime is None:
            raise ReleaseError("unsupported_runtime", f"{model_file.name[:80]!r}: expected {sorted(RUNTIME_BY_SUFFIX)}")
        if not safe_component(model_file.name):
            raise ReleaseError("bad_filename", f"{model_file.name[:80]!r}: use [A-Za-z0-9_.+-]")
        if not model_file.is_file():
            raise ReleaseError("bad_file", f"{model_file} is not a file")
        size = model_file.stat().st_size
        if size == 0:
            raise ReleaseError("empty_file", str(model_file))
        if size > self.max_target_bytes:
            raise ReleaseError("too_large", f"{size} bytes > {self.max_target_bytes}")
        return runtime, size

    def _store_target(
        self, model_file: Path, path: str, size: int, progress: Callable[[int], None] | None = None
    ) -> tuple[Path, str, list[Path]]:
        """Copy the model in, hashing the bytes as they are copied (what is signed is what is stored).

        Returns the stored file, its sha256 and the folders created for it (to remove on failure).
        """
        name, version, filename = parse_target_path(path)
        folder = self.targets_dir / "models" / name / version
        created = [p for p in (folder.parent.parent, folder.parent, folder) if not p.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        fd, temp_name = tempfile.mkstemp(prefix=".publish.", dir=folder)
        temp = Path(temp_name)
        try:
            os.fchmod(fd, PUBLIC_FILE_MODE)
            copied = 0
            with os.fdopen(fd, "wb") as out, open(model_file, "rb") as src:
                while chunk := src.read(_COPY_CHUNK):
                    copied += len(chunk)
                    if copied > size:
                        raise ReleaseError("bad_file", f"{model_file} grew while it was copied")
                    digest.update(chunk)
                    out.write(chunk)
                    if progress is not None:
                        progress(len(chunk))
                out.flush()
                os.fsync(out.fileno())
            if copied != size:
                raise ReleaseError("bad_file", f"{model_file} shrank while it was copied")
            stored = folder / f"{digest.hexdigest()}.{filename}"
            os.replace(temp, stored)
        except BaseException:
            temp.unlink(missing_ok=True)
            for created_folder in reversed(created):
                created_folder.rmdir()
            raise
        return stored, digest.hexdigest(), created

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.dir / ".lock", "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)


