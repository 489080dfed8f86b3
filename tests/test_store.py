"""The fleet store's write path: windows kept as they came off the wire, devices registered and touched, and the
migration of older databases."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils
from fleet_fixtures import device_view

from agent import protocol
from agent.protocol import Kind
from fleet import views
from fleet.store import Store, open_store
from fleet.store.schema import MIGRATIONS, SCHEMA_VERSION

BOOT = "c" * 32


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(tmp_path / "fleet.db")
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


HISTOGRAMS = ("latency", "confidence", "classes", "features", "health")


def test_a_window_is_kept_as_the_bytes_it_came_in_and_read_back_as_sent(store: Store) -> None:
    sent = [window("pi-1", 0), window("pi-1", 1, feedback=[[3, 0], [1, 0]])]
    wire = [protocol.encode(Kind.TELEMETRY, w) for w in sent]
    assert store.write_batch(windows=sent, payloads=wire) == 2

    kept = store.db.execute("SELECT payload FROM windows ORDER BY seq").fetchall()
    assert [row[0] for row in kept] == wire
    stored = store.telemetry("pi-1").windows
    for field in HISTOGRAMS:
        assert [w[field] for w in stored] == [w[field] for w in sent]
    assert "feedback" not in stored[0]
    assert stored[1]["feedback"] == [[3, 0], [1, 0]]


def test_windows_written_without_their_wire_bytes_are_encoded_by_the_store(store: Store) -> None:
    sent = window("pi-1", 0)
    store.write_batch(windows=[sent])
    assert {f: store.telemetry("pi-1").windows[0][f] for f in HISTOGRAMS} == {f: sent[f] for f in HISTOGRAMS}


def test_a_v2_database_keeps_every_window_when_it_moves_to_wire_payloads(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    old = sqlite_utils.Database(path)
    for step in MIGRATIONS[:2]:
        step(old)
    old.execute("PRAGMA user_version = 2")
    sent = [window("pi-1", 0), window("pi-1", 1, feedback=[[3, 0], [1, 0]]), window("pi-2", 0)]
    for w in sent:  # the v2 layout: histograms as JSON text columns
        json_columns = {f: json.dumps(w[f]) for f in (*HISTOGRAMS, "feedback") if f in w}
        old["windows"].insert({**{k: v for k, v in w.items() if k not in json_columns and k != "v"},
                               "received_at": 1.7e9, **json_columns})  # fmt: skip
    old.close()

    migrated = open_store(path)
    try:
        assert migrated.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert migrated.window_counts() == {"pi-1": 2, "pi-2": 1}
        stored = [*migrated.telemetry("pi-1").windows, *migrated.telemetry("pi-2").windows]
    finally:
        migrated.close()
    for field in (*HISTOGRAMS, "device_id", "seq", "count"):
        assert [w[field] for w in stored] == [w[field] for w in sent]
    assert stored[1]["feedback"] == [[3, 0], [1, 0]]


def test_a_window_registers_its_device_offline_and_later_ones_only_move_last_seen_forward(store: Store) -> None:
    store.write_batch(windows=[window("pi-1", 0), window("pi-2", 0)], received_at=1000.0)
    store.write_batch(windows=[window("pi-1", 1), window("pi-1", 0)], received_at=2000.0)  # seq 0 is a copy
    store.write_batch(windows=[window("pi-2", 1)], received_at=1500.0)  # a late batch never moves the clock back

    devices = {d.device_id: views.device_json(d) for d in store.devices()}
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

    device = device_view(store, "pi-1")
    assert device is not None
    assert (device["hardware"], device["runtimes"], device["models"]) == (
        birth["hardware"],
        birth["runtimes"],
        birth["models"],
    )
    assert device["last_events"][0]["detail"] == event["detail"]
