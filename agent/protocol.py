"""The wire contract between devices and the fleet: topics, payload schemas, limits.

Defined once, here, and imported by the fleet manager and the simulator: the device is the contract's weakest
party, so the contract lives with it. Parsing is strict: a payload is accepted only if it is within the size cap,
is JSON (telemetry may be zlib-compressed JSON), carries the schema version this code speaks, and every field has
the declared type and range. Anything else raises :class:`ProtocolError` with a short machine-readable reason.
"""

from __future__ import annotations

import enum
import json
import math
import re
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import chain
from typing import Any

SCHEMA_VERSION = 1
DEFAULT_PREFIX = "edgefleet/v1"

#: Largest payload accepted on any topic, on the wire and after decompression.
MAX_PAYLOAD_BYTES = 64 * 1024

DEVICE_ID_PATTERN = r"[A-Za-z0-9_.-]{1,64}"
_DEVICE_ID_RE = re.compile(DEVICE_ID_PATTERN)
_NAME_RE = re.compile(r"[A-Za-z0-9_.:+-]{1,128}")

#: Fixed latency buckets (upper edges, milliseconds). Counts merge exactly because every device uses these.
#: Bucket i counts latencies in (edge[i-1], edge[i]]; one extra overflow bucket follows the last edge.
LATENCY_EDGES_MS: tuple[float, ...] = tuple(round(0.05 * 2 ** (k / 2), 4) for k in range(32))
#: Top-1 confidence histogram: ten equal bins over [0, 1].
CONFIDENCE_BINS = 10
#: Extra per-feature bins beside the card's bins: underflow first; overflow and NaN are the last two columns, after
#: any zero padding that makes rows of features with fewer bins as wide as the widest.
FEATURE_EXTRA_BINS = 3

#: zlib's first byte for the default window size; JSON objects start with "{".
_ZLIB_MAGIC = 0x78


class Kind(enum.StrEnum):
    """The per-device topics. The value is the last topic level."""

    STATUS = "status"
    TELEMETRY = "telemetry"
    EVENTS = "events"
    DESIRED = "desired"
    CMD = "cmd"


#: Topics a device publishes on; the fleet subscribes to these.
DEVICE_PUBLISHED = (Kind.STATUS, Kind.TELEMETRY, Kind.EVENTS)


class ProtocolError(ValueError):
    """A payload or topic that breaks the contract. ``reason`` is short and stable (used as a counter key)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def valid_device_id(device_id: str) -> bool:
    return bool(_DEVICE_ID_RE.fullmatch(device_id))


def topic(prefix: str, device_id: str, kind: Kind) -> str:
    if not valid_device_id(device_id):
        raise ProtocolError("bad_device_id", repr(device_id))
    return f"{prefix}/{device_id}/{kind.value}"


def subscription(prefix: str, kind: Kind) -> str:
    """The wildcard filter for one kind of topic across all devices."""
    return f"{prefix}/+/{kind.value}"


def parse_topic(prefix: str, name: str) -> tuple[str, Kind]:
    """Split a topic into (device id, kind), rejecting anything outside the prefix or with a bad device id."""
    head, sep, rest = name.partition(prefix + "/")
    if head or not sep:
        raise ProtocolError("bad_topic", name)
    parts = rest.split("/")
    if len(parts) != 2:
        raise ProtocolError("bad_topic", name)
    device_id, last = parts
    if not valid_device_id(device_id):
        raise ProtocolError("bad_device_id", repr(device_id))
    try:
        return device_id, Kind(last)
    except ValueError:
        raise ProtocolError("bad_topic", name) from None


# --------------------------------------------------------------------------------------------------------------
# Field specifications: a tiny declarative schema, so each message's shape is written once and read at a glance.


@dataclass(frozen=True)
class Field:
    check: Callable[[Any], bool]
    expected: str
    required: bool = True


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _count(v: Any) -> bool:
    return _is_int(v) and 0 <= v < 2**53


def _number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _timestamp(v: Any) -> bool:
    return _number(v) and 0 <= v < 2**34


def _text(max_len: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and len(v) <= max_len and _utf8(v)


def _utf8(v: str) -> bool:
    """JSON escapes can smuggle in lone surrogates, which no UTF-8 store (SQLite, a terminal) accepts."""
    try:
        v.encode()
    except UnicodeEncodeError:
        return False
    return True


def _name(v: Any) -> bool:
    return isinstance(v, str) and bool(_NAME_RE.fullmatch(v))


_INT_ONLY = frozenset({int})
_LIST_ONLY = frozenset({list})


def _counts(min_len: int, max_len: int) -> Callable[[Any], bool]:
    """A list of counts, checked at C speed (set of element types, min, max): windows carry hundreds of them."""

    def check(v: Any) -> bool:
        return (
            type(v) is list
            and min_len <= len(v) <= max_len
            and (not v or (set(map(type, v)) <= _INT_ONLY and min(v) >= 0 and max(v) < 2**53))
        )

    return check


def _matrix(max_rows: int, max_cols: int) -> Callable[[Any], bool]:
    """Rows of counts, all of one width."""

    def check(v: Any) -> bool:
        if type(v) is not list or len(v) > max_rows:
            return False
        if not v:
            return True
        if not set(map(type, v)) <= _LIST_ONLY or len(set(map(len, v))) != 1 or len(v[0]) > max_cols:
            return False
        flat = list(chain.from_iterable(v))
        return not flat or (set(map(type, flat)) <= _INT_ONLY and min(flat) >= 0 and max(flat) < 2**53)

    return check


def _obj(v: Any) -> bool:
    return isinstance(v, dict)


def _opt(f: Field) -> Field:
    return Field(f.check, f.expected, required=False)


_DEVICE_ID = Field(lambda v: isinstance(v, str) and valid_device_id(v), "device id [A-Za-z0-9_.-]{1,64}")
_BOOT_ID = Field(lambda v: isinstance(v, str) and bool(re.fullmatch(r"[0-9a-f]{32}", v)), "32 hex chars")
_SEQ = Field(_count, "integer >= 0")
_TS = Field(_timestamp, "unix time in seconds")
_COUNT = Field(_count, "integer >= 0")

HEALTH_FIELDS: Mapping[str, Field] = {
    "cpu_percent": _opt(Field(lambda v: _number(v) and 0 <= v <= 100_000, "number 0..100000")),
    "rss_bytes": _opt(_COUNT),
    "disk_free_bytes": _opt(_COUNT),
    "temperature_c": _opt(Field(lambda v: v is None or (_number(v) and -100 <= v <= 200), "number or null")),
    "load1": _opt(Field(lambda v: _number(v) and v >= 0, "number >= 0")),
}

TELEMETRY_FIELDS: Mapping[str, Field] = {
    "v": Field(lambda v: _is_int(v) and v == SCHEMA_VERSION, f"schema version {SCHEMA_VERSION}"),
    "device_id": _DEVICE_ID,
    "boot_id": _BOOT_ID,
    "seq": _SEQ,
    "model": Field(_name, "model name"),
    "release": Field(_text(128), "release 'name:version' or empty"),
    "window_start": _TS,
    "window_end": _TS,
    "count": _COUNT,
    "errors": _COUNT,
    "dropped": _COUNT,
    "latency": Field(_counts(len(LATENCY_EDGES_MS) + 1, len(LATENCY_EDGES_MS) + 1), "latency bucket counts"),
    "confidence": Field(_counts(CONFIDENCE_BINS, CONFIDENCE_BINS), "confidence bin counts"),
    "classes": Field(_counts(0, 1024), "predicted-class counts"),
    "features": Field(_matrix(4096, 256 + FEATURE_EXTRA_BINS), "feature histogram rows of equal width"),
    "feedback": _opt(Field(_matrix(1024, 1024), "confusion matrix rows (true x predicted)")),
    "health": Field(_obj, "object"),
}

EVENT_FIELDS: Mapping[str, Field] = {
    "v": TELEMETRY_FIELDS["v"],
    "device_id": _DEVICE_ID,
    "boot_id": _BOOT_ID,
    "seq": _SEQ,
    "ts": _TS,
    "type": Field(_name, "event type"),
    "model": _opt(Field(_name, "model name")),
    "detail": Field(_obj, "object"),
}

STATUS_STATES = ("online", "offline")

STATUS_FIELDS: Mapping[str, Field] = {
    "v": TELEMETRY_FIELDS["v"],
    "device_id": _DEVICE_ID,
    "state": Field(lambda v: v in STATUS_STATES, " or ".join(STATUS_STATES)),
    "boot_id": _BOOT_ID,
    "ts": _opt(_TS),
    "reason": _opt(Field(_text(64), "short text")),
    "agent_version": _opt(Field(_text(64), "version text")),
    "hardware": _opt(Field(_obj, "object")),
    "runtimes": _opt(Field(lambda v: isinstance(v, list) and all(_name(x) for x in v), "list of names")),
    "models": _opt(Field(_obj, "object keyed by model name")),
}

SCHEMAS: Mapping[Kind, Mapping[str, Field]] = {
    Kind.STATUS: STATUS_FIELDS,
    Kind.TELEMETRY: TELEMETRY_FIELDS,
    Kind.EVENTS: EVENT_FIELDS,
}


def validate(kind: Kind, message: Any) -> dict[str, Any]:
    """Check a decoded message against its schema; unknown fields are rejected so typos never pass silently."""
    schema = SCHEMAS.get(kind)
    if schema is None:
        raise ProtocolError("no_schema", kind.value)
    if not isinstance(message, dict):
        raise ProtocolError("not_object")
    if not _is_int(message.get("v")) or message["v"] != SCHEMA_VERSION:
        raise ProtocolError("schema_version", repr(message.get("v")))
    for key in message:
        if key not in schema:
            raise ProtocolError("unknown_field", key)
    for key, spec in schema.items():
        if key not in message:
            if spec.required:
                raise ProtocolError("missing_field", key)
            continue
        if not spec.check(message[key]):
            raise ProtocolError("bad_field", f"{key}: expected {spec.expected}")
    if kind is Kind.TELEMETRY:
        _check_window(message)
    return message


def _check_window(message: dict[str, Any]) -> None:
    if message["window_end"] < message["window_start"]:
        raise ProtocolError("bad_field", "window_end before window_start")
    if message["errors"] > message["count"]:
        raise ProtocolError("bad_field", "errors exceed count")
    health = message["health"]
    for key, value in health.items():
        spec = HEALTH_FIELDS.get(key)
        if spec is None:
            raise ProtocolError("unknown_field", f"health.{key}")
        if not spec.check(value):
            raise ProtocolError("bad_field", f"health.{key}: expected {spec.expected}")


def encode(kind: Kind, message: dict[str, Any]) -> bytes:
    """Serialize a message. Telemetry is zlib-compressed: its histograms are mostly zeros and shrink tenfold."""
    validate(kind, message)
    raw = json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
    data = zlib.compress(raw, 9) if kind is Kind.TELEMETRY else raw
    if len(data) > MAX_PAYLOAD_BYTES or len(raw) > MAX_PAYLOAD_BYTES:
        raise ProtocolError("oversized", f"{len(raw)} bytes")
    return data


def _inflate(data: bytes) -> bytes:
    """Decompress with a hard output bound, so a small payload cannot expand into a memory bomb."""
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(data, MAX_PAYLOAD_BYTES + 1)
    except zlib.error as exc:
        raise ProtocolError("bad_compression", str(exc)) from None
    if len(raw) > MAX_PAYLOAD_BYTES or inflater.unconsumed_tail:
        raise ProtocolError("oversized", "decompressed payload over the cap")
    if not inflater.eof or inflater.unused_data:
        raise ProtocolError("bad_compression", "truncated or trailing data")
    return raw


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _reject_constant(token: str) -> Any:
    raise ProtocolError("not_json", f"non-standard number {token}")


def decode(kind: Kind, payload: bytes) -> dict[str, Any]:
    """Parse and validate one payload from the wire. Size is checked before anything is parsed."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ProtocolError("oversized", f"{len(payload)} bytes")
    if not payload:
        raise ProtocolError("empty")
    raw = _inflate(payload) if payload[0] == _ZLIB_MAGIC else payload
    try:
        message = json.loads(raw, parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError("not_json", str(exc)[:120]) from None
    if _SURROGATE_ESCAPE.search(raw) and not _utf8(json.dumps(message, ensure_ascii=False)):
        raise ProtocolError("not_json", "lone UTF-16 surrogate in a string")
    return validate(kind, message)


def offline_status(device_id: str, boot_id: str, reason: str) -> dict[str, Any]:
    """The status a device leaves behind: its last will, or its goodbye on a clean shutdown."""
    return {"v": SCHEMA_VERSION, "device_id": device_id, "state": "offline", "boot_id": boot_id, "reason": reason}
