"""The fleet's TUF repository checked as append-only history: pure functions over its files' bytes and metadata.

:class:`fleet.trust.repository.Repository` only ever adds files (each version of root, snapshot and targets under
its own name, never rewritten); timestamp.json, the commit point, is the one file replaced in place. So whatever the
folder holds can be checked without trusting whoever last wrote to it (no key is needed to copy a file):

- the committed chain (:func:`read_committed`, every load): root.json verifies against itself, equals
  ``N.root.json`` of its version and has no newer root beside it; timestamp.json verifies against root; the
  snapshot it names has the length, sha256 and version timestamp records, and verifies; likewise the targets the
  snapshot names.
- the record (:func:`check_record`, every load given the fleet's store): the versions and sha256s the fleet recorded
  after its own last change (:class:`~fleet.store.rows.RepoCommit`). A repository behind it (an old backup put back,
  an older timestamp.json) or whose recorded files hash otherwise is refused; one ahead of it with a valid chain (a
  crash between the commit and the record) is accepted, and the repository catches the record up.
- the whole history (:func:`check_history`, for `fleet release verify` and at `fleet serve`'s start): root versions
  1..N each signed by the one before and by itself; every versioned file's signed version equal to its name's N;
  every snapshot signed, its targets version non-decreasing in N, and the targets file it names still of the length
  and sha256 it records. A versioned file above the committed version that nothing names is left over from a change
  that crashed before its commit: reported, not fatal (the next change moves it to ``metadata/.orphaned/``).

Each problem is a :class:`Finding` with a stable ``reason``: ``missing``, ``unreadable``, ``length_mismatch``,
``hash_mismatch``, ``version_mismatch``, ``bad_signature``, ``root_chain``, ``rollback``, ``behind_record``,
``record_changed``, or ``orphan`` (the one that is not fatal).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from tuf.api import exceptions as tuf_exceptions
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Targets, Timestamp

from fleet.store.rows import REPO_ROLES, RepoCommit

#: A file of the metadata folder by name: its bytes, or None if there is no such file.
Read = Callable[[str], bytes | None]
#: Versioned metadata file names: ``<N>.<role>.json``.
VERSIONED = re.compile(r"([1-9][0-9]*)\.(root|snapshot|targets)\.json")


@dataclass(frozen=True)
class Finding:
    """One way the repository differs from a consistent history: which file, what was expected and what was found."""

    reason: str
    file: str
    detail: str
    fatal: bool = True

    def __str__(self) -> str:
        return f"{self.file}: {self.detail}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Committed:
    """The committed state as :func:`read_committed` checked it, with the sha256 of each role's file."""

    root: Metadata[Root]
    timestamp: Metadata[Timestamp]
    snapshot: Metadata[Snapshot]
    targets: Metadata[Targets]
    sha256: dict[str, str]

    def versions(self) -> dict[str, int]:
        return {role: getattr(self, role).signed.version for role in REPO_ROLES}

    def record(self) -> RepoCommit:
        """This state as the fleet's store records it after a change."""
        return RepoCommit(self.versions(), dict(self.sha256))


@dataclass(frozen=True)
class HistoryReport:
    """The whole check: the committed versions, the fleet's record (None before its first), how many versioned files
    were read, and every finding. ``ok`` unless a finding is fatal."""

    versions: dict[str, int]
    recorded: RepoCommit | None
    files: int
    findings: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        return not any(f.fatal for f in self.findings)

    def summary(self) -> str:
        """One line: consistent or not, the committed versions, files read, and the record's timestamp version."""
        versions = ", ".join(f"{role} v{n}" for role, n in self.versions.items()) or "no committed state"
        recorded = "none yet" if self.recorded is None else f"timestamp v{self.recorded.versions['timestamp']}"
        state = "consistent" if self.ok else "INCONSISTENT"
        return f"repository history {state}: {versions}; {self.files} versioned files; fleet record: {recorded}"

    def as_dict(self) -> dict[str, Any]:
        recorded = None if self.recorded is None else {"versions": self.recorded.versions,
                                                       "recorded_at": self.recorded.recorded_at}  # fmt: skip
        return {"ok": self.ok, "versions": self.versions, "recorded": recorded, "files": self.files,
                "findings": [f.as_dict() for f in self.findings]}  # fmt: skip


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_name(role: str, version: int) -> str:
    """The file a role's version lives in: ``timestamp.json``, else ``<version>.<role>.json``."""
    return "timestamp.json" if role == "timestamp" else f"{version}.{role}.json"


def _found(data: bytes) -> str:
    """What a file is, in a finding: its length, hash and (if it parses) its role and signed version."""
    try:
        signed = Metadata.from_bytes(data).signed
        what = f", signed {signed.type} v{signed.version}"
    except tuf_exceptions.RepositoryError:
        what = ""
    return f"{len(data)} bytes, sha256 {sha256(data)[:16]}{what}"


def _parse(name: str, data: bytes, role: str) -> Metadata[Any] | Finding:
    """The file's metadata if it is ``role``'s, else the finding saying why not."""
    try:
        md: Metadata[Any] = Metadata.from_bytes(data)
    except tuf_exceptions.RepositoryError as exc:
        return Finding("unreadable", name, f"is not TUF metadata ({exc})")
    if md.signed.type != role:
        return Finding("unreadable", name, f"holds {md.signed.type} metadata, not {role}")
    return md


def _signed(root: Metadata[Root], md: Metadata[Any], name: str) -> Finding | None:
    """None if ``root`` accepts ``md``'s signatures for its role."""
    try:
        root.signed.verify_delegate(md.signed.type, md.signed_bytes, md.signatures)
    except tuf_exceptions.UnsignedMetadataError as exc:
        return Finding("bad_signature", name, f"not signed by the {md.signed.type} keys of root v{root.signed.version}"
                                              f" ({exc})")  # fmt: skip
    return None


def check_reference(name: str, data: bytes | None, meta: MetaFile, by: str) -> Finding | None:
    """None if ``data`` (the file ``name``) is what ``meta``, recorded in the file ``by``, says: length and sha256."""
    if data is None:
        return Finding("missing", name, f"{by} names it, but it is missing")
    expected = (meta.hashes or {}).get("sha256")
    if meta.length is not None and len(data) != meta.length:
        reason = "length_mismatch"
    elif expected is not None and sha256(data) != expected:
        reason = "hash_mismatch"
    else:
        return None
    recorded = f"{meta.length} bytes, sha256 {(expected or '?')[:16]}"
    return Finding(reason, name, f"{by} records v{meta.version}: {recorded}; found {_found(data)}")


def _follow(
    read: Read, root: Metadata[Root], role: str, meta: MetaFile, by: str
) -> tuple[Metadata[Any] | None, str, list[Finding]]:
    """The file ``meta`` names (read, hashed, parsed, version and signature checked), its sha256, and the findings."""
    name = file_name(role, meta.version)
    data = read(name)
    bad = check_reference(name, data, meta, by)
    if bad is not None or data is None:
        return None, "", [bad] if bad else []
    md = _parse(name, data, role)
    if isinstance(md, Finding):
        return None, "", [md]
    findings = [] if md.signed.version == meta.version else [
        Finding("version_mismatch", name, f"its signed version is {md.signed.version}, {by} names v{meta.version}")
    ]  # fmt: skip
    signed = _signed(root, md, name)
    return md, sha256(data), [*findings, *([signed] if signed else [])]


def read_committed(read: Read) -> tuple[Committed | None, list[Finding]]:
    """Follow root.json and timestamp -> snapshot -> targets as a client does, checking every step; the committed
    state (None if a step found no file to go on with) and the findings (the state is not to be used if any is)."""
    root_bytes = read("root.json")
    if root_bytes is None:
        return None, [Finding("missing", "root.json", "the trusted root is missing")]
    root = _parse("root.json", root_bytes, "root")
    if isinstance(root, Finding):
        return None, [root]
    if bad := _signed(root, root, "root.json"):
        return None, [bad]
    findings = []
    newest = root.signed.version
    if read(f"{newest}.root.json") != root_bytes:
        findings.append(Finding("root_chain", "root.json", f"is not the same file as {newest}.root.json"))
    if read(f"{newest + 1}.root.json") is not None:
        findings.append(Finding("root_chain", f"{newest + 1}.root.json", f"is newer than root.json (v{newest})"))
    timestamp_bytes = read("timestamp.json")
    if timestamp_bytes is None:
        return None, [*findings, Finding("missing", "timestamp.json", "the commit point is missing")]
    timestamp = _parse("timestamp.json", timestamp_bytes, "timestamp")
    if isinstance(timestamp, Finding):
        return None, [*findings, timestamp]
    if bad := _signed(root, timestamp, "timestamp.json"):
        return None, [*findings, bad]
    by = f"timestamp.json (v{timestamp.signed.version})"
    snapshot, snapshot_sha, more = _follow(read, root, "snapshot", timestamp.signed.snapshot_meta, by)
    findings += more
    if snapshot is None:
        return None, findings
    by = file_name("snapshot", snapshot.signed.version)
    meta = snapshot.signed.meta.get("targets.json")
    if meta is None:
        return None, [*findings, Finding("unreadable", by, "names no targets.json")]
    targets, targets_sha, more = _follow(read, root, "targets", meta, by)
    findings += more
    if targets is None:
        return None, findings
    hashes = {"root": sha256(root_bytes), "timestamp": sha256(timestamp_bytes), "snapshot": snapshot_sha,
              "targets": targets_sha}  # fmt: skip
    return Committed(root, timestamp, snapshot, targets, hashes), findings


def named_versions(read: Read) -> dict[str, int]:
    """The versions root.json and the chain from timestamp.json name, as far as the files parse (nothing verified):
    what the whole-history check goes by when the committed chain itself is broken."""
    versions: dict[str, int] = {}
    root, timestamp = _parsed(read, "root.json", "root"), _parsed(read, "timestamp.json", "timestamp")
    if root is None or timestamp is None:
        return versions
    versions.update(root=root.signed.version, timestamp=timestamp.signed.version,
                    snapshot=timestamp.signed.snapshot_meta.version)  # fmt: skip
    snapshot = _parsed(read, file_name("snapshot", versions["snapshot"]), "snapshot")
    if snapshot is not None and "targets.json" in snapshot.signed.meta:
        versions["targets"] = snapshot.signed.meta["targets.json"].version
    return versions


def _parsed(read: Read, name: str, role: str) -> Metadata[Any] | None:
    data = read(name)
    md = None if data is None else _parse(name, data, role)
    return None if isinstance(md, Finding) else md


def check_record(state: Committed, record: RepoCommit, read: Read) -> list[Finding]:
    """How the committed state differs from the fleet's record of its last change: a role behind it, or a recorded
    file that no longer hashes as recorded. A state ahead of it passes (its chain was checked)."""
    findings = []
    versions = state.versions()
    for role in REPO_ROLES:
        have, want = versions[role], record.versions[role]
        name = file_name(role, want)
        if have < want:
            findings.append(Finding("behind_record", file_name(role, have), f"{role} is at v{have}, behind v{want} "
                                    "that the fleet recorded at its last change"))  # fmt: skip
            continue
        if have == want:
            found: str | None = state.sha256[role]
        elif role == "timestamp":
            continue  # replaced in place by every change: only its version can be compared
        else:
            data = read(name)
            found = None if data is None else sha256(data)
        if found != record.sha256[role]:
            what = "is missing" if found is None else f"hashes {found[:16]}"
            findings.append(Finding("record_changed", name, f"{what}; the fleet recorded {role} v{want} with sha256 "
                                    f"{record.sha256[role][:16]} at its last change"))  # fmt: skip
    return findings


def versioned_files(names: Iterable[str]) -> dict[str, dict[int, str]]:
    """The versioned files among ``names``, by role then version."""
    found: dict[str, dict[int, str]] = {"root": {}, "snapshot": {}, "targets": {}}
    for name in names:
        if match := VERSIONED.fullmatch(name):
            found[match[2]][int(match[1])] = name
    return found


def orphans(names: Iterable[str], versions: Mapping[str, int]) -> list[str]:
    """Snapshot and targets files above the committed versions: nothing names them, no client has seen them."""
    found = versioned_files(names)
    return [name for role in ("snapshot", "targets") for n, name in sorted(found[role].items()) if n > versions[role]]


def check_history(names: Iterable[str], read: Read, versions: Mapping[str, int]) -> list[Finding]:
    """Every versioned file in ``names`` (the metadata folder's), against the committed ``versions``."""
    found = versioned_files(names)
    roots, findings = _check_roots(found["root"], read, versions["root"])
    findings += _check_snapshots(found["snapshot"], read, versions["snapshot"], roots)
    named = {f.file for f in findings}
    for role in ("snapshot", "targets"):
        for n in range(1, versions[role] + 1):
            if n not in found[role] and file_name(role, n) not in named:
                findings.append(Finding("missing", file_name(role, n), f"{role} v{n} is gone from the history"))
    for name in orphans(names, versions):
        findings.append(
            Finding(
                "orphan",
                name,
                "is above the committed version and named by nothing: left over from "
                "a change that did not commit (the next change moves it to .orphaned/)",
                fatal=False,
            )
        )
    return findings


def _check_roots(found: dict[int, str], read: Read, newest: int) -> tuple[list[Metadata[Root]], list[Finding]]:
    """Root versions 1..N: each present, of its version, signed by the version before and by itself."""
    roots: list[Metadata[Root]] = []
    findings: list[Finding] = []
    previous: Metadata[Root] | None = None
    for n in range(1, max(newest, *found) + 1):
        name = file_name("root", n)
        data = read(name)
        if data is None:
            findings.append(Finding("root_chain", name, "is missing: devices walk every root version"))
            previous = None
            continue
        md = _parse(name, data, "root")
        if isinstance(md, Finding):
            findings.append(md)
            previous = None
            continue
        if md.signed.version != n:
            findings.append(Finding("version_mismatch", name, f"its signed version is {md.signed.version}"))
        for signer in (previous, md) if n > 1 else (md,):
            if signer is None:
                findings.append(Finding("root_chain", name, f"cannot be checked against root v{n - 1}"))
            elif bad := _signed(signer, md, name):
                findings.append(bad)
        roots.append(md)
        previous = md
    return roots, findings


def _check_snapshots(found: dict[int, str], read: Read, committed: int, roots: list[Metadata[Root]]) -> list[Finding]:
    """Each committed snapshot version: signed, of its version, naming targets versions that never go down, and each
    targets file it names of the length and sha256 it records (each targets file read once)."""
    findings: list[Finding] = []
    checked: dict[int, str] = {}  # targets version -> sha256 a snapshot named and the file matched
    last: tuple[int, str] | None = None  # (targets version, snapshot file) of the snapshot before
    for n, name in sorted(found.items()):
        data = None if n > committed else read(name)  # above: an orphan, reported apart
        if data is None:
            continue
        md = _parse(name, data, "snapshot")
        if isinstance(md, Finding):
            findings.append(md)
            continue
        if md.signed.version != n:
            findings.append(Finding("version_mismatch", name, f"its signed version is {md.signed.version}"))
        if roots and all(_signed(root, md, name) for root in reversed(roots)):
            findings.append(Finding("bad_signature", name, "not signed by the snapshot keys of any root version"))
        meta = md.signed.meta.get("targets.json")
        if meta is None:
            findings.append(Finding("unreadable", name, "names no targets.json"))
            continue
        if last is not None and meta.version < last[0]:
            findings.append(Finding("rollback", name, f"names targets v{meta.version}, below v{last[0]} that {last[1]} "
                                    "names"))  # fmt: skip
        last = (meta.version, name)
        expected = (meta.hashes or {}).get("sha256", "")
        if checked.get(meta.version) != expected:
            targets_name = file_name("targets", meta.version)
            if bad := check_reference(targets_name, read(targets_name), meta, name):
                findings.append(bad)
            else:
                checked[meta.version] = expected
    return findings


def verify(names: Iterable[str], read: Read, record: RepoCommit | None) -> HistoryReport:
    """The committed chain, the record (if any) and the whole history of the metadata folder holding ``names``."""
    names = list(names)
    state, findings = read_committed(read)
    versions = named_versions(read) if state is None else state.versions()
    if state is not None and record is not None:
        findings += check_record(state, record, read)
    if set(versions) == set(REPO_ROLES):
        findings += check_history(names, read, versions)
    unique = list({(f.reason, f.file): f for f in findings}.values())
    return HistoryReport(versions, record, sum(map(len, versioned_files(names).values())), tuple(unique))
