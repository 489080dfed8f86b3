"""A release's file in the repository: checked before anything is written, then copied in under its target path,
hashed as it is copied (what is signed is what is stored), named by its sha256 as ngclient asks for with consistent
snapshots."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from agent.files import PUBLIC_FILE_MODE
from agent.targets import RUNTIME_BY_SUFFIX, parse_target_path, safe_component
from fleet.trust.releases import ReleaseError

_COPY_CHUNK = 1024 * 1024


def check_model_file(model_file: Path, max_bytes: int) -> tuple[str, int]:
    """The model file's runtime (by suffix) and size, or the :class:`ReleaseError` refusing it."""
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
    if size > max_bytes:
        raise ReleaseError("too_large", f"{size} bytes > {max_bytes}")
    return runtime, size


def store_target(
    targets_dir: Path, model_file: Path, path: str, size: int, progress: Callable[[int], None] | None = None
) -> tuple[Path, str, list[Path]]:
    """Copy the model in, hashing the bytes as they are copied (what is signed is what is stored).

    Returns the stored file, its sha256 and the folders created for it (to remove on failure).
    """
    name, version, filename = parse_target_path(path)
    folder = targets_dir / "models" / name / version
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
