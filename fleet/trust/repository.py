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

The folder is append-only history: a versioned file is created exclusively and never replaced (one already there is
refused, naming it; one left over by a change that crashed before its commit is moved to ``metadata/.orphaned/`` by
the next change). Nothing is read or signed on top of a folder that is not consistent (:mod:`fleet.trust.history`):
every load checks the committed chain and, given the fleet's store (``ledger``), that the repository is at or ahead
of what the fleet recorded after its own last change, so a metadata file copied over another or an old backup put
back is refused, with the file and what was expected, instead of being re-signed. :meth:`Repository.verify` checks
the whole history (`fleet release verify`, `fleet serve`'s start).

Each target carries signed custom metadata, the facts a device decides on (read by ``agent.update.tuf_client``)::

    {"name", "version", "release", "min_release", "runtime", "hardware": {"machines": [...]}, "card": "<JSON text>"}

``release`` counts up per model name; ``min_release`` is the model's revocation floor, the same on each of its
targets. ``card`` is the model card (I/O schema, quantization, drift reference, smoke test, provenance plus the
source commit) as one JSON string: TUF's canonical JSON cannot encode floats, and cards are full of them.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from tuf.api.metadata import Metadata, MetaFile, TargetFile

from agent.canonical import strict_json
from agent.files import fsync_path, stage
from agent.logs import event
from agent.targets import safe_component, target_path
from fleet.errors import FleetError
from fleet.store.api import RepoCommits
from fleet.store.rows import RepoCommit
from fleet.trust import history
from fleet.trust.history import Committed, Finding, HistoryReport
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
from fleet.trust.repo_init import (
    ExpiryPolicy,
    RepositoryError,
    create_repository,
    metadata_reader,
    utc,
)
from fleet.trust.target_files import check_model_file, store_target

log = logging.getLogger(__name__)


def _versions(versions: Mapping[str, int]) -> str:
    return ", ".join(f"{role} v{version}" for role, version in versions.items())


class Repository:
    """One fleet's TUF repository at ``<home>/repo/``, signed with the keys in ``<home>/keys/``.

    ``clock`` (unix seconds) dates new metadata; tests pass a fake one. ``ledger`` (the fleet's store) keeps what the
    fleet's last change left in the repository: every load refuses a repository behind it, every change records the
    new state in it. Without one only the repository's own chain is checked.
    """

    def __init__(
        self, home: Path, clock: Callable[[], float] = time.time, ledger: RepoCommits | None = None
    ) -> None:
        self.home = Path(home)
        self.dir = self.home / "repo"
        self.metadata_dir = self.dir / "metadata"
        self.targets_dir = self.dir / "targets"
        self.keys = KeyStore(self.home / "keys")
        self._clock = clock
        self._ledger = ledger
        self._read = metadata_reader(self.metadata_dir)
        try:
            config = strict_json((self.dir / "config.json").read_bytes())
        except FileNotFoundError:
            raise RepositoryError(f"no repository in {self.home}", "run `fleet init`") from None
        self.expiry = ExpiryPolicy.from_dict(config["expiry"])
        self.max_target_bytes: int = config["max_target_bytes"]

    #: Create a repository in ``home``: :func:`fleet.trust.repo_init.create_repository`.
    init = staticmethod(create_repository)

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

    def verify(self) -> HistoryReport:
        """Check the whole history (:func:`fleet.trust.history.verify`): the committed chain, the fleet's record and
        every versioned file. Reports, never raises for what it finds; changes nothing."""
        record = self._last_record()
        try:
            names = os.listdir(self.metadata_dir)
        except OSError as exc:
            raise RepositoryError(f"cannot list {self.metadata_dir}: {exc.strerror}", "restore it") from None
        return history.verify(names, self._read, record)

    def ensure_consistent(self) -> HistoryReport:
        """:meth:`verify`, refusing an inconsistent repository (:class:`RepositoryError`); otherwise the fleet's record
        is caught up and leftovers moved aside, as before a change. `fleet serve` calls this at start."""
        with self._lock():
            report = self.verify()
            if not report.ok:
                raise self.refusal(report)
            self._load(change=True)
        return report

    def _load(self, *, change: bool = False) -> Committed:
        """Follow timestamp -> snapshot -> targets, as a client does, checking lengths, hashes, versions and
        signatures against root, and the result against the fleet's record of its last change.

        Checking our own files keeps a tampered or rolled-back repository folder from being shown as the fleet's or
        re-signed by the online keys. Before a ``change`` (under the lock) leftovers of a crashed change are moved
        aside and a record behind a valid repository (a crash between commit and record) is caught up.
        """
        record = self._last_record()  # before the files: a change committing meanwhile only puts them ahead of it
        state, findings = history.read_committed(self._read)
        if state is not None and record is not None:
            findings += history.check_record(state, record, self._read)
        fatal = [f for f in findings if f.fatal]
        if state is None or fatal:
            raise self._inconsistent(fatal, record)
        if change:
            self._set_orphans_aside(state)
            if record is None or record.versions != state.versions() or record.sha256 != state.sha256:
                event(log, "repository_record_caught_up", recorded=None if record is None else record.versions,
                      found=state.versions())  # fmt: skip
                self._record(state)
        return state

    def _last_record(self) -> RepoCommit | None:
        return None if self._ledger is None else self._ledger.last_repo_commit()

    def _record(self, state: Committed) -> None:
        """Record what the repository now is; a failure is logged (the next change catches the record up)."""
        if self._ledger is None:
            return
        try:
            self._ledger.record_repo_commit(state.record())
        except FleetError as exc:
            event(log, "repository_unrecorded", logging.WARNING, versions=state.versions(), error=exc.message())

    def refusal(self, report: HistoryReport) -> RepositoryError:
        """The error refusing the repository ``report`` found inconsistent."""
        return self._inconsistent([f for f in report.findings if f.fatal], report.recorded)

    def _inconsistent(self, findings: list[Finding], record: RepoCommit | None) -> RepositoryError:
        more = f" (and {len(findings) - 1} more)" if len(findings) > 1 else ""
        since = "" if record is None else f" taken at or after the fleet's last change ({_versions(record.versions)})"
        return RepositoryError(
            f"the repository in {self.dir} is inconsistent: {findings[0]}{more}",
            f"restore {self.metadata_dir} from a backup{since}; `fleet release verify` lists every finding. Nothing "
            "is signed on top of it",
            reason="repository_inconsistent",
        )

    def _set_orphans_aside(self, state: Committed) -> None:
        """Move versioned files above the committed versions (a change crashed before its commit: no client has
        seen them) to ``metadata/.orphaned/``, content-named, so the next versions are written afresh."""
        for name in history.orphans(os.listdir(self.metadata_dir), state.versions()):
            path = self.metadata_dir / name
            aside = self.metadata_dir / ".orphaned" / f"{name}.{history.sha256(path.read_bytes())[:16]}"
            aside.parent.mkdir(exist_ok=True)
            os.replace(path, aside)
            event(log, "metadata_orphan_moved", logging.WARNING, file=name, to=str(aside))

    @staticmethod
    def _find(state: Committed, name: str, version: str) -> TargetFile:
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
        runtime, size = check_model_file(model_file, self.max_target_bytes)
        if not safe_component(name):
            raise ReleaseError("bad_name", f"{name[:80]!r}: use [A-Za-z0-9_.+-], not starting with a dot")
        if not safe_component(version):
            raise ReleaseError("bad_version", f"{version[:80]!r}: use [A-Za-z0-9_.+-], not starting with a dot")
        path = target_path(name, version, model_file.name)
        card_text = checked_card_text(card, source_commit)
        described_sha256 = card_sha256(card, model_file.name)
        machines = checked_machines(hardware)
        with self._lock():
            state = self._load(change=True)
            targets = state.targets.signed.targets
            model_targets = [t for t in targets.values() if t.custom["name"] == name]
            if any(t.custom["version"] == version for t in model_targets):
                raise ReleaseError("duplicate", f"{name}:{version} is already published")
            release = max((t.custom["release"] for t in model_targets), default=0) + 1
            floor = max((t.custom["min_release"] for t in model_targets), default=1)
            stored, sha256, created = store_target(self.targets_dir, model_file, path, size, progress)
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
            state = self._load(change=True)
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
        limit = utc(now) + margin
        with self._lock():
            state = self._load(change=True)
            targets_due = state.targets.signed.expires <= limit
            snapshot_due = targets_due or state.snapshot.signed.expires <= limit
            if not (snapshot_due or state.timestamp.signed.expires <= limit):
                return {}
            versions = self._commit(state, targets_changed=targets_due, snapshot_changed=snapshot_due, now=now)
        event(log, "metadata_renewed", **versions)
        return versions

    def _commit(
        self, state: Committed, *, targets_changed: bool, snapshot_changed: bool = False, now: float | None = None
    ) -> dict[str, int]:
        """Sign and write new versions (targets -> snapshot -> timestamp); the timestamp.json rename commits them."""
        signed_at = utc(self._clock() if now is None else now)
        versions: dict[str, int] = {}
        new_files: list[Path] = []
        try:
            if targets_changed:
                data = self._resign(state, state.targets, signed_at + self.expiry.targets)
                new_files.append(self._write_version(f"{state.targets.signed.version}.targets.json", data))
                state.sha256["targets"] = history.sha256(data)
                meta = MetaFile(state.targets.signed.version, len(data), {"sha256": state.sha256["targets"]})
                state.snapshot.signed.meta["targets.json"] = meta
                versions["targets"] = state.targets.signed.version
            if targets_changed or snapshot_changed:
                data = self._resign(state, state.snapshot, signed_at + self.expiry.snapshot)
                new_files.append(self._write_version(f"{state.snapshot.signed.version}.snapshot.json", data))
                state.sha256["snapshot"] = history.sha256(data)
                meta = MetaFile(state.snapshot.signed.version, len(data), {"sha256": state.sha256["snapshot"]})
                state.timestamp.signed.snapshot_meta = meta
                versions["snapshot"] = state.snapshot.signed.version
            data = self._resign(state, state.timestamp, signed_at + self.expiry.timestamp)
            state.sha256["timestamp"] = history.sha256(data)
            versions["timestamp"] = state.timestamp.signed.version
            staged = stage(self.metadata_dir / "timestamp.json", data)
            new_files.append(staged)
            os.replace(staged, self.metadata_dir / "timestamp.json")  # the commit point
        except BaseException:
            for path in new_files:
                path.unlink(missing_ok=True)
            raise
        fsync_path(self.metadata_dir)
        self._record(state)
        return versions

    def _resign(self, state: Committed, md: Metadata[Any], expires: datetime) -> bytes:
        """Bump version and expiry, sign with the role's online key, and check root accepts the result."""
        md.signed.version += 1
        md.signed.expires = expires
        md.sign(self.keys.signer(md.signed.type))
        state.root.signed.verify_delegate(md.signed.type, md.signed_bytes, md.signatures)
        return md.to_bytes()

    def _write_version(self, name: str, data: bytes) -> Path:
        """Create a versioned file, never replacing one: the staged file is hard-linked to its name, which fails if
        anything is there (leftovers were moved aside under the lock, so that is someone else's write)."""
        path = self.metadata_dir / name
        staged = stage(path, data)
        try:
            os.link(staged, path)
        except FileExistsError:
            raise RepositoryError(
                f"{path} already exists: a versioned metadata file is never replaced",
                "find out what wrote it (every change takes repo/.lock), then run `fleet release verify`. Nothing was "
                "changed",
                reason="metadata_exists",
            ) from None
        finally:
            staged.unlink()
        return path

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.dir / ".lock", "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)



