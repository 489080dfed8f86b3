"""The wire contract between devices and the fleet: topics, payload schemas, limits.

Defined once, here, and imported by the fleet manager and the simulator: the device is the contract's weakest
party, so the contract lives with it. Parsing is strict: a payload is accepted only if it is within the size cap,
is JSON (telemetry may be zlib-compressed JSON), carries the schema version this code speaks, and every field has
the declared type and range. Anything else raises :class:`ProtocolError` with a short machine-readable reason.
"""

from __future__ import annotations

import enum
import functools
import json
import re
import zlib
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal, get_args

import msgspec
from msgspec import UNSET, Meta, UnsetType

from agent.errors import EdgefleetError

SCHEMA_VERSION = 1
DEFAULT_PREFIX = "edgefleet/v1"

#: Largest payload accepted on any topic, on the wire and after decompression.
MAX_PAYLOAD_BYTES = 64 * 1024

DEVICE_ID_PATTERN = r"[A-Za-z0-9_.-]{1,64}"
_DEVICE_ID_RE = re.compile(DEVICE_ID_PATTERN)
_BOOT_ID_RE = re.compile(r"[0-9a-f]{32}")

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
    ACK = "ack"


#: Topics a device publishes on; the fleet subscribes to these.
DEVICE_PUBLISHED = (Kind.STATUS, Kind.TELEMETRY, Kind.EVENTS)
#: Topics the fleet publishes on; a device subscribes to its own.
FLEET_PUBLISHED = (Kind.DESIRED, Kind.CMD, Kind.ACK)
#: Most seq ranges one acknowledgement carries (an ingest batch holds at most a few hundred messages).
MAX_ACK_RANGES = 4096


class ProtocolError(EdgefleetError, ValueError):
    """A payload or topic that breaks the contract. ``reason`` is short and stable (used as a counter key).

    Also a ValueError: callers that parse input catch ValueError for every kind of malformed value.
    """


def valid_device_id(device_id: str) -> bool:
    return bool(_DEVICE_ID_RE.fullmatch(device_id))


def topic(prefix: str, device_id: str, kind: Kind) -> str:
    if not valid_device_id(device_id):
        raise ProtocolError("bad_device_id", repr(device_id))
    return f"{prefix}/{device_id}/{kind.value}"


def subscription(prefix: str, kind: Kind) -> str:
    """The wildcard filter for one kind of topic across all devices."""
    return f"{prefix}/+/{kind.value}"


@functools.lru_cache(maxsize=1 << 16)  # a fleet's topics repeat: a hit costs 0.1 µs where parsing costs 1.5
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
# The schemas, as msgspec Structs: msgspec parses and checks a payload in one pass in C, so a window costs a few µs.
# Every constraint lives in the type (``Meta`` bounds, patterns, lengths) or in ``__post_init__`` (cross-field rules),
# and both the decoder and :func:`validate` run the same ones.

Count = Annotated[int, Meta(ge=0, lt=2**53)]
#: Unix seconds. A JSON integer is accepted and becomes a float.
Timestamp = Annotated[float, Meta(ge=0, lt=2**34)]
# msgspec matches patterns with re.search, so they are anchored; \Z, unlike $, refuses a trailing newline.
DeviceId = Annotated[str, Meta(pattern=rf"\A{DEVICE_ID_PATTERN}\Z")]
BootId = Annotated[str, Meta(pattern=r"\A[0-9a-f]{32}\Z")]
Name = Annotated[str, Meta(pattern=r"\A[A-Za-z0-9_.:+-]{1,128}\Z")]
SchemaVersion = Annotated[int, Meta(ge=SCHEMA_VERSION, le=SCHEMA_VERSION)]

StatusState = Literal["online", "offline"]
STATUS_STATES: tuple[str, ...] = get_args(StatusState)


class _Schema(msgspec.Struct, forbid_unknown_fields=True):
    """Unknown fields are refused, so a typo never passes silently. Optional fields default to UNSET, which keeps
    them absent (not null) in the decoded dict; subclasses are ``kw_only`` so fields keep the wire's order."""


class Health(_Schema, kw_only=True):
    """Device health; a reading the device cannot take is left out."""

    cpu_percent: Annotated[float, Meta(ge=0, le=100_000)] | UnsetType = UNSET
    rss_bytes: Count | UnsetType = UNSET
    disk_free_bytes: Count | UnsetType = UNSET
    temperature_c: Annotated[float, Meta(ge=-100, le=200)] | UnsetType | None = UNSET
    load1: Annotated[float, Meta(ge=0)] | UnsetType = UNSET


class Window(_Schema, kw_only=True):
    """One model's telemetry window."""

    v: SchemaVersion
    device_id: DeviceId
    boot_id: BootId
    seq: Count
    model: Name
    #: 'name:version', or empty before a release is installed.
    release: Annotated[str, Meta(max_length=128)]
    window_start: Timestamp
    window_end: Timestamp
    count: Count
    errors: Count
    dropped: Count
    latency: Annotated[list[Count], Meta(min_length=len(LATENCY_EDGES_MS) + 1, max_length=len(LATENCY_EDGES_MS) + 1)]
    confidence: Annotated[list[Count], Meta(min_length=CONFIDENCE_BINS, max_length=CONFIDENCE_BINS)]
    classes: Annotated[list[Count], Meta(max_length=1024)]
    features: Annotated[list[Annotated[list[Count], Meta(max_length=256 + FEATURE_EXTRA_BINS)]], Meta(max_length=4096)]
    #: Confusion counts, true label x predicted label.
    feedback: Annotated[list[Annotated[list[Count], Meta(max_length=1024)]], Meta(max_length=1024)] | UnsetType = UNSET
    health: Health

    def __post_init__(self) -> None:
        if self.window_end < self.window_start:
            raise ValueError("window_end before window_start")
        if self.errors > self.count:
            raise ValueError("errors exceed count")
        _check_rows("features", self.features)
        if self.feedback is not UNSET:
            _check_rows("feedback", self.feedback)


class Event(_Schema, kw_only=True):
    """A state change on the device (start, stop, install steps and outcomes); ``detail`` depends on the type."""

    v: SchemaVersion
    device_id: DeviceId
    boot_id: BootId
    seq: Count
    ts: Timestamp
    type: Name
    model: Name | UnsetType = UNSET
    detail: dict[str, Any]


class Status(_Schema, kw_only=True):
    """A birth (online), or a last will or goodbye (offline, with a reason)."""

    v: SchemaVersion
    device_id: DeviceId
    state: StatusState
    boot_id: BootId
    ts: Timestamp | UnsetType = UNSET
    reason: Annotated[str, Meta(max_length=64)] | UnsetType = UNSET
    agent_version: Annotated[str, Meta(max_length=64)] | UnsetType = UNSET
    hardware: dict[str, Any] | UnsetType = UNSET
    runtimes: list[Name] | UnsetType = UNSET
    #: Keyed by model name.
    models: dict[str, Any] | UnsetType = UNSET


class Ack(_Schema, kw_only=True):
    """The fleet's word that it stored these messages of one boot of the device (windows and events; a duplicate is
    stored too). ``seqs`` are inclusive ``[first, last]`` ranges of outbox seqs.

    A seq never repeats within one outbox, across boots too; ``boot_id`` is there for a device whose outbox was
    replaced (a wiped state folder, a re-flashed card): its seqs start again, and an acknowledgement still queued for
    it in the broker names a boot that none of its messages carry, so it deletes nothing.
    """

    v: SchemaVersion
    device_id: DeviceId
    boot_id: BootId
    seqs: Annotated[list[tuple[Count, Count]], Meta(min_length=1, max_length=MAX_ACK_RANGES)]

    def __post_init__(self) -> None:
        if any(first > last for first, last in self.seqs):
            raise ValueError("seqs: a range whose first seq is above its last")


def seq_ranges(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """Seqs as sorted, merged, inclusive (first, last) ranges: [3, 1, 2, 7] -> [(1, 3), (7, 7)]."""
    if isinstance(seqs, list) and len(seqs) == 1:  # the common case: one window since the last acknowledgement
        return [(seqs[0], seqs[0])]
    ranges: list[tuple[int, int]] = []
    for seq in sorted(set(seqs)):
        if ranges and seq == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], seq)
        else:
            ranges.append((seq, seq))
    return ranges


def encode_ack(device_id: str, boot_id: str, seqs: Iterable[int]) -> list[bytes]:
    """The acknowledgement payloads for some seqs of one boot of a device: one, more only past ``MAX_ACK_RANGES``.

    Built from values the fleet decoded from the device's own messages, on its hot path, so it is formatted directly
    and skips :func:`validate` (tests check that the result decodes); ids are still checked, cheaply.
    """
    if not (valid_device_id(device_id) and _BOOT_ID_RE.fullmatch(boot_id)):
        raise ProtocolError("bad_field", f"device {device_id!r}, boot {boot_id!r}")
    ranges = seq_ranges(seqs)
    head = f'{{"v":{SCHEMA_VERSION},"device_id":"{device_id}","boot_id":"{boot_id}","seqs":['
    return [
        (head + ",".join(f"[{first},{last}]" for first, last in ranges[i : i + MAX_ACK_RANGES]) + "]}").encode()
        for i in range(0, len(ranges), MAX_ACK_RANGES)
    ]


def _check_rows(name: str, rows: list[list[int]]) -> None:
    """Rows of one width: a type cannot relate its elements to each other."""
    if len(set(map(len, rows))) > 1:
        raise ValueError(f"{name}: rows of unequal width")


SCHEMAS: Mapping[Kind, type[_Schema]] = {
    Kind.STATUS: Status,
    Kind.TELEMETRY: Window,
    Kind.EVENTS: Event,
    Kind.ACK: Ack,
}
_DECODERS = {kind: msgspec.json.Decoder(schema) for kind, schema in SCHEMAS.items()}


def _shape(schema: type[_Schema]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A schema's optional fields (left out of the dict when absent) and its fields that are schemas themselves."""
    fields = msgspec.structs.fields(schema)
    optional = tuple(f.name for f in fields if f.default is UNSET)
    nested = tuple(f.name for f in fields if isinstance(f.type, type) and issubclass(f.type, _Schema))
    return optional, nested


_SHAPES = {schema: _shape(schema) for schema in (Health, *SCHEMAS.values())}


def _as_dict(message: _Schema) -> dict[str, Any]:
    """A decoded message as builtins. Its lists and dicts are builtins already, so this is shallow: 0.4 µs for a
    window, where msgspec.to_builtins takes 3 µs copying every list."""
    optional, nested = _SHAPES[type(message)]
    out = msgspec.structs.asdict(message)
    for name in optional:
        if out[name] is UNSET:
            del out[name]
    for name in nested:
        out[name] = _as_dict(out[name])
    return out


def _check_envelope(message: Any) -> None:
    """The reasons that come before the schema's own: a newer device's message is ``schema_version`` whatever else
    is wrong with it."""
    if not isinstance(message, dict):
        raise ProtocolError("not_object")
    version = message.get("v")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise ProtocolError("schema_version", repr(version))


_ERROR_AT = re.compile(r"(.*) - at (`key` in )?`\$\.?([^`]*)`", re.DOTALL)
_FIELD_ERROR = re.compile(r"Object (missing required|contains unknown) field `(.*)`", re.DOTALL)


def _schema_error(exc: msgspec.ValidationError) -> ProtocolError:
    """Map msgspec's message ("Expected `int` >= 0 - at `$.health.rss_bytes`") to a reason and a detail that names
    the field path and what was expected."""
    what, path = str(exc), ""
    at = _ERROR_AT.fullmatch(what)
    if at:
        what, path = at[1], at[3] + (" (a key)" if at[2] else "")
    field = _FIELD_ERROR.fullmatch(what)
    if field:
        reason = "missing_field" if field[1] == "missing required" else "unknown_field"
        return ProtocolError(reason, f"{path}.{field[2]}" if path else field[2])
    return ProtocolError("bad_field", f"{path}: {what}" if path else what)


def validate(kind: Kind, message: Any) -> dict[str, Any]:
    """Check a message already in Python form against its schema; returns it unchanged."""
    schema = SCHEMAS.get(kind)
    if schema is None:
        raise ProtocolError("no_schema", kind.value)
    _check_envelope(message)
    try:
        msgspec.convert(message, schema)
    except msgspec.ValidationError as exc:
        raise _schema_error(exc) from None
    return message


def encode(kind: Kind, message: dict[str, Any]) -> bytes:
    """Serialize a message. Telemetry is zlib-compressed: its histograms are mostly zeros and shrink tenfold."""
    validate(kind, message)
    try:
        raw = json.dumps(message, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()
    except UnicodeEncodeError:  # before ValueError, its base class
        raise ProtocolError("bad_field", "lone UTF-16 surrogate in a string") from None
    except ValueError as exc:  # NaN or infinity inside a free-form object
        raise ProtocolError("bad_field", str(exc)) from None
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
    """Parse and validate one payload from the wire. Size is checked before anything is parsed.

    msgspec refuses lone UTF-16 surrogates, NaN and Infinity tokens, numbers a float cannot hold and nesting past the
    recursion limit while it parses, so a message that passes holds nothing SQLite or a JSON encoder would choke on.
    """
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ProtocolError("oversized", f"{len(payload)} bytes")
    if not payload:
        raise ProtocolError("empty")
    decoder = _DECODERS.get(kind)
    if decoder is None:
        raise ProtocolError("no_schema", kind.value)
    raw = _inflate(payload) if payload[0] == _ZLIB_MAGIC else payload
    try:
        message = decoder.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise _refusal(raw, exc) from None
    return _as_dict(message)


def _refusal(raw: bytes, exc: Exception) -> ProtocolError:
    """Why msgspec refused a payload, with the reasons in their order of precedence. Only failures come here, so
    the payload is read again with the standard library: msgspec stops at the first fault, wherever it is."""
    try:
        message = json.loads(raw, parse_constant=_reject_constant)
    except ProtocolError as error:
        return error
    except (ValueError, RecursionError) as error:  # ValueError: JSON, UTF-8, and the int digit limit
        return ProtocolError("not_json", str(error)[:120])
    if _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(message, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            return ProtocolError("not_json", "lone UTF-16 surrogate in a string")
        except RecursionError:
            return ProtocolError("not_json", "nested too deep")
    if not isinstance(exc, msgspec.ValidationError):  # JSON to the standard library only (a BOM, UTF-16, ...)
        return ProtocolError("not_json", str(exc)[:120])
    try:
        _check_envelope(message)
    except ProtocolError as error:
        return error
    return _schema_error(exc)


def offline_status(device_id: str, boot_id: str, reason: str) -> dict[str, Any]:
    """The status a device leaves behind: its last will, or its goodbye on a clean shutdown."""
    return {"v": SCHEMA_VERSION, "device_id": device_id, "state": "offline", "boot_id": boot_id, "reason": reason}
