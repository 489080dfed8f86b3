"""The fleet home folder: where the fleet manager keeps its database, broker state and (later) keys and repository.

One folder holds all of a fleet's state, so backing up, moving or wiping a fleet is one directory operation. It holds
signing keys later, hence owner-only permissions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fleet.store.sqlite import Store

HOME_ENV = "EDGEFLEET_HOME"
DEFAULT_HOME = Path("~/.edgefleet")

_DIR_MODE = 0o700
_FILE_MODE = 0o600


@dataclass(frozen=True)
class Home:
    """Paths inside one fleet home. ``created`` lists what the call that returned this made (empty if nothing)."""

    root: Path
    created: tuple[Path, ...] = ()

    @property
    def db(self) -> Path:
        return self.root / "fleet.db"

    @property
    def broker_dir(self) -> Path:
        return self.root / "broker"


def resolve_home(home: str | Path | None = None) -> Path:
    """``--home`` if given, else ``$EDGEFLEET_HOME``, else ``~/.edgefleet``."""
    chosen = home if home is not None else os.environ.get(HOME_ENV) or DEFAULT_HOME
    return Path(chosen).expanduser().absolute()


def _make_dir(path: Path, created: list[Path]) -> None:
    if not path.is_dir():
        path.mkdir(parents=True, mode=_DIR_MODE)
        created.append(path)
    path.chmod(_DIR_MODE)


def init_home(path: str | Path) -> Home:
    """Create the home, its folders and an up-to-date database. Safe to run again: it only adds what is missing."""
    root = Path(path).expanduser().absolute()
    created: list[Path] = []
    _make_dir(root, created)
    _make_dir(root / "broker", created)
    home = Home(root)
    if not home.db.exists():
        # An empty file is a valid empty database; creating it here gets the mode right from the first instant.
        os.close(os.open(home.db, os.O_CREAT | os.O_WRONLY, _FILE_MODE))
        created.append(home.db)
    home.db.chmod(_FILE_MODE)
    Store(home.db).close()  # creates or migrates the schema
    return Home(root, tuple(created))
