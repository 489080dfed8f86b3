"""Telemetry ingest workers: processes on one shared subscription store every window exactly once, a worker that
dies is restarted without losing what it held, and status and events stay with the main ingest."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleet_fixtures import device_view
from test_ingest import Publisher, birth, event_message, wait_for, window

from agent import protocol
from agent.protocol import Kind
from fleet.broker import MosquittoBroker
from fleet.ingest.mqtt import Ingest
from fleet.ingest.workers import TelemetryWorkers, WorkerSpec
from fleet.store import open_store


@pytest.fixture
def prefix() -> str:
    return f"w{uuid.uuid4().hex[:10]}/v1"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    open_store(tmp_path / "fleet.db").close()  # made and migrated once, as `fleet serve` does before the workers start
    return tmp_path / "fleet.db"


def pool(db: Path, broker: MosquittoBroker, prefix: str, count: int, client_id: str) -> TelemetryWorkers:
    workers = TelemetryWorkers(WorkerSpec(db, broker.url, prefix, client_id, client_id, None, "WARNING"), count)
    workers.start()
    assert workers.wait_ready(60), "the workers did not subscribe"
    return workers


@pytest.fixture
def publisher(broker: MosquittoBroker, prefix: str) -> Iterator[Publisher]:
    p = Publisher(broker.url, prefix)
    yield p
    p.close()


def test_windows_are_split_between_workers_and_each_is_stored_once_while_status_and_events_stay_in_the_main_ingest(
    db: Path, broker: MosquittoBroker, prefix: str, publisher: Publisher
) -> None:
    client_id = f"ingest-{uuid.uuid4().hex[:8]}"
    workers = pool(db, broker, prefix, 2, client_id)
    store = open_store(db)
    main = Ingest(store, broker.url, prefix=prefix, client_id=client_id, kinds=(Kind.STATUS, Kind.EVENTS))
    main.start()
    try:
        assert main.wait_ready(10)
        devices = [f"pi-{d}" for d in range(20)]
        publisher.send_many([(d, Kind.STATUS, birth(d)) for d in devices])
        publisher.send_many([(d, Kind.TELEMETRY, window(d, seq)) for seq in range(15) for d in devices])
        publisher.send_many([(d, Kind.EVENTS, event_message(d, 1)) for d in devices])
        publisher.send_many([(devices[0], Kind.TELEMETRY, window(devices[0], 3))])  # a copy

        wait_for(lambda: workers.stats()["stored"] == 300 and main.stats()["stored"] == 20, "300 windows, 20 events")
        wait_for(lambda: workers.stats()["duplicates"] == 1, "the copy to be absorbed")
        assert store.window_counts() == dict.fromkeys(devices, 15)
        assert all(device_view(store, d)["online"] for d in devices)  # type: ignore[index]
        assert main.stats()["received"] == 40  # births and events only: no telemetry reached the main ingest
        assert workers.stats()["connected"] == 2 and workers.stats()["rejected"] == {}
    finally:
        main.stop()
        workers.stop()
        store.close()


def test_a_worker_killed_mid_stream_is_restarted_and_no_window_is_lost_or_stored_twice(
    db: Path, broker: MosquittoBroker, prefix: str, publisher: Publisher
) -> None:
    workers = pool(db, broker, prefix, 2, f"ingest-{uuid.uuid4().hex[:8]}")
    store = open_store(db)
    try:
        publisher.send_many([("pi-1", Kind.TELEMETRY, window("pi-1", seq)) for seq in range(400)])
        victim = workers._procs[0]  # the pool's own process handle: there is no public way to kill a worker
        assert victim is not None and victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)
        publisher.send_many([("pi-1", Kind.TELEMETRY, window("pi-1", seq)) for seq in range(400, 800)])
        wait_for(lambda: (workers.supervise(), workers.restarts)[1] == 1, "the dead worker to be restarted")

        wait_for(lambda: store.window_counts().get("pi-1") == 800, "all 800 windows", timeout=60)
        assert store.window_counts() == {"pi-1": 800}
    finally:
        workers.stop()
        store.close()


def test_a_stopped_pool_commits_and_acks_what_it_holds_and_the_next_one_takes_what_waited_in_the_broker(
    db: Path, broker: MosquittoBroker, prefix: str, publisher: Publisher
) -> None:
    client_id = f"ingest-{uuid.uuid4().hex[:8]}"
    workers = pool(db, broker, prefix, 2, client_id)
    publisher.send_many([("pi-1", Kind.TELEMETRY, window("pi-1", seq)) for seq in range(100)])
    workers.stop()
    publisher.send_many([("pi-1", Kind.TELEMETRY, window("pi-1", seq)) for seq in range(100, 300)])  # all away

    workers = pool(db, broker, prefix, 2, client_id)
    store = open_store(db)
    try:
        wait_for(lambda: store.window_counts().get("pi-1") == 300, "the windows queued while the pool was down")
    finally:
        workers.stop()
        store.close()
    assert workers.stats()["connected"] == 0


def test_a_pool_needs_at_least_one_worker(db: Path) -> None:
    spec = WorkerSpec(db, "mqtt://127.0.0.1:1", protocol.DEFAULT_PREFIX, "ingest", "ingest", None, "WARNING")
    with pytest.raises(ValueError, match="count must be >= 1"):
        TelemetryWorkers(spec, 0)


def test_a_smaller_pool_first_stores_what_the_retired_workers_sessions_held_and_then_removes_them(
    db: Path, broker: MosquittoBroker, prefix: str, publisher: Publisher
) -> None:
    client_id = f"ingest-{uuid.uuid4().hex[:8]}"
    pool(db, broker, prefix, 3, client_id).stop()
    publisher.send_many([("pi-1", Kind.TELEMETRY, window("pi-1", seq)) for seq in range(90)])  # a third each

    workers = pool(db, broker, prefix, 1, client_id)  # retires workers 1 and 2 first
    store = open_store(db)
    try:
        wait_for(lambda: store.window_counts().get("pi-1") == 90, "the windows all three sessions held")
        publisher.send_many([("pi-1", Kind.TELEMETRY, window("pi-1", seq)) for seq in range(90, 150)])
        wait_for(lambda: store.window_counts().get("pi-1") == 150, "every later window: no session strands any")
    finally:
        workers.stop()
        store.close()


def test_a_worker_that_keeps_dying_is_restarted_less_and_less_often(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "a-directory").mkdir()  # not a database: every worker's Store fails to open it, at start
    spec = WorkerSpec(tmp_path / "a-directory", "mqtt://127.0.0.1:1", "p/v1", "i", "i", None, "ERROR")
    workers = TelemetryWorkers(spec, 1)
    workers.start()
    try:
        deadline = time.monotonic() + 30
        while workers.restarts < 4 and time.monotonic() < deadline:
            workers.supervise()
            time.sleep(0.02)
    finally:
        workers.stop()
    delays = [r.edgefleet_fields["restart_in_s"] for r in caplog.records if r.getMessage() == "ingest_worker_died"]
    assert delays[:4] == [0.1, 0.2, 0.4, 0.8]


def test_a_probe_reaches_one_worker_through_the_shared_subscription_and_is_counted_never_stored(
    db: Path, broker: MosquittoBroker, prefix: str
) -> None:
    workers = pool(db, broker, prefix, 2, f"ingest-{uuid.uuid4().hex[:8]}")
    store = open_store(db)
    try:
        assert workers.probe(timeout=5) is None
        assert workers.probe(timeout=5) is None
        wait_for(lambda: workers.stats()["probes"] == 2, "both probes counted, once each")
        stats = workers.stats()
        assert (stats["received"], stats["stored"], stats["rejected"]) == (0, 0, {})
        assert store.window_counts() == {}
    finally:
        workers.stop()
        store.close()


def test_a_probe_nobody_receives_says_why(db: Path, broker: MosquittoBroker, prefix: str) -> None:
    spec = WorkerSpec(db, broker.url, prefix, "nobody", "nobody", None, "WARNING")
    workers = TelemetryWorkers(spec, 1)  # never started: no worker subscribes
    why = workers.probe(timeout=0.5)
    assert why is not None and "no worker received a probe" in why
