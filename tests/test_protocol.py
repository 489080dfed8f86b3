"""The wire contract: what passes, and why everything else is refused."""

from __future__ import annotations

import json
import zlib
from typing import Any

import pytest

from agent import protocol
from agent.protocol import Kind, ProtocolError

BOOT = "0" * 32


def window(**changes: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "v": 1,
        "device_id": "pi-1",
        "boot_id": BOOT,
        "seq": 7,
        "model": "digits",
        "release": "digits:1.0.0",
        "window_start": 1_700_000_000.0,
        "window_end": 1_700_000_060.0,
        "count": 10,
        "errors": 1,
        "dropped": 0,
        "latency": [0] * (len(protocol.LATENCY_EDGES_MS) + 1),
        "confidence": [0] * protocol.CONFIDENCE_BINS,
        "classes": [1] * 10,
        "features": [[1, 2, 3, 0, 0]] * 64,
        "health": {"cpu_percent": 3.5, "rss_bytes": 1000, "temperature_c": None},
    }
    message.update(changes)
    return message


def test_topics_round_trip_and_foreign_topics_are_refused() -> None:
    name = protocol.topic("edgefleet/v1", "pi-1", Kind.TELEMETRY)
    assert name == "edgefleet/v1/pi-1/telemetry"
    assert protocol.parse_topic("edgefleet/v1", name) == ("pi-1", Kind.TELEMETRY)
    for bad in ["other/pi-1/telemetry", "edgefleet/v1/pi-1/telemetry/x", "edgefleet/v1/pi 1/status",
                "edgefleet/v1/pi-1/nope", "xedgefleet/v1/pi-1/status"]:  # fmt: skip
        with pytest.raises(ProtocolError):
            protocol.parse_topic("edgefleet/v1", bad)


def test_device_ids_are_restricted_to_a_safe_alphabet() -> None:
    assert protocol.valid_device_id("pi_01.kitchen-2")
    for bad in ["", "a/b", "a+b", "#", "../x", "é", "x" * 65]:
        assert not protocol.valid_device_id(bad)
    with pytest.raises(ProtocolError, match="bad_device_id"):
        protocol.topic("p", "a/b", Kind.STATUS)


def test_telemetry_is_compressed_on_the_wire_and_decodes_to_the_same_message() -> None:
    message = window()
    data = protocol.encode(Kind.TELEMETRY, message)
    assert data[0] == 0x78
    assert len(data) < len(json.dumps(message)) / 3
    assert protocol.decode(Kind.TELEMETRY, data) == message


def test_plain_json_telemetry_is_accepted_too() -> None:
    assert protocol.decode(Kind.TELEMETRY, json.dumps(window()).encode())["seq"] == 7


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty"),
        (b"\xff\xfe", "not_json"),
        (b"{not json", "not_json"),
        (b"[1, 2]", "not_object"),
        (json.dumps(window(v=2)).encode(), "schema_version"),
        (json.dumps(window(extra=1)).encode(), "unknown_field"),
        (json.dumps({k: v for k, v in window().items() if k != "count"}).encode(), "missing_field"),
        (json.dumps(window(count=-1)).encode(), "bad_field"),
        (json.dumps(window(count=True)).encode(), "bad_field"),
        (json.dumps(window(errors=11)).encode(), "bad_field"),
        (json.dumps(window(window_end=1.0)).encode(), "bad_field"),
        (json.dumps(window(features=[[1, 2], [1]])).encode(), "bad_field"),
        (json.dumps(window(health={"cpu_percent": "hot"})).encode(), "bad_field"),
        (json.dumps(window(health={"secret": 1})).encode(), "unknown_field"),
        (
            json.dumps(window()).replace('"count":10', '"count":NaN').replace('"count": 10', '"count": NaN').encode(),
            "not_json",
        ),
        (b"{" * 100_000, "oversized"),
        (zlib.compress(b"{" + b" " * (protocol.MAX_PAYLOAD_BYTES * 4) + b"}"), "oversized"),
        (zlib.compress(json.dumps(window()).encode())[:-5], "bad_compression"),
        (b"x\x9c garbage", "bad_compression"),
    ],
)
def test_malformed_telemetry_is_refused_with_a_stable_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.decode(Kind.TELEMETRY, payload)
    assert info.value.reason == reason


def test_a_zip_bomb_is_stopped_without_inflating_it() -> None:
    bomb = zlib.compress(b"0" * (50 * 2**20), 9)
    assert len(bomb) < protocol.MAX_PAYLOAD_BYTES
    with pytest.raises(ProtocolError, match="oversized"):
        protocol.decode(Kind.TELEMETRY, bomb)


def test_status_birth_and_last_will_validate() -> None:
    will = protocol.offline_status("pi-1", BOOT, "connection_lost")
    assert protocol.decode(Kind.STATUS, protocol.encode(Kind.STATUS, will)) == will
    birth = {"v": 1, "device_id": "pi-1", "state": "online", "boot_id": BOOT, "agent_version": "0.1.0",
             "hardware": {"machine": "aarch64"}, "runtimes": ["onnxruntime"], "models": {}}  # fmt: skip
    assert protocol.decode(Kind.STATUS, protocol.encode(Kind.STATUS, birth))["state"] == "online"
    with pytest.raises(ProtocolError):
        protocol.encode(Kind.STATUS, {**birth, "state": "sleeping"})


def test_the_encoder_refuses_what_the_decoder_would_refuse() -> None:
    with pytest.raises(ProtocolError):
        protocol.encode(Kind.EVENTS, {"v": 1})


def test_lone_surrogates_smuggled_in_by_json_escapes_are_refused() -> None:
    payload = json.dumps(window(release="\ud800")).encode()
    assert b"\\ud800" in payload
    with pytest.raises(ProtocolError, match="surrogate"):
        protocol.decode(Kind.TELEMETRY, payload)
    detail = json.dumps({"v": 1, "device_id": "pi-1", "boot_id": BOOT, "seq": 1, "ts": 1.0, "type": "x",
                         "detail": {"\udfff": 1}}).encode()  # fmt: skip
    with pytest.raises(ProtocolError):
        protocol.decode(Kind.EVENTS, detail)


def test_a_boolean_or_float_schema_version_is_not_version_1() -> None:
    for v in (True, 1.0):
        with pytest.raises(ProtocolError, match="schema_version"):
            protocol.decode(Kind.TELEMETRY, json.dumps(window(v=v)).encode())


def event(**changes: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "v": 1,
        "device_id": "pi-1",
        "boot_id": BOOT,
        "seq": 3,
        "ts": 1_700_000_000.5,
        "type": "install_committed",
        "model": "digits",
        "detail": {"release": "digits:1.0.0"},
    }
    message.update(changes)
    return message


def refusal(kind: Kind, payload: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        protocol.decode(kind, payload)
    return info.value


def test_optional_fields_that_were_absent_stay_absent() -> None:
    message = window(health={"cpu_percent": 3.5})
    decoded = protocol.decode(Kind.TELEMETRY, protocol.encode(Kind.TELEMETRY, message))
    assert decoded == message
    assert "feedback" not in decoded
    assert decoded["health"] == {"cpu_percent": 3.5}
    nulled = protocol.decode(Kind.TELEMETRY, json.dumps(window(health={"temperature_c": None})).encode())
    assert nulled["health"] == {"temperature_c": None}  # a null that was sent is kept
    will = protocol.offline_status("pi-1", BOOT, "shutdown")
    assert protocol.decode(Kind.STATUS, json.dumps(will).encode()).keys() == will.keys()
    no_model = event()
    del no_model["model"]
    assert "model" not in protocol.decode(Kind.EVENTS, json.dumps(no_model).encode())


def test_decoded_messages_are_plain_builtins() -> None:
    decoded = protocol.decode(Kind.TELEMETRY, protocol.encode(Kind.TELEMETRY, window(feedback=[[2, 0], [1, 3]])))
    assert type(decoded) is dict and type(decoded["health"]) is dict
    assert type(decoded["features"]) is list and type(decoded["features"][0]) is list
    assert decoded["feedback"] == [[2, 0], [1, 3]]


def test_integer_timestamps_are_accepted() -> None:
    message = window(window_start=1_700_000_000, window_end=1_700_000_060)
    decoded = protocol.decode(Kind.TELEMETRY, json.dumps(message).encode())
    assert (decoded["window_start"], decoded["window_end"]) == (1_700_000_000, 1_700_000_060)
    assert protocol.decode(Kind.EVENTS, json.dumps(event(ts=1_700_000_000)).encode())["ts"] == 1_700_000_000


def test_deep_nesting_in_an_event_detail_is_refused_cleanly() -> None:
    depth = 10_000
    payload = json.dumps(event(detail={})).replace('"detail": {}', '"detail": ' + '{"a":' * depth + "1" + "}" * depth)
    assert len(payload) < protocol.MAX_PAYLOAD_BYTES
    assert refusal(Kind.EVENTS, payload.encode()).reason == "not_json"


def test_a_number_beyond_a_float_is_refused_wherever_it_is() -> None:
    in_detail = json.dumps(event(detail={"x": [1]})).replace('"x": [1]', '"x": [1e400]')
    in_count = json.dumps(window()).replace('"count": 10', '"count": 1e400')
    assert refusal(Kind.EVENTS, in_detail.encode()).reason == "bad_field"
    assert refusal(Kind.TELEMETRY, in_count.encode()).reason == "bad_field"


@pytest.mark.parametrize(
    ("message", "reason", "detail"),
    [
        (window(health={"rss_bytes": -1}), "bad_field", "health.rss_bytes: Expected `int` >= 0"),
        (window(health={"secret": 1}), "unknown_field", "health.secret"),
        (window(features=[[1, 2], [1, -1]]), "bad_field", "features[1][1]: Expected `int` >= 0"),
        (window(feedback=[[1, 0], [1]]), "bad_field", "feedback: rows of unequal width"),
        (window(errors=11), "bad_field", "errors exceed count"),
        (window(latency=[0] * 3), "bad_field", "latency: Expected `array` of length >= 33"),
        (window(boot_id=BOOT + "\n"), "bad_field", "boot_id: Expected `str` matching regex"),
        (window(model="digits\n"), "bad_field", "model: Expected `str` matching regex"),
        (window(device_id="pi-1\n"), "bad_field", "device_id: Expected `str` matching regex"),
        (window(release="x" * 129), "bad_field", "release: Expected `str` of length <= 128"),
        ({k: v for k, v in window().items() if k != "health"}, "missing_field", "health"),
        (event(detail=[]), "bad_field", "detail: Expected `object`, got `array`"),
        (event(model=None), "bad_field", "model: Expected `str`, got `null`"),
    ],
)
def test_a_refusal_names_the_field_path_and_what_was_expected(
    message: dict[str, Any], reason: str, detail: str
) -> None:
    kind = Kind.TELEMETRY if "window_start" in message else Kind.EVENTS
    error = refusal(kind, json.dumps(message).encode())
    assert (error.reason, error.detail[: len(detail)]) == (reason, detail)
    with pytest.raises(ProtocolError) as info:
        protocol.validate(kind, message)
    assert (info.value.reason, info.value.detail[: len(detail)]) == (reason, detail)


def test_a_newer_schema_version_wins_over_every_other_fault() -> None:
    message = window(v=2, count=-1, extra=1)
    del message["health"]
    assert refusal(Kind.TELEMETRY, json.dumps(message).encode()).reason == "schema_version"
    assert refusal(Kind.TELEMETRY, b'{"v": 2, "count": -1').reason == "not_json"  # not JSON comes first
    assert refusal(Kind.TELEMETRY, b'[{"v": 1}]').reason == "not_object"


def test_validate_returns_the_message_it_checked() -> None:
    message = window()
    assert protocol.validate(Kind.TELEMETRY, message) is message
    with pytest.raises(ProtocolError, match="no_schema"):
        protocol.validate(Kind.DESIRED, message)


def test_the_encoder_refuses_lone_surrogates_and_numbers_json_cannot_carry() -> None:
    with pytest.raises(ProtocolError, match="surrogate") as info:
        protocol.encode(Kind.TELEMETRY, window(release="\ud800"))
    assert info.value.reason == "bad_field"
    with pytest.raises(ProtocolError, match="surrogate"):
        protocol.encode(Kind.EVENTS, event(detail={"note": "a\udfffb"}))
    for value in (float("nan"), float("inf")):
        with pytest.raises(ProtocolError) as info:
            protocol.encode(Kind.EVENTS, event(detail={"x": value}))
        assert info.value.reason == "bad_field"
        with pytest.raises(ProtocolError, match="bad_field"):
            protocol.encode(Kind.TELEMETRY, window(health={"load1": value}))
