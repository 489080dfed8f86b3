"""The durable outbox, on real SQLite files: ordering, restarts, bounds, exact drop accounting, full disks."""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import protocol
from agent.outbox import MAX_HELD_EVENTS, Entry, Outbox, OutboxError, OutboxFull
from agent.protocol import Kind

TELEMETRY_TOPIC = "edgefleet/v1/dev-1/telemetry"
EVENTS_TOPIC = "edgefleet/v1/dev-1/events"
BOOT_ID = "0123456789abcdef0123456789abcdef"


def telemetry(count: int = 10, features: list[list[int]] | None = None) -> dict[str, Any]:
    """A window without seq and dropped: the outbox fills those in."""
    return {
        "v": protocol.SCHEMA_VERSION,
        "device_id": "dev-1",
        "boot_id": BOOT_ID,
        "model": "digits",
        "release": "digits:1",
        "window_start": 1_700_000_000.0,
        "window_end": 1_700_000_060.0,
        "count": count,
        "errors": 0,
        "latency": [0] * (len(protocol.LATENCY_EDGES_MS) + 1),
        "confidence": [0] * protocol.CONFIDENCE_BINS,
        "classes": [count, 0],
        "features": features if features is not None else [[0, count, 0, 0]],
        "health": {},
    }


def incompressible_telemetry(rng: np.random.Generator) -> dict[str, Any]:
    """A window whose random histograms zlib cannot shrink, so each takes real space on disk."""
    return telemetry(features=rng.integers(0, 2**40, size=(40, 12)).tolist())


def event_message(detail: dict[str, Any]) -> dict[str, Any]:
    return {
        "v": protocol.SCHEMA_VERSION,
        "device_id": "dev-1",
        "boot_id": BOOT_ID,
        "ts": 1_700_000_000.0,
        "type": "install_committed",
        "detail": detail,
    }


def append_telemetry(box: Outbox, message: dict[str, Any] | None = None) -> int:
    return box.append(Kind.TELEMETRY, TELEMETRY_TOPIC, message or telemetry())


def append_event(box: Outbox, detail: dict[str, Any] | None = None) -> int | None:
    return box.append(Kind.EVENTS, EVENTS_TOPIC, event_message(detail or {}))


def decoded(entry: Entry) -> dict[str, Any]:
    return protocol.decode(entry.kind, entry.payload)


def reported_drops(box: Outbox) -> int:
    return sum(decoded(e)["dropped"] for e in box.pending(10**6) if e.kind is Kind.TELEMETRY)


def test_seq_and_pending_messages_survive_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        seqs = [append_telemetry(box), append_event(box), append_telemetry(box)]
        box.ack(seqs[0], BOOT_ID)
    assert seqs == [1, 2, 3]

    with Outbox(path) as box:
        pending = box.pending(10)
        assert [(e.seq, e.kind, e.topic, e.qos) for e in pending] == [
            (2, Kind.EVENTS, EVENTS_TOPIC, 1),
            (3, Kind.TELEMETRY, TELEMETRY_TOPIC, 1),
        ]
        assert decoded(pending[1])["seq"] == 3
        assert append_event(box) == 4
        assert box.stats()["next_seq"] == 5


def test_ack_removes_only_that_message_and_ignores_unknown_seqs(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db") as box:
        first, second = append_telemetry(box), append_event(box)
        box.ack(first, BOOT_ID)
        box.ack(first, BOOT_ID)
        box.ack(999, BOOT_ID)
        assert [e.seq for e in box.pending(10)] == [second]
        stats = box.stats()
        assert (stats["rows"], stats["telemetry_rows"], stats["event_rows"]) == (1, 0, 1)
        assert stats["bytes"] == len(box.pending(1)[0].payload)


def test_pending_is_oldest_first_across_kinds_and_skips_messages_in_flight(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db") as box:
        seqs = [append_event(box) if i % 3 == 0 else append_telemetry(box) for i in range(9)]
        assert [e.seq for e in box.pending(4)] == seqs[:4]
        assert [e.seq for e in box.pending(4, exclude={seqs[0], seqs[2], 12345})] == [seqs[1], *seqs[3:6]]


def test_full_by_rows_drops_oldest_telemetry_and_reports_the_count_exactly_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.outbox")
    with Outbox(tmp_path / "outbox.db", max_rows=4) as box:
        for _ in range(4):
            append_telemetry(box)  # t1..t4
        t5 = append_telemetry(box)  # evicts t1; the drop is owed to the next window
        t6 = append_telemetry(box)  # reports 1, evicts t2
        e1 = append_event(box)  # evicts t3
        t7 = append_telemetry(box)  # reports 2, evicts t4

        pending = box.pending(10)
        assert [e.seq for e in pending] == [t5, t6, e1, t7]
        assert [decoded(e)["dropped"] for e in pending if e.kind is Kind.TELEMETRY] == [0, 1, 2]
        assert box.stats()["dropped_total"] == 4
        assert box.stats()["dropped_unreported"] == 1

        box.ack(t7, BOOT_ID)
        t8 = append_telemetry(box)
        assert decoded(box.pending(10)[-1])["dropped"] == 1
        assert box.stats()["dropped_unreported"] == 0
        assert t8 == t7 + 1

    dropped_logs = [r for r in caplog.records if r.getMessage() == "outbox_dropped"]
    assert len(dropped_logs) == 4 and all(r.levelno == logging.WARNING for r in dropped_logs)


def test_a_dropped_window_that_reported_drops_owes_them_again(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db", max_rows=2) as box:
        for _ in range(3):
            append_telemetry(box)  # the third evicts the first: 1 owed
        append_telemetry(box)  # 4th reports 1, evicts the 2nd (which reported 0): 1 owed
        append_telemetry(box)  # 5th reports 1, evicts the 3rd (which reported 0): 1 owed
        append_telemetry(box)  # 6th reports 1, evicts the 4th, which reported 1: 2 owed
        stats = box.stats()
        assert stats["dropped_total"] == 4
        assert stats["dropped_unreported"] == 2
        assert reported_drops(box) + stats["dropped_unreported"] == stats["dropped_total"]


def test_drops_are_reported_exactly_once_over_a_random_outage(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    delivered_drops = appended = delivered = 0
    path = tmp_path / "outbox.db"
    box = Outbox(path, max_rows=12)
    for step in range(600):
        action = rng.random()
        if action < 0.6:
            append_telemetry(box)
            appended += 1
        elif action < 0.7:
            append_event(box)
        elif action < 0.95:
            for entry in box.pending(int(rng.integers(1, 4))):
                if entry.kind is Kind.TELEMETRY:
                    delivered_drops += decoded(entry)["dropped"]
                    delivered += 1
                box.ack(entry.seq, BOOT_ID)
        if step % 97 == 0:
            box.close()
            box = Outbox(path, max_rows=12)
    stats = box.stats()
    assert stats["dropped_total"] > 20
    assert stats["dropped_total"] == appended - delivered - stats["telemetry_rows"]
    assert delivered_drops + reported_drops(box) + stats["dropped_unreported"] == stats["dropped_total"]
    box.close()


def test_full_by_bytes_drops_oldest_telemetry(tmp_path: Path) -> None:
    size = len(protocol.encode(Kind.TELEMETRY, {**telemetry(), "seq": 1, "dropped": 0}))
    with Outbox(tmp_path / "outbox.db", max_bytes=3 * size + size // 2) as box:
        seqs = [append_telemetry(box) for _ in range(6)]
        stats = box.stats()
        assert [e.seq for e in box.pending(10)] == seqs[3:]
        assert stats["bytes"] <= box.max_bytes
        assert (stats["dropped_total"], stats["dropped_unreported"]) == (3, 1)
        assert reported_drops(box) == 2


def test_events_are_never_dropped_even_when_they_overflow_the_bounds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agent.outbox")
    with Outbox(tmp_path / "outbox.db", max_rows=3) as box:
        first = append_telemetry(box)
        events = [append_event(box) for _ in range(5)]
        last = append_telemetry(box)  # nowhere to go: dropped at once, and owed
        assert [e.seq for e in box.pending(10)] == events
        stats = box.stats()
        assert (stats["rows"], stats["event_rows"]) == (5, 5)
        assert (stats["dropped_total"], stats["dropped_unreported"]) == (2, 2)
        assert last > first
    assert [r.getMessage() for r in caplog.records].count("outbox_over_bounds") == 1


def test_full_disk_drops_and_counts_telemetry_and_holds_events_until_there_is_room(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agent.outbox")
    rng = np.random.default_rng(6)
    with Outbox(tmp_path / "outbox.db") as box:
        # A real SQLITE_FULL: cap the database at its current size, as a full filesystem would.
        pages = box._db.execute("PRAGMA page_count").fetchone()[0]
        box._db.execute(f"PRAGMA max_page_count = {pages}")
        seqs = [append_telemetry(box, incompressible_telemetry(rng)) for _ in range(5)]
        lost = box.stats()["dropped_total"]
        assert lost >= 3
        assert len(set(seqs)) == 5
        logs = [{"log": rng.bytes(4000).hex(), "n": n} for n in range(3)]
        assert [append_event(box, detail) for detail in logs] == [None, None, None]
        assert box.stats()["held_events"] == 3
        assert box.store_held() == 3  # still no room: still held, in order

        box._db.execute("PRAGMA max_page_count = 1000000")
        seq = append_telemetry(box)
        assert box.stats()["held_events"] == 0
        stored = box.pending(100)
        assert [decoded(e)["detail"]["n"] for e in stored if e.kind is Kind.EVENTS] == [0, 1, 2]
        assert [e.seq for e in stored][-1] == seq  # the held events went in first, older seqs than the window
        assert seq > max(seqs)
        assert decoded(stored[-1])["dropped"] == lost
        assert box.stats()["dropped_unreported"] == 0
    disk_full = [r for r in caplog.records if getattr(r, "edgefleet_fields", {}).get("reason") == "disk_full"]
    assert len(disk_full) == lost + 3


def test_a_full_disk_holds_at_most_a_bounded_number_of_events_in_memory(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db") as box:
        pages = box._db.execute("PRAGMA page_count").fetchone()[0]
        box._db.execute(f"PRAGMA max_page_count = {pages}")
        filler = np.random.default_rng(7).bytes(8000).hex()
        while append_event(box, {"log": filler}) is not None:
            pass
        for _ in range(MAX_HELD_EVENTS - 1):
            append_event(box)
        with pytest.raises(OutboxFull, match="free space"):
            append_event(box)
        box._db.execute("PRAGMA max_page_count = 1000000")
        assert box.store_held() == 0
        assert box.stats()["event_rows"] >= MAX_HELD_EVENTS


def test_concurrent_appends_from_threads_get_unique_consecutive_seqs(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    results: list[list[int]] = [[] for _ in range(8)]
    barrier = threading.Barrier(8)

    def worker(t: int) -> None:
        barrier.wait()
        for _ in range(40):
            results[t].append(append_event(box) if t % 2 else append_telemetry(box))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    box.close()

    seqs = sorted(s for r in results for s in r)
    assert seqs == list(range(1, 321))
    assert all(r == sorted(r) for r in results)
    with Outbox(path) as box:
        assert [decoded(e)["seq"] for e in box.pending(1000)] == seqs


def test_corrupt_file_raises_an_error_naming_the_file_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    path.write_bytes(b"this is not an SQLite database" * 200)
    with pytest.raises(OutboxError, match=r"move .*outbox\.db.* aside") as info:
        Outbox(path)
    assert str(path) in str(info.value)


def test_outbox_written_by_a_newer_agent_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    Outbox(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(OutboxError, match="newer"):
        Outbox(path)


def test_an_acknowledgement_deletes_ranges_of_its_own_boot_and_counts_each_message_once(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db") as box:
        seqs = [append_telemetry(box), append_event(box), append_telemetry(box), append_telemetry(box)]
        other_boot = "f" * 32  # an acknowledgement meant for an outbox this one replaced: seqs started again
        assert box.acknowledge(other_boot, [(seqs[0], seqs[-1])]) == {}
        assert box.stats()["rows"] == 4
        assert box.acknowledge(BOOT_ID, [(seqs[0], seqs[1]), (seqs[3], seqs[3])]) == {Kind.TELEMETRY: 2, Kind.EVENTS: 1}
        assert box.acknowledge(BOOT_ID, [(seqs[0], seqs[-1])]) == {Kind.TELEMETRY: 1}, "the rest, each once"
        assert box.stats()["rows"] == 0 and box.stats()["bytes"] == 0


def test_an_outbox_of_schema_1_is_migrated_and_its_rows_take_any_boots_acknowledgement(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        seq = append_telemetry(box)
    db = sqlite3.connect(path)  # as schema 1 left it: no boot_id column
    db.executescript("ALTER TABLE outbox DROP COLUMN boot_id; PRAGMA user_version = 1;")
    db.close()
    with Outbox(path) as box:
        assert [e.seq for e in box.pending(10)] == [seq]
        assert box.acknowledge("e" * 32, [(seq, seq)]) == {Kind.TELEMETRY: 1}
        assert append_telemetry(box) == seq + 1
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    db.close()
