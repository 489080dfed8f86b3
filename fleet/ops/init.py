"""Creating a fleet home (`fleet init`): the database, the signing keys and the TUF repository of releases, and where
each key belongs.

Safe to run again: only what is missing is made; existing keys and repository are kept (never replaced, since
devices trust that root) and an older database schema is migrated. Nothing here writes an audit entry: a new home
has no log to chain to before its database exists, and a second run changes no key.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from tuf.api.metadata import Metadata, Root

from fleet.errors import FleetError
from fleet.home import init_home
from fleet.store import SCHEMA_VERSION, open_store
from fleet.store.api import RepoCommits
from fleet.trust.repository import Repository

#: Which keys may stay on the serving machine. Root signs only root rotations. Targets would ideally be offline too,
#: but releases are published and targets metadata renewed on this machine, so it stays; snapshot, timestamp and
#: director sign continuously while the fleet runs.
KEY_PLACEMENT = {
    "root": "offline: move to offline storage; only root rotation needs them",
    "targets": "online: `fleet release` signs releases with it, `fleet serve` re-signs targets before they expire",
    "snapshot": "online: `fleet serve` renews snapshot metadata",
    "timestamp": "online: `fleet serve` renews timestamp metadata",
    "director": "online: `fleet assign` signs desired state",
}
_FEWER_SIGNATURES = "ask for at most as many root signatures as there are root keys"


@dataclass(frozen=True)
class RoleKeys:
    """One signing role's key files and where they belong (online on this machine, or offline)."""

    role: str
    files: tuple[Path, ...]
    placement: str


@dataclass(frozen=True)
class InitResult:
    """What `fleet init` found and made. ``created`` lists the paths made by this call (empty if it was up to date);
    ``root_threshold`` and ``root_keys`` are the root policy devices trust (the existing one if it was kept)."""

    home: Path
    db: Path
    schema_version: int
    created: tuple[Path, ...]
    repository: Path
    repository_created: bool
    root_threshold: int
    root_keys: int
    keys: tuple[RoleKeys, ...]


def init_fleet(home: Path, *, root_threshold: int | None = None, root_keys: int | None = None) -> InitResult:
    """Create what the fleet home ``home`` lacks: folders, database, keys and repository.

    ``root_threshold`` and ``root_keys`` (1 each unless given) shape a new repository's root. Given for a home whose
    repository exists with another root policy, they are refused (init never rotates root keys); left None, the
    existing policy is kept whatever it is.
    """
    threshold, keys = root_threshold or 1, root_keys or 1
    if threshold > keys:
        raise FleetError(
            "bad_root_policy",
            f"a root threshold of {threshold} is more than the {keys} root keys",
            _FEWER_SIGNATURES,
        )
    made = init_home(home)
    with contextlib.closing(open_store(made.db)) as store:
        created = ensure_repository(made.root, threshold, keys, ledger=store)
    policy = root_policy(made.root)
    given = root_threshold is not None or root_keys is not None
    if not created and policy != (threshold, keys) and given:
        raise FleetError(
            "root_policy_differs",
            f"the repository exists with {policy[1]} root keys and threshold {policy[0]}; init does not rotate root "
            "keys",
            "drop --root-threshold/--root-keys to keep them",
        )
    return InitResult(
        home=made.root,
        db=made.db,
        schema_version=SCHEMA_VERSION,
        created=(*made.created, *((made.root / "keys", made.root / "repo") if created else ())),
        repository=made.root / "repo",
        repository_created=created,
        root_threshold=policy[0],
        root_keys=policy[1],
        keys=key_placement(made.root),
    )


def ensure_repository(
    home: Path, root_threshold: int = 1, root_keys: int = 1, *, ledger: RepoCommits | None = None
) -> bool:
    """Create the keys and TUF repository unless they exist; True if they were made now (and recorded in ``ledger``,
    the fleet's store, as its last change to the repository: a record of one it replaces no longer applies).

    An existing repository is kept as it is: init never replaces keys devices already trust. Half a repository (keys
    without metadata, or the reverse) is refused, with what to restore.
    """
    repo_dir, keys_dir = home / "repo", home / "keys"
    has_repo = (repo_dir / "metadata" / "root.json").exists()
    has_keys = keys_dir.is_dir() and any(keys_dir.iterdir())
    if has_repo and has_keys:
        return False
    if has_repo or has_keys:
        there, missing = (repo_dir, keys_dir) if has_repo else (keys_dir, repo_dir)
        raise FleetError(
            "home_incomplete",
            f"{there} exists but {missing} does not",
            f"restore {missing} from your backup, or move {there} away and run `fleet init` again (devices enrolled "
            "with the old root must then be enrolled again)",
        )
    try:
        Repository.init(home, root_threshold=root_threshold, root_keys=root_keys, ledger=ledger)
    except FleetError:
        raise
    except ValueError as exc:  # the root policy Repository.init refuses
        raise FleetError("bad_root_policy", str(exc), _FEWER_SIGNATURES) from None
    return True


def root_policy(home: Path) -> tuple[int, int]:
    """The (threshold, key count) of the root role devices trust."""
    root = Metadata[Root].from_bytes((home / "repo" / "metadata" / "root.json").read_bytes()).signed
    return root.roles["root"].threshold, len(root.roles["root"].keyids)


def key_placement(home: Path) -> tuple[RoleKeys, ...]:
    """Each role's key files (``<role>-<n>.pem``, as :class:`fleet.trust.keys.KeyStore` names them) and placement."""
    return tuple(
        RoleKeys(role, tuple(sorted((home / "keys").glob(f"{role}-*.pem"))), placement)
        for role, placement in KEY_PLACEMENT.items()
    )
