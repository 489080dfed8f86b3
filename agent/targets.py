"""Release target paths and model file kinds: the names the fleet publishes under and the device checks.

A release file is the TUF target ``models/<name>/<version>/<file>``; every component is checked against one pattern
before it becomes part of a path on either side, so a name from the network never becomes a file path unchecked.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

#: One path component of a release: model name, version or file name. It never starts with a dot, so ".", ".." and
#: hidden files are impossible, and it never holds a separator.
_COMPONENT_RE = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]{0,127}")
#: Release target paths: ``models/<name>/<version>/<file>``.
TARGET_PREFIX = "models"


def safe_component(text: str) -> bool:
    """True if ``text`` can be a model name, version or file name: ``[A-Za-z0-9_.+-]``, not starting with a dot."""
    return bool(_COMPONENT_RE.fullmatch(text))


def target_path(name: str, version: str, filename: str) -> str:
    """The TUF target path of a release file; raises ``ValueError`` unless every component is safe."""
    for part in (name, version, filename):
        if not safe_component(part):
            raise ValueError(f"unsafe release path component {part!r}")
    return f"{TARGET_PREFIX}/{name}/{version}/{filename}"


def parse_target_path(path: str) -> tuple[str, str, str]:
    """Split ``models/<name>/<version>/<file>`` into its parts; raises ``ValueError`` for anything else."""
    parts = path.split("/")
    if len(parts) != 4 or parts[0] != TARGET_PREFIX or not all(safe_component(p) for p in parts[1:]):
        raise ValueError(f"not a release target path: {path[:300]!r}")
    return parts[1], parts[2], parts[3]


#: The runtime a release needs, by model file suffix. The fleet sets it at publish; the device names files by it.
RUNTIME_BY_SUFFIX: Mapping[str, str] = {".onnx": "onnxruntime", ".tflite": "tflite"}
SUFFIX_BY_RUNTIME: Mapping[str, str] = {runtime: suffix for suffix, runtime in RUNTIME_BY_SUFFIX.items()}
