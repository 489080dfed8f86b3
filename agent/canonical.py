"""JSON for signed documents: one canonical encoding to sign and verify, one strict parser to read.

Stdlib only, so every part of the fleet (an ingest worker, the audit log) can use it without loading TUF.
"""

from __future__ import annotations

import json
import math
from typing import Any


def canonical_json(obj: Any) -> bytes:
    """The bytes the director signs and the device verifies: sorted keys, no spaces, ASCII only, no NaN.

    TUF's canonical JSON cannot encode floats (``issued``/``expires`` are floats), so this is plain ``json`` with
    every degree of freedom pinned. Python writes floats as their shortest round-trip repr, so parse-then-encode
    reproduces the signed bytes exactly.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")
    return obj


def _reject_constant(token: str) -> Any:
    raise ValueError(f"non-standard number {token}")


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):  # 1e999 parses to inf, which canonical_json cannot encode
        raise ValueError(f"number out of range {token[:40]}")
    return value


def strict_json(data: bytes | str) -> Any:
    """Parse JSON refusing duplicate keys and NaN/Infinity: two parsers must never read one document two ways.

    Raises ``ValueError`` for anything else (JSON and Unicode errors are ValueErrors; deep nesting is turned into one).
    """
    try:
        return json.loads(
            data, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant, parse_float=_finite_float
        )
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
