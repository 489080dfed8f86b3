"""Temporary folders for the devices' state that a killed run does not leak.

Each run's folder is named after its process id, under one parent per user in the temp folder
(``$TMPDIR/firmware-sim-<uid>/<pid>-<random>``). A run removes its own folder when it ends, and every start removes
the folders of runs whose process is gone (killed with SIGKILL, or by the OOM killer). A recycled pid only delays
the clean-up of a dead run's folder; a live run's folder is never removed.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.pids import pid_alive


def runs_parent() -> Path:
    return Path(tempfile.gettempdir()) / f"firmware-sim-{os.getuid()}"


def remove_dead_runs(parent: Path) -> list[Path]:
    """Remove the folders under ``parent`` of runs whose process has ended; return them."""
    removed = []
    for folder in parent.iterdir():
        pid = folder.name.partition("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


@contextmanager
def run_folder() -> Iterator[Path]:
    """A fresh folder for this run, removed when the block ends; folders of dead runs are removed first.

    Raises ``PermissionError`` when the parent exists but is not a folder of this user's (a shared temp folder
    where someone else made it first): it would not be safe to write device state there."""
    parent = runs_parent()
    parent.mkdir(mode=0o700, exist_ok=True)
    info = parent.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise PermissionError(f"{parent} is not a folder of yours: remove it, or pass --state-dir")
    remove_dead_runs(parent)
    folder = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
