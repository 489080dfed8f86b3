"""What a release is, apart from how the repository stores it: its facts (:class:`ReleaseInfo`), its model card
and hardware list as checked before signing, and the errors of a refused publish or revoke with their fixes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from tuf.api.metadata import TargetFile

from agent.canonical import canonical_json
from agent.targets import safe_component
from fleet.errors import FleetError, NotFound

MAX_CARD_BYTES = 1024 * 1024
ALL_MACHINES = ("x86_64", "aarch64", "armv7l")
#: Card sections a device needs to install and watch a release (see fleet.examples.modelgen for their content).
CARD_SECTIONS = ("input", "output", "drift", "smoke_test", "provenance")



#: How to fix each refused publish or revoke (``ReleaseError.reason``); the error's own detail says what was wrong.
RELEASE_FIXES = {
    "unknown_release": "see `fleet release list`",
    "duplicate": "publish under a new --version; released versions never change",
    "unsupported_runtime": "export the model as .onnx or .tflite",
    "bad_filename": "rename the model file to letters, digits and _.+-",
    "bad_file": "pass a regular model file",
    "empty_file": "pass the real model file; this one is empty",
    "too_large": "shrink the model, or raise max_target_bytes in <home>/repo/config.json",
    "bad_name": "choose another --name",
    "bad_version": "choose another --version",
    "bad_card": "fix the card (it needs input, output, drift, smoke_test and provenance objects)",
    "card_mismatch": "the card lists another sha256 for this file: pass the card made with this model file",
    "bad_hardware": "pass machine names like aarch64, armv7l, x86_64",
}


class ReleaseError(FleetError, ValueError):
    """A publish or revoke that was refused; nothing was changed. ``reason`` is short and stable."""

    def __init__(self, reason: str, detail: str = "") -> None:
        fix = RELEASE_FIXES.get(reason, "")
        super().__init__(reason, detail, f"{fix}. Nothing was changed." if fix else "Nothing was changed.")


class UnknownRelease(ReleaseError, NotFound):
    """No release of that name and version was ever published."""

    def __init__(self, ref: str) -> None:
        super().__init__("unknown_release", f"unknown release {ref}")


@dataclass(frozen=True)
class ReleaseInfo:
    name: str
    version: str
    release: int
    min_release: int
    target: str
    sha256: str
    length: int
    runtime: str

    @property
    def revoked(self) -> bool:
        return self.release < self.min_release

    def desired_entry(self) -> dict[str, Any]:
        """This release as one model of a desired state (``fleet.trust.director.sign_desired``)."""
        return {"target": self.target, "release": self.release, "sha256": self.sha256, "length": self.length}

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "revoked": self.revoked}


def release_info(target: TargetFile) -> ReleaseInfo:
    custom = target.custom
    return ReleaseInfo(
        name=custom["name"],
        version=custom["version"],
        release=custom["release"],
        min_release=custom["min_release"],
        target=target.path,
        sha256=target.hashes["sha256"],
        length=target.length,
        runtime=custom["runtime"],
    )


def checked_card_text(card: Mapping[str, Any], source_commit: str | None) -> str:
    """The signed card as JSON text, with the source commit added to its provenance."""
    if not isinstance(card, Mapping):
        raise ReleaseError("bad_card", "the card is not an object")
    for section in CARD_SECTIONS:
        if not isinstance(card.get(section), Mapping):
            raise ReleaseError("bad_card", f"the card has no {section!r} object")
    card = dict(card)
    if source_commit is not None:
        if not (isinstance(source_commit, str) and 0 < len(source_commit) <= 128 and source_commit.isprintable()):
            raise ReleaseError("bad_card", "source_commit must be short printable text")
        provenance = card.get("provenance", {})
        if not isinstance(provenance, Mapping):
            raise ReleaseError("bad_card", "card provenance is not an object")
        card["provenance"] = {**provenance, "source_commit": source_commit}
    try:
        text = canonical_json(card).decode()
    except (TypeError, ValueError) as exc:
        raise ReleaseError("bad_card", f"not plain finite JSON: {exc}") from None
    if len(text) > MAX_CARD_BYTES:
        raise ReleaseError("bad_card", f"{len(text)} bytes > {MAX_CARD_BYTES}")
    return text


def card_sha256(card: Mapping[str, Any], filename: str) -> str | None:
    """The sha256 the card records for this file, if it records one (modelgen's cards list each file they describe)."""
    files = card.get("files")
    entry = files.get(filename) if isinstance(files, Mapping) else None
    return entry.get("sha256") if isinstance(entry, Mapping) else None


def checked_machines(hardware: Mapping[str, Any] | None) -> list[str]:
    if hardware is None:
        return sorted(ALL_MACHINES)
    machines = hardware.get("machines") if isinstance(hardware, Mapping) else None
    if set(hardware or {}) != {"machines"} or not isinstance(machines, list | tuple) or not machines:
        raise ReleaseError("bad_hardware", 'expected {"machines": [names...]}')
    if not all(isinstance(m, str) and safe_component(m) for m in machines):
        raise ReleaseError("bad_hardware", "machine names are platform.machine() values like aarch64")
    return sorted(set(machines))
