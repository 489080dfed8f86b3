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


# --------------------------------------------------------------------------------------------------------------
# Gaps: the seqs of a device that no stored window or event holds.

BOOT_2 = "d" * 32


def event(device_id: str, seq: int, boot_id: str = BOOT, **changes: Any) -> dict[str, Any]:
    """An event as the ingest hands it over: decoded from the wire."""
    message = {"v": protocol.SCHEMA_VERSION, "device_id": device_id, "boot_id": boot_id, "seq": seq,
               "ts": 1.7e9 + seq, "type": "install_state", "model": "digits", "detail": {"state": "DOWNLOADING"},
               **changes}  # fmt: skip
    message = {k: v for k, v in message.items() if v is not None}  # model=None: an event about no model
    return protocol.decode(Kind.EVENTS, protocol.encode(Kind.EVENTS, message))


def spans(store: Store, device_id: str | None = None) -> list[tuple[str, int, int]]:
    return [(g.device_id, g.first, g.last) for g in store.gaps(device_id)]


def test_gaps_are_the_seqs_missing_between_a_devices_windows_and_events_and_resends_close_them(store: Store) -> None:
    # Windows and events share one seq sequence: event 3 fills what would otherwise be a gap between windows.
    store.write_batch(
        windows=[window("pi-1", s) for s in (5, 6, 8, 12)] + [window("pi-2", s) for s in (1, 2)],
        events=[event("pi-1", 3), event("pi-1", 7), event("pi-2", 4)],
    )
    # Seqs before the first stored (1-2 of pi-1) are not a gap: the fleet cannot tell them from an outbox it never
    # heard from; nor are seqs after the last (not sent yet, as far as the fleet knows).
    assert spans(store) == [("pi-1", 4, 4), ("pi-1", 9, 11), ("pi-2", 3, 3)]
    assert spans(store, "pi-2") == [("pi-2", 3, 3)]
    assert [g.missing for g in store.gaps("pi-1")] == [1, 3]
    assert store.summary().gaps == {"pi-1": 4, "pi-2": 1}

    store.write_batch(windows=[window("pi-1", 4), window("pi-1", 10), window("pi-2", 3)])  # resent late
    assert spans(store) == [("pi-1", 9, 9), ("pi-1", 11, 11)]
    detail = store.device("pi-1")
    assert detail is not None
    assert (detail.missing, [(g.first, g.last) for g in detail.gaps]) == (2, [(9, 9), (11, 11)])
    store.write_batch(windows=[window("pi-1", 9)], events=[event("pi-1", 11)])
    assert (store.gaps(), store.summary().gaps) == ([], {})
    assert store.device("pi-1").missing == 0  # type: ignore[union-attr]


def test_seqs_continue_across_boots_so_a_gap_can_straddle_a_reboot_and_names_the_boots_on_either_side(
    store: Store,
) -> None:
    store.write_batch(windows=[window("pi-1", 1), window("pi-1", 2), window("pi-1", 5, boot_id=BOOT_2)])
    (gap,) = store.gaps("pi-1")
    assert (gap.first, gap.last, gap.missing, gap.prev_boot_id, gap.boot_id) == (3, 4, 2, BOOT, BOOT_2)
    shown = device_view(store, "pi-1")
    assert shown is not None
    assert shown["gaps"] == [{"first": 3, "last": 4, "missing": 2, "prev_boot_id": BOOT, "boot_id": BOOT_2}]
    assert shown["missing"] == 2


def test_a_device_shows_its_latest_gaps_and_counts_them_all(store: Store) -> None:
    from fleet.store.sqlite_reads import LAST_GAPS

    store.write_batch(windows=[window("pi-1", s) for s in range(0, 2 * (LAST_GAPS + 5), 2)])  # every odd seq lost
    detail = store.device("pi-1")
    assert detail is not None
    assert len(detail.gaps) == LAST_GAPS
    assert detail.gaps[-1].first == 2 * (LAST_GAPS + 4) - 1
    assert detail.missing == LAST_GAPS + 4
    assert views.summary_json(store.summary())["gaps"] == {"missing": LAST_GAPS + 4, "devices": {"pi-1": LAST_GAPS + 4}}


# --------------------------------------------------------------------------------------------------------------
# Conflicts: a copy of a stored window or event that differs from it.


def rejects(store: Store) -> dict[str, int]:
    return store.summary().rejects


def test_a_forged_window_stored_first_makes_the_real_one_a_counted_conflict_never_a_silent_duplicate(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    forged, real = window("pi-1", 9, count=424242), window("pi-1", 9)
    assert store.write_batch(windows=[forged], payloads=[protocol.encode(Kind.TELEMETRY, forged)]) == 1
    found: list[Any] = []
    with caplog.at_level("WARNING", logger="fleet.store.sqlite"):
        stored = store.write_batch(windows=[real], payloads=[protocol.encode(Kind.TELEMETRY, real)], conflicts=found)
    assert stored == 0
    assert rejects(store) == {"conflict": 1}
    assert [(r.reason, r.topic) for r in found] == [("conflict", "pi-1/telemetry")]
    assert f"seq 9 of pi-1 boot {BOOT}" in found[0].detail
    (record,) = [r for r in caplog.records if r.getMessage() == "ingest_conflict"]
    logged = vars(record)
    assert any(isinstance(v, dict) and v.get("seq") == 9 and v.get("boot_id") == BOOT for v in logged.values())
    assert [w["count"] for w in store.telemetry("pi-1").windows] == [424242]  # the first stays: nothing overwritten


def test_an_identical_copy_of_a_window_or_event_is_a_plain_duplicate(store: Store) -> None:
    sent = window("pi-1", 1)
    wire = protocol.encode(Kind.TELEMETRY, sent)
    assert store.write_batch(windows=[sent], events=[event("pi-1", 2)], payloads=[wire]) == 2
    assert store.write_batch(windows=[sent, sent], events=[event("pi-1", 2)], payloads=[wire, wire]) == 0
    assert store.write_batch(windows=[window("pi-1", 1)]) == 0  # encoded by the store: the same bytes
    assert rejects(store) == {}


def test_an_event_that_differs_in_type_time_model_or_detail_is_a_conflict(store: Store) -> None:
    store.write_batch(events=[event("pi-1", 1), event("pi-1", 2, model=None)])
    changed = [
        event("pi-1", 1, type="install_failed"),
        event("pi-1", 1, ts=1.7e9 + 0.5),
        event("pi-1", 1, model="other"),
        event("pi-1", 1, detail={"state": "STAGED"}),
        event("pi-1", 2),  # model None stored, "digits" now
    ]
    found: list[Any] = []
    assert store.write_batch(events=[*changed, event("pi-1", 1), event("pi-1", 2, model=None)], conflicts=found) == 0
    assert rejects(store) == {"conflict": 5}
    assert {r.topic for r in found} == {"pi-1/events"}


def test_two_different_windows_for_one_key_in_one_batch_store_the_first_and_count_the_second(store: Store) -> None:
    first, second = window("pi-1", 3), window("pi-1", 3, count=7)
    assert store.write_batch(windows=[first, second, window("pi-1", 4)]) == 2
    assert rejects(store) == {"conflict": 1}
    assert [w["count"] for w in store.telemetry("pi-1").windows] == [4, 4]


def test_conflicts_are_looked_up_in_chunks_for_batches_larger_than_one_query_takes(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fleet.store.sqlite as backend

    monkeypatch.setattr(backend, "_CONFLICT_CHUNK", 2)
    store.write_batch(windows=[window("pi-1", s) for s in range(5)], events=[event("pi-1", s) for s in (10, 11, 12)])
    again = [window("pi-1", s, count=5 if s in (0, 4) else 4) for s in range(5)]
    events = [event("pi-1", 10), event("pi-1", 11, type="x"), event("pi-1", 12, type="x")]
    found: list[Any] = []
    assert store.write_batch(windows=again, events=events, conflicts=found) == 0
    assert sorted(r.detail.split(" of ")[0] for r in found) == [
        "events seq 11", "events seq 12", "telemetry seq 0", "telemetry seq 4"]  # fmt: skip


def test_the_fleet_wide_count_is_the_sum_of_each_devices_gaps(store: Store) -> None:
    import random

    rng = random.Random(9)
    for device in ("pi-1", "pi-2", "pi-3"):
        kept = sorted(rng.sample(range(1, 200), rng.randint(1, 150)))
        boots = [BOOT if s < 100 else BOOT_2 for s in kept]
        as_event = {s for s in kept if rng.random() < 0.3}
        store.write_batch(
            windows=[window(device, s, boot_id=b) for s, b in zip(kept, boots, strict=True) if s not in as_event],
            events=[event(device, s, boot_id=b) for s, b in zip(kept, boots, strict=True) if s in as_event],
        )
    # An event stored under a window's key (a copy the fleet cannot tell apart across tables) fills no seq twice.
    store.write_batch(windows=[window("pi-4", s) for s in (1, 2, 5)], events=[event("pi-4", 2)])
    per_device: dict[str, int] = {}
    for gap in store.gaps():
        per_device[gap.device_id] = per_device.get(gap.device_id, 0) + gap.missing
    assert per_device["pi-4"] == 2
    assert store.summary().gaps == per_device
