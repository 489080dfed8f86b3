"""Publishing and revoking releases: the repository signs, the audit log records who did it; and checking the
repository's history against the fleet's record of its changes.

A publish or revoke that is refused changes nothing: every check runs before the repository commits (by one rename),
and the audit entry is written only for a change that happened. Nothing is signed on top of a repository that is not
the history the fleet wrote (:mod:`fleet.trust.history`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agent.canonical import strict_json
from agent.logs import event
from agent.runtime import RuntimeLayerError, RuntimeNotInstalled, load_model
from agent.targets import RUNTIME_BY_SUFFIX
from fleet.errors import FleetError
from fleet.store.api import AuditLog, RepoCommits
from fleet.trust.history import HistoryReport
from fleet.trust.releases import ReleaseInfo
from fleet.trust.repository import Repository
from fleet.views import release_ref

log = logging.getLogger(__name__)

_UNCHANGED = "Nothing was changed."


def open_repository(home: Path, store: RepoCommits) -> Repository:
    """The home's TUF repository, checked on every load against what ``store`` recorded after the fleet's last change
    to it, and recording each change there."""
    return Repository(home, ledger=store)


def verify(repo: Repository) -> HistoryReport:
    """Check the repository's whole history (`fleet release verify`): every finding, none raised. A report that is
    not ``ok`` becomes the refusal every other command gives through ``repo.refusal(report)``."""
    return repo.verify()


def read_card(path: Path) -> dict[str, Any]:
    """A model card from its JSON file, strictly parsed (no duplicate keys, no NaN)."""
    try:
        card = strict_json(path.read_bytes())
    except FileNotFoundError:
        raise FleetError(
            "no_card", f"no model card at {path}", "pass --card PATH (card.json from `fleet model example` is one)"
        ) from None
    except (OSError, ValueError) as exc:
        raise FleetError("bad_card", f"cannot read the card {path}: {exc}", "pass a card.json") from None
    if not isinstance(card, dict):
        raise FleetError("bad_card", f"the card {path} is not a JSON object", "pass a card.json")
    return card


def check_loads(model_file: Path) -> str | None:
    """Open the model with the runtime devices will use, so a damaged file is refused here, not on every device.

    Returns a warning when this host lacks that runtime (LiteRT is an extra): the device's smoke test still runs
    before any switch. A file of no known suffix is left to the repository, which refuses it with its own reason.
    """
    runtime = RUNTIME_BY_SUFFIX.get(model_file.suffix)
    if runtime is None:
        return None
    try:
        with load_model(model_file, runtime=runtime):
            pass
    except RuntimeNotInstalled as exc:
        return f"not checked that {model_file.name} loads: {exc}"
    except RuntimeLayerError as exc:
        cause = exc.__cause__ or exc  # the runtime's own words; the agent's message adds a fix meant for devices
        raise FleetError(
            "model_does_not_load",
            f"{model_file} does not load with {runtime}: {str(cause)[:300]}",
            f"export the model again. {_UNCHANGED}",
        ) from None
    return None


def publish(
    repo: Repository,
    audit: AuditLog,
    model_file: Path,
    name: str,
    version: str,
    card: Mapping[str, Any],
    *,
    actor: str,
    machines: tuple[str, ...] = (),
    source_commit: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[ReleaseInfo, list[str]]:
    """Check the file loads, sign it as release ``name:version`` and record who published it.

    Returns the release and any warnings (a runtime this host lacks). Raises a :class:`FleetError` naming the fix
    (a :class:`~fleet.trust.repository.ReleaseError` for a refused publish); nothing is changed then. ``progress``
    gets the bytes of each chunk copied into the repository.
    """
    warning = check_loads(model_file)
    hardware = {"machines": list(machines)} if machines else None
    try:
        info = repo.publish(
            model_file, name, version, card, hardware=hardware, source_commit=source_commit, progress=progress
        )
    except (FileNotFoundError, PermissionError) as exc:
        raise _key_error(exc) from None
    detail = {k: getattr(info, k) for k in ("release", "target", "sha256", "length", "runtime")}
    audit.append_audit(actor, "publish", release_ref(name, version), detail)
    return info, [warning] if warning else []


def revoke(repo: Repository, audit: AuditLog, name: str, version: str, *, actor: str) -> tuple[ReleaseInfo, bool]:
    """Revoke ``name:version`` and every older release of the model (devices refuse them from their next refresh).

    Returns the release and whether anything changed: revoking a revoked release changes nothing and is not audited.
    """
    before = repo.release(name, version)["min_release"]
    try:
        info = repo.revoke(name, version)
    except (FileNotFoundError, PermissionError) as exc:
        raise _key_error(exc) from None
    changed = info.min_release != before
    if changed:
        audit.append_audit(actor, "revoke", release_ref(name, version), {"min_release": info.min_release})
    else:
        event(log, "revoke_unchanged", release=release_ref(name, version), min_release=info.min_release)
    return info, changed


def _key_error(exc: OSError) -> FleetError:
    return FleetError("key_missing", str(exc), f"restore the key file from your backup. {_UNCHANGED}")
