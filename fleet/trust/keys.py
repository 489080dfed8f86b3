"""The fleet's signing keys: Ed25519, one PEM file per key under ``<home>/keys/`` (folder 0700, files 0600).

Roles are TUF's plus the director:

- ``root`` (N keys, a threshold of them signs root metadata) is an *offline* role: it is needed only to create or
  rotate root, so after ``init`` its PEM files belong on offline storage. Nothing else here reads them.
- ``targets`` (release signing), ``snapshot`` and ``timestamp`` are online: publish, revoke and renewal use them.
- ``director`` is online and signs each device's desired state; it is not a TUF role (see ``agent.update.desired``).

Private key material never leaves this module except to sign: callers, summaries and logs see key ids and public
keys only.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, SSlibKey

ROLES = ("root", "targets", "snapshot", "timestamp", "director")
OFFLINE_ROLES = frozenset({"root"})

_DIR_MODE = 0o700
_FILE_MODE = 0o600
_KEY_FILE_RE = re.compile(r"(?P<role>[a-z]+)-(?P<index>[1-9][0-9]*)\.pem")


class KeyStore:
    """The key files of one fleet. Files are named ``<role>-<n>.pem``, n counting from 1."""

    def __init__(self, keys_dir: Path) -> None:
        self.dir = keys_dir

    def generate(self, role: str, count: int = 1) -> list[SSlibKey]:
        """Create ``count`` new keys for ``role`` and return their public keys; refuses if the role has keys."""
        _check_role(role)
        if count < 1:
            raise ValueError("count must be >= 1")
        if self._paths(role):
            raise FileExistsError(f"{role} already has keys in {self.dir}")
        self.dir.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
        self.dir.chmod(_DIR_MODE)
        public = []
        for index in range(1, count + 1):
            signer = CryptoSigner.generate_ed25519()
            _write_private(self.dir / f"{role}-{index}.pem", signer.private_bytes)
            public.append(signer.public_key)
        return public

    def signers(self, role: str) -> list[CryptoSigner]:
        """Load every key of ``role``. Refuses key files that group or others could read."""
        _check_role(role)
        paths = self._paths(role)
        if not paths:
            hint = " (root keys are offline: bring them back to rotate root)" if role in OFFLINE_ROLES else ""
            raise FileNotFoundError(f"no {role} keys in {self.dir}{hint}")
        return [_load_private(path) for path in paths]

    def signer(self, role: str) -> CryptoSigner:
        """The one key of a single-key role."""
        signers = self.signers(role)
        if len(signers) != 1:
            raise ValueError(f"{role} has {len(signers)} keys, expected one")
        return signers[0]

    def public_key_json(self, role: str) -> bytes:
        """A single-key role's public key as a TUF key object with its ``keyid``: how a device is enrolled with it."""
        key = self.signer(role).public_key
        return json.dumps({"keyid": key.keyid, **key.to_dict()}, sort_keys=True, indent=1).encode()

    def _paths(self, role: str) -> list[Path]:
        if not self.dir.is_dir():
            return []
        found = []
        for path in self.dir.iterdir():
            match = _KEY_FILE_RE.fullmatch(path.name)
            if match and match["role"] == role:
                found.append((int(match["index"]), path))
        return [path for _, path in sorted(found)]


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown key role {role!r}; roles are {', '.join(ROLES)}")


def _write_private(path: Path, pem: bytes) -> None:
    """Create the file owner-only from its first instant (O_EXCL: never over another key)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())


def _load_private(path: Path) -> CryptoSigner:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(f"{path} is readable by group or others (mode {mode:o}): chmod 600 it")
    return CryptoSigner(load_pem_private_key(path.read_bytes(), password=None))
