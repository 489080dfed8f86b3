"""Signed desired state: which release of each model this device should run, as the fleet's director says.

TUF (:mod:`agent.update.tuf_client`) says which releases *exist*; the director says which one *this device* runs. The
device acts only when both agree (Uptane's rule), so a stolen online director key alone can install nothing that was
not published, and a stolen release key alone can point no device at anything.

:func:`verify_desired` checks the director's half in a fixed order, nothing read before the step that makes it safe:

1. the size cap, before anything is parsed;
2. the envelope: strict JSON (no duplicate keys, no NaN), exactly ``signed`` and ``signatures``;
3. a signature by the director key over :func:`canonical_json` of ``signed``, before any field inside is looked at;
4. the fields (:func:`check_signed`): schema version, types, and per model a safe target path, release, sha256, length;
5. this device's context: its own id, a seq newer than the last one acted on, not expired, not issued in the future.

The fleet signs with the same :func:`canonical_json` and runs the same :func:`check_signed` before signing, so the
two sides cannot drift apart.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from securesystemslib.exceptions import UnverifiedSignatureError
from tuf.api.metadata import Key, Signature

from agent.canonical import canonical_json, strict_json
from agent.protocol import MAX_PAYLOAD_BYTES, SCHEMA_VERSION, ProtocolError, valid_device_id
from agent.targets import parse_target_path, safe_component

#: ``type`` inside ``signed``: a director signature over anything else is never read as a desired state.
DESIRED_TYPE = "desired"
#: How far in the future ``issued`` may be. A device whose clock is further behind must fix its clock first.
MAX_CLOCK_SKEW_S = 300.0
MAX_MODELS = 64
MAX_SIGNATURES = 8

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CAMPAIGN_RE = re.compile(r"[A-Za-z0-9_.:+-]{1,128}")
_MAX_INT = 2**53
_MAX_TIME = 2**34

_SIGNED_FIELDS = frozenset({"v", "type", "device_id", "seq", "issued", "expires", "campaign", "models"})
_MODEL_FIELDS = frozenset({"target", "release", "sha256", "length"})


class DesiredStateError(ProtocolError):
    """A desired state this device must not act on. ``reason`` is stable (a counter key), e.g. ``bad_signature``."""


def _parse(data: bytes) -> Any:
    try:
        return strict_json(data)
    except ValueError as exc:
        raise DesiredStateError("not_json", str(exc)[:120]) from None


def load_director_key(data: bytes) -> Key:
    """Read the director's public key as enrolled on the device: a TUF key object plus its ``keyid``."""
    obj = _parse(data)
    if not isinstance(obj, dict) or not isinstance(obj.get("keyid"), str):
        raise DesiredStateError("bad_key", "expected a TUF key object with a keyid")
    keyid = obj.pop("keyid")
    try:
        return Key.from_dict(keyid, obj)
    except (KeyError, TypeError, ValueError) as exc:
        raise DesiredStateError("bad_key", str(exc)[:120]) from None


@dataclass(frozen=True)
class DesiredModel:
    """The director's pick for one model: TUF must list exactly this target, hash and length."""

    name: str
    version: str
    target: str
    release: int
    sha256: str
    length: int


@dataclass(frozen=True)
class DesiredState:
    device_id: str
    seq: int
    issued: float
    expires: float
    campaign: str | None
    models: Mapping[str, DesiredModel]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_time(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v) and 0 <= v < _MAX_TIME


def _check_model(name: Any, entry: Any) -> DesiredModel:
    if not isinstance(name, str) or not safe_component(name):
        raise DesiredStateError("bad_field", f"model name {str(name)[:80]!r}")
    if not isinstance(entry, dict) or set(entry) != _MODEL_FIELDS:
        raise DesiredStateError("bad_field", f"models.{name}: expected exactly {sorted(_MODEL_FIELDS)}")
    target = entry["target"]
    try:
        if not isinstance(target, str):
            raise ValueError("target is not a string")
        path_name, version, _ = parse_target_path(target)
    except ValueError as exc:
        raise DesiredStateError("bad_target", f"models.{name}: {exc}") from None
    if path_name != name:
        raise DesiredStateError("bad_target", f"models.{name}: target is for model {path_name!r}")
    release, sha256, length = entry["release"], entry["sha256"], entry["length"]
    if not (_is_int(release) and 1 <= release < _MAX_INT):
        raise DesiredStateError("bad_field", f"models.{name}.release: expected integer >= 1")
    if not (isinstance(sha256, str) and _SHA256_RE.fullmatch(sha256)):
        raise DesiredStateError("bad_field", f"models.{name}.sha256: expected 64 lowercase hex chars")
    if not (_is_int(length) and 0 < length < _MAX_INT):
        raise DesiredStateError("bad_field", f"models.{name}.length: expected integer > 0")
    return DesiredModel(name, version, target, release, sha256, length)


def check_signed(signed: Any) -> DesiredState:
    """Check the shape of a desired state's ``signed`` part. Context-free: the fleet runs it before signing too."""
    if not isinstance(signed, dict):
        raise DesiredStateError("bad_envelope", "signed is not an object")
    if not (_is_int(signed.get("v")) and signed["v"] == SCHEMA_VERSION):
        raise DesiredStateError("schema_version", repr(signed.get("v"))[:40])
    if signed.get("type") != DESIRED_TYPE:
        raise DesiredStateError("bad_field", f"type: expected {DESIRED_TYPE!r}")
    for key in signed:
        if key not in _SIGNED_FIELDS:
            raise DesiredStateError("unknown_field", str(key)[:80])
    missing = _SIGNED_FIELDS - signed.keys()
    if missing:
        raise DesiredStateError("missing_field", ", ".join(sorted(missing)))
    device_id, seq, issued, expires = signed["device_id"], signed["seq"], signed["issued"], signed["expires"]
    campaign, models = signed["campaign"], signed["models"]
    if not (isinstance(device_id, str) and valid_device_id(device_id)):
        raise DesiredStateError("bad_field", "device_id")
    if not (_is_int(seq) and 0 <= seq < _MAX_INT):
        raise DesiredStateError("bad_field", "seq: expected integer >= 0")
    if not (_is_time(issued) and _is_time(expires) and expires > issued):
        raise DesiredStateError("bad_field", "issued/expires: expected unix times with expires > issued")
    if campaign is not None and not (isinstance(campaign, str) and _CAMPAIGN_RE.fullmatch(campaign)):
        raise DesiredStateError("bad_field", "campaign")
    if not isinstance(models, dict) or len(models) > MAX_MODELS:
        raise DesiredStateError("bad_field", f"models: expected an object of at most {MAX_MODELS} models")
    checked = {name: _check_model(name, entry) for name, entry in models.items()}
    return DesiredState(device_id, seq, issued, expires, campaign, MappingProxyType(checked))


def _verify_signature(signed: dict[str, Any], signatures: list[Any], key: Key) -> None:
    """Pass if any signature is the director key's and verifies; others are ignored (they allow key rotation)."""
    try:
        payload = canonical_json(signed)
    except (ValueError, RecursionError) as exc:
        raise DesiredStateError("bad_envelope", f"signed part cannot be canonicalized: {exc}"[:120]) from None
    for entry in signatures:
        if not (isinstance(entry, dict) and set(entry) == {"keyid", "sig"}):
            raise DesiredStateError("bad_envelope", "signature entries are {keyid, sig}")
        if entry["keyid"] != key.keyid or not isinstance(entry["sig"], str):
            continue
        try:
            key.verify_signature(Signature(key.keyid, entry["sig"]), payload)
        except UnverifiedSignatureError:
            continue
        return
    raise DesiredStateError("bad_signature", f"no valid signature by director key {key.keyid[:16]}")


def verify_desired(
    payload: bytes,
    director_public_key: Key,
    device_id: str,
    last_seq: int,
    now: float,
    max_bytes: int = MAX_PAYLOAD_BYTES,
    max_skew_s: float = MAX_CLOCK_SKEW_S,
) -> DesiredState:
    """Return the desired state in ``payload`` if this device may act on it; else raise :class:`DesiredStateError`.

    ``last_seq`` is the highest seq this device has acted on (-1 for none); ``now`` is the device clock.
    """
    if len(payload) > max_bytes:
        raise DesiredStateError("oversized", f"{len(payload)} bytes")
    envelope = _parse(payload)
    if not isinstance(envelope, dict) or set(envelope) != {"signed", "signatures"}:
        raise DesiredStateError("bad_envelope", "expected exactly {signed, signatures}")
    signed, signatures = envelope["signed"], envelope["signatures"]
    if not isinstance(signed, dict) or not isinstance(signatures, list) or not 0 < len(signatures) <= MAX_SIGNATURES:
        raise DesiredStateError("bad_envelope", f"signed object and 1..{MAX_SIGNATURES} signatures")
    _verify_signature(signed, signatures, director_public_key)
    state = check_signed(signed)
    if state.device_id != device_id:
        raise DesiredStateError("wrong_device", state.device_id)
    if state.seq <= last_seq:
        raise DesiredStateError("replayed_seq", f"seq {state.seq} <= last seen {last_seq}")
    if now >= state.expires:
        raise DesiredStateError("expired", f"expired {now - state.expires:.0f} s ago")
    if state.issued > now + max_skew_s:
        raise DesiredStateError("issued_in_future", f"issued {state.issued - now:.0f} s ahead of this clock")
    return state
