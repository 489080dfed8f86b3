"""The fleet home folder: where the fleet manager keeps its database, broker state and (later) keys and repository.

One folder holds all of a fleet's state, so backing up, moving or wiping a fleet is one directory operation. It holds
signing keys later, hence owner-only permissions.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.files import write_atomic
from agent.pids import pid_alive
from fleet.errors import FleetError
from fleet.store import open_store

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

    @property
    def addresses(self) -> Path:
        return addresses_file(self.root)


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
    """Create the home, its folders and an up-to-date database. Safe to run again: it only adds what is missing.

    Raises :class:`FleetError` (``home_unusable``) if the folder cannot be made or written, and the store's
    ``StoreUnavailable`` if the database cannot be opened.
    """
    root = Path(path).expanduser().absolute()
    created: list[Path] = []
    home = Home(root)
    try:
        _make_dir(root, created)
        _make_dir(root / "broker", created)
        if not home.db.exists():
            # An empty file is a valid empty database; creating it here gets the mode right from the first instant.
            os.close(os.open(home.db, os.O_CREAT | os.O_WRONLY, _FILE_MODE))
            created.append(home.db)
        home.db.chmod(_FILE_MODE)
    except OSError as exc:
        raise FleetError(
            "home_unusable",
            f"cannot make the fleet home {root}: {exc.strerror or exc} ({exc.filename or root})",
            "choose another --home, or run as the user who owns it",
        ) from None
    open_store(home.db).close()  # creates or migrates the schema
    return Home(root, tuple(created))


# What `fleet serve` leaves in the home while it runs: where it can be reached, so other commands need no flags.


def serve_file(home: Path) -> Path:
    return home / "serve.json"


def running_serve(home: Path | None) -> dict[str, Any] | None:
    """What the `fleet serve` running on this home recorded (broker, repo, prefix, pid), or None if none runs."""
    path = serve_file(resolve_home(home))
    try:
        info: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info.get("pid"), int) and pid_alive(info["pid"]) else None


@contextlib.contextmanager
def serve_record(home: Path, info: dict[str, Any]) -> Iterator[None]:
    """Write serve.json (owner-only, atomically) for as long as the block runs."""
    path = serve_file(home)
    write_atomic(path, json.dumps(info, indent=1).encode(), mode=0o600, durable=False)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


# The ports `fleet serve` chose, kept across its restarts so that enrolled devices find the broker and the repository
# where they were.


def addresses_file(home: Path) -> Path:
    return home / "addresses.json"


def remembered_ports(home: Path) -> dict[str, int]:
    """The ports the last `fleet serve` on this home used (``broker``, ``repo``); empty if none is remembered.

    A file that cannot be read or holds something else counts as none: the ports are then chosen afresh."""
    try:
        found = json.loads(addresses_file(home).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(found, dict):
        return {}
    return {k: v for k, v in found.items() if k in ("broker", "repo") and isinstance(v, int) and 0 < v < 65536}


def remember_ports(home: Path, **ports: int | None) -> None:
    """Record the ports in use (``broker=``, ``repo=``; None leaves a port's record as it is), if they changed."""
    known = remembered_ports(home)
    updated = {**known, **{k: v for k, v in ports.items() if v is not None}}
    if updated != known:
        write_atomic(addresses_file(home), json.dumps(updated, indent=1).encode(), mode=_FILE_MODE)
