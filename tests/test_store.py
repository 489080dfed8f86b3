"""The fleet store's write path: JSON columns stay readable text, devices are registered and touched."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import protocol
from agent.protocol import Kind
from fleet.store import Store

BOOT = "c" * 32


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "fleet.db")
    yield s
    s.close()


def window(device_id: str, seq: int, **changes: Any) -> dict[str, Any]:
    """A window as the ingest hands it over: decoded from the wire."""
    message = {
        "v": protocol.SCHEMA_VERSION,
        "device_id": device_id,
        "boot_id": BOOT,
        "seq": seq,
        "model": "digits",
        "release": "digits:1",
        "window_start": 1.7e9 + 60 * seq,
        "window_end": 1.7e9 + 60 * (seq + 1),
        "count": 4,
        "errors": 0,
        "dropped": 0,
        "latency": [0] * 8 + [4] + [0] * (len(protocol.LATENCY_EDGES_MS) - 8),
        "confidence": [0] * (protocol.CONFIDENCE_BINS - 1) + [4],
        "classes": [1, 3],
        "features": [[0, 4, 0, 0, 0], [0, 0, 4, 0, 0]],
        "health": {"cpu_percent": 2.5, "temperature_c": None},
        **changes,
    }
    return protocol.decode(Kind.TELEMETRY, protocol.encode(Kind.TELEMETRY, message))


def test_histograms_are_stored_as_json_text_and_read_back_as_sent(store: Store) -> None:
    sent = [window("pi-1", 0), window("pi-1", 1, feedback=[[3, 0], [1, 0]])]
    assert store.write_batch(windows=sent) == 2

    types = store.db.execute("SELECT typeof(features), typeof(health), typeof(feedback) FROM windows ORDER BY seq")
    assert types.fetchall() == [("text", "text", "null"), ("text", "text", "text")]
    stored = store.telemetry("pi-1")["windows"]
    for field in ("latency", "confidence", "classes", "features", "health"):
        assert [w[field] for w in stored] == [w[field] for w in sent]
    assert "feedback" not in stored[0]
    assert stored[1]["feedback"] == [[3, 0], [1, 0]]


def test_a_window_registers_its_device_offline_and_later_ones_only_move_last_seen_forward(store: Store) -> None:
    store.write_batch(windows=[window("pi-1", 0), window("pi-2", 0)], received_at=1000.0)
    store.write_batch(windows=[window("pi-1", 1), window("pi-1", 0)], received_at=2000.0)  # seq 0 is a copy
    store.write_batch(windows=[window("pi-2", 1)], received_at=1500.0)  # a late batch never moves the clock back

    devices = {d["device_id"]: d for d in store.devices()}
    assert {d: (v["online"], v["boot_id"], v["windows"]) for d, v in devices.items()} == {
        "pi-1": (False, BOOT, 2),
        "pi-2": (False, BOOT, 2),
    }
    assert devices["pi-1"]["first_seen"] == devices["pi-2"]["first_seen"] == "1970-01-01T00:16:40.000Z"
    assert devices["pi-1"]["last_seen"] == "1970-01-01T00:33:20.000Z"
    assert devices["pi-2"]["last_seen"] == "1970-01-01T00:25:00.000Z"


def test_event_details_and_birth_fields_round_trip_through_their_json_columns(store: Store) -> None:
    birth = {"v": 1, "device_id": "pi-1", "state": "online", "boot_id": BOOT, "agent_version": "0.1.0",
             "hardware": {"machine": "aarch64", "note": "café"}, "runtimes": ["onnxruntime"],
             "models": {"digits": {"release": "digits:1"}}}  # fmt: skip
    event = {"v": 1, "device_id": "pi-1", "boot_id": BOOT, "seq": 5, "ts": 1.7e9, "type": "install_committed",
             "model": "digits", "detail": {"release": "digits:1", "seq": 3, "nested": [{"a": None}, 1.5]}}  # fmt: skip
    store.write_batch(status=[protocol.decode(Kind.STATUS, protocol.encode(Kind.STATUS, birth))])
    assert store.write_batch(events=[protocol.decode(Kind.EVENTS, protocol.encode(Kind.EVENTS, event))]) == 1

    device = store.device("pi-1")
    assert device is not None
    assert (device["hardware"], device["runtimes"], device["models"]) == (
        birth["hardware"],
        birth["runtimes"],
        birth["models"],
    )
    assert device["last_events"][0]["detail"] == event["detail"]
