"""Telemetry ingest workers: child processes that share the telemetry subscription, so that decoding and storing
windows uses more than one core.

One Python process stores 11,000-16,000 windows a second on the project's 2-core test machine, and the GIL keeps
it on one core; two workers store about 28,000 (docs/performance.md). With workers, `fleet serve` keeps status and
events in its own :class:`~fleet.ingest.mqtt.Ingest` (a device's birth and last will must not be reordered, so they stay
on one subscription) and starts N processes, each an ``Ingest`` of telemetry only, on the MQTT shared subscription
``$share/<group>/<prefix>/+/telemetry``: the broker hands each window to one of them.

Nothing is lost when a worker dies: each has a persistent session of its own (client id ``<client_id>-<i>``), so
the broker keeps that worker's share of the windows until it is back, and the supervisor starts it again (after
0.1 s, doubling up to 30 s while it keeps dying). Workers die with the parent, however it dies, and a smaller pool
first drains the sessions of the workers it retires (:func:`retire`). A window redelivered after a crash is absorbed
by the store's (device_id, boot_id, seq) key, and SQLite's WAL lets the workers commit in turn.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing import connection as mp_connection
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent import logs, protocol
from agent.broker_address import BrokerAddress, TlsFiles
from agent.files import write_atomic
from agent.logs import event
from fleet.errors import StoreUnavailable
from fleet.ingest.mqtt import Ingest, probe_topic
from fleet.store import open_store
from fleet.store.sqlite import SqliteStore

log = logging.getLogger(__name__)

#: `fleet serve --ingest-workers` unless told otherwise: two processes take a 2-core machine's ingest from 0.4 to
#: over 0.7 of a bare subscriber's rate (docs/performance.md); more than the cores only adds contention.
DEFAULT_INGEST_WORKERS = 2
#: How often a worker reports its counters to the parent.
_REPORT_S = 0.02
#: How long a stopping worker may take to commit and ack what it holds before it is killed (the broker redelivers).
_STOP_TIMEOUT_S = 30.0
#: Retiring a worker's session: how long to wait for the broker, and for a lull that says the session is empty.
_RETIRE_TIMEOUT_S = 10.0
_RETIRE_QUIET_S = 0.5
#: A dead worker is restarted after this long, doubling while it keeps dying within the maximum of its start.
_RESTART_MIN_S = 0.1
_RESTART_MAX_S = 30.0
#: How often a worker runs the cycle collector, and the pool checkpoints the database's write-ahead log.
_COLLECT_S = 30.0
_CHECKPOINT_S = 1.0
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_SUMMED = ("received", "stored", "duplicates", "queue_depth", "batches", "probes", "acks_sent", "ack_bytes")
#: How long :meth:`TelemetryWorkers.probe` waits for a worker to report the probe.
PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs to run its ``Ingest``; picklable, as it crosses into a spawned process."""

    db: Path
    broker_url: str
    prefix: str
    client_id: str
    share: str
    tls: TlsFiles | None
    log_level: str


def _die_with(parent: int) -> None:
    """Have the kernel send SIGTERM when the parent dies, however it dies (SIGKILL included): an orphaned worker
    would go on taking windows that the next `fleet serve` expects in its own workers' sessions."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        event(log, "ingest_worker_no_parent_watch", logging.WARNING, errno=ctypes.get_errno())
    if os.getppid() != parent:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _worker_main(spec: WorkerSpec, index: int, parent: int, reports: Connection) -> None:
    """One worker: ingest telemetry until SIGTERM, then commit and ack what it holds and exit."""
    logs.setup(spec.log_level)
    stop = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the parent stops us
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    _die_with(parent)
    store = open_store(spec.db)
    if isinstance(store, SqliteStore):
        store.leave_checkpoints_to_others()  # the pool's checkpointer does them, off the ingest's path
    ingest = Ingest(
        store,
        spec.broker_url,
        prefix=spec.prefix,
        client_id=f"{spec.client_id}-{index}",
        tls=spec.tls,
        kinds=(protocol.Kind.TELEMETRY,),
        share=spec.share,
    )
    ingest.start()
    # What a worker allocates (decoded windows) is freed by reference counting; the cycle collector only walked it,
    # at a cost of 20-25% of the decode (measured), so it runs on a clock instead of on allocation counts.
    gc.freeze()
    gc.disable()
    try:
        reported: dict[str, Any] = {}
        collected = time.monotonic()
        while not stop.wait(_REPORT_S):
            stats = ingest.stats()
            if stats != reported:
                reports.send(stats)
                reported = stats
            if time.monotonic() - collected > _COLLECT_S:
                gc.collect()
                collected = time.monotonic()
    finally:
        ingest.stop()
        with contextlib.suppress(OSError):  # a parent that is gone no longer reads
            reports.send({**ingest.stats(), "connected": False})
        store.close()


def retire(spec: WorkerSpec, keep: int, timeout: float = _RETIRE_TIMEOUT_S) -> bool:
    """Drain and remove the broker sessions of workers an earlier run had beyond ``keep``; False if it could not.

    A worker's session collects its share of the windows while the worker is away, so a pool made smaller would
    strand the retired workers' shares in the broker. Each retired session is resumed under its client id with no
    subscription (so nothing new comes), what it holds is stored, and the session is then removed. The pool size in
    use is recorded beside the database (``<db>.ingest-workers.json``), per client id.
    """
    record_path = spec.db.with_name(spec.db.name + ".ingest-workers.json")
    try:
        record: dict[str, int] = json.loads(record_path.read_text())
    except FileNotFoundError:
        record = {}
    for index in range(keep, record.get(spec.client_id, 0)):
        if not _drain_session(spec, index, timeout):
            event(log, "ingest_worker_retire_deferred", logging.WARNING, worker=index, reason="broker unreachable")
            return False
        event(log, "ingest_worker_retired", worker=index)
    if record.get(spec.client_id) != keep:
        write_atomic(record_path, json.dumps({**record, spec.client_id: keep}).encode())
    return True


def _drain_session(spec: WorkerSpec, index: int, timeout: float) -> bool:
    client_id = f"{spec.client_id}-{index}"
    store = open_store(spec.db)
    ingest = Ingest(store, spec.broker_url, spec.prefix, client_id, tls=spec.tls, kinds=(), share=spec.share)
    ingest.start()
    try:
        if not ingest.wait_ready(timeout):
            return False
        quiet_since, seen = time.monotonic(), -1
        deadline = time.monotonic() + timeout
        while time.monotonic() - quiet_since < _RETIRE_QUIET_S and time.monotonic() < deadline:
            stats = ingest.stats()
            if stats["received"] + stats["queue_depth"] != seen:
                quiet_since, seen = time.monotonic(), stats["received"] + stats["queue_depth"]
            time.sleep(0.05)
    finally:
        ingest.stop()
        store.close()
    return _remove_session(spec, client_id, timeout)


def _remove_session(spec: WorkerSpec, client_id: str, timeout: float) -> bool:
    """Connect once with a clean session: the broker drops the stored one."""
    address = BrokerAddress.parse(spec.broker_url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True, protocol=mqtt.MQTTv311)
    if address.tls:
        (spec.tls or TlsFiles()).apply(client)
    connected = threading.Event()
    client.on_connect = lambda c, u, f, reason_code, p: connected.set() if not reason_code.is_failure else None
    try:
        client.connect(address.host, address.port)
    except OSError:
        return False
    client.loop_start()
    try:
        return connected.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()


def _publish_probe(spec: WorkerSpec, timeout: float) -> str | None:
    """Publish one probe (QoS 1, acknowledged by the broker); None once it is, else why not."""
    address = BrokerAddress.parse(spec.broker_url)
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"{spec.client_id}-probe", clean_session=True, protocol=mqtt.MQTTv311
    )
    if address.tls:
        (spec.tls or TlsFiles()).apply(client)
    try:
        client.connect(address.host, address.port)
    except OSError as exc:
        return f"the probe could not connect: {exc}"
    client.loop_start()
    try:
        info = client.publish(probe_topic(spec.prefix), b"probe", qos=1)
        info.wait_for_publish(timeout)
        return None if info.is_published() else f"the broker did not acknowledge the probe within {timeout:g} s"
    except (RuntimeError, ValueError) as exc:
        return f"the probe was not published: {exc}"
    finally:
        client.disconnect()
        client.loop_stop()


class TelemetryWorkers:
    """``count`` telemetry ingest processes on one shared subscription, supervised: a worker that dies is restarted."""

    def __init__(self, spec: WorkerSpec, count: int) -> None:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self.spec = spec
        self.count = count
        self._ctx = mp.get_context("spawn")  # not fork: the parent runs threads (ingest, repository server)
        # Nothing is shared between the processes but a pipe per worker, read by this process only, and signals:
        # a shared lock or queue could be left held by a worker killed at the wrong moment.
        self._stop = threading.Event()
        self._pipes: list[Connection | None] = [None] * count
        self._procs: list[BaseProcess | None] = [None] * count
        self._started_at = [0.0] * count
        self._restart_at = [0.0] * count  # 0: alive, or not yet seen dead
        self._delay = [0.0] * count
        self._latest: list[dict[str, Any]] = [{} for _ in range(count)]
        self._past: list[dict[str, Any]] = []  # last reports of workers that died and were replaced
        self.restarts = 0
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="ingest-checkpointer", daemon=True)

    def start(self) -> None:
        """Start the workers, after draining the sessions of any an earlier, larger pool had (see :func:`retire`)."""
        retire(self.spec, self.count)
        for index in range(self.count):
            self._spawn(index)
        self._checkpointer.start()

    def _checkpoint_loop(self) -> None:
        """Move the workers' commits from the write-ahead log into the database, so that no worker waits for it."""
        store: SqliteStore | None = None
        failing = False
        while not self._stop.wait(_CHECKPOINT_S):
            try:
                store = store or SqliteStore(self.spec.db)
                store.checkpoint()
                failing = False
            except StoreUnavailable as exc:  # the workers' own errors say more; this one is said once, then retried
                if not failing:
                    event(log, "checkpoint_failed", logging.WARNING, error=str(exc))
                failing = True
        if store is not None:
            store.close()

    def _spawn(self, index: int) -> None:
        reader, writer = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=_worker_main,
            args=(self.spec, index, os.getpid(), writer),
            name=f"ingest-telemetry-{index}",
            daemon=True,
        )
        proc.start()
        writer.close()  # the worker holds the only write end: its death shows as EOF
        old = self._pipes[index]
        if old is not None:
            old.close()
        self._procs[index], self._pipes[index] = proc, reader
        self._started_at[index], self._restart_at[index] = time.monotonic(), 0.0

    def wait_ready(self, timeout: float) -> bool:
        """Wait until every worker is connected and subscribed."""
        deadline = time.monotonic() + timeout
        while True:
            self._collect(wait=0.05)
            if all(r.get("connected") for r in self._latest):
                return True
            if time.monotonic() >= deadline:
                return False

    def probe(self, timeout: float = PROBE_TIMEOUT_S) -> str | None:
        """Check that the shared subscription really delivers: publish a probe (:func:`~fleet.ingest.mqtt.probe_topic`)
        and wait for a worker to report it. None if one did, else why not (for the log).

        Some brokers grant ``$share/...`` subscriptions and never deliver on them (NATS server's MQTT, 2.9): the
        workers would then subscribe fine and store nothing, while the broker acknowledges every window.
        """
        self._collect()
        before = sum(r.get("probes", 0) for r in (*self._past, *self._latest))
        published = _publish_probe(self.spec, timeout)
        if published is not None:
            return published
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._collect(wait=0.05)
            if sum(r.get("probes", 0) for r in (*self._past, *self._latest)) > before:
                return None
        return f"no worker received a probe on the shared subscription within {timeout:g} s"

    def supervise(self) -> None:
        """Restart any worker that exited while the pool was not stopping; call it now and then."""
        self._collect()
        if self._stop.is_set():
            return
        now = time.monotonic()
        for index, proc in enumerate(self._procs):
            if proc is None or proc.is_alive() or now < self._restart_at[index]:
                continue
            if self._restart_at[index] == 0.0:  # just found dead: a worker that keeps dying waits longer each time
                lived = now - self._started_at[index]
                again = min(max(_RESTART_MIN_S, 2 * self._delay[index]), _RESTART_MAX_S)
                self._delay[index] = _RESTART_MIN_S if lived > _RESTART_MAX_S else again
                self._restart_at[index] = now + self._delay[index]
                event(log, "ingest_worker_died", logging.ERROR, worker=index, exitcode=proc.exitcode,
                      restart_in_s=round(self._delay[index], 1))  # fmt: skip
                continue
            self._past.append(self._latest[index])
            self._latest[index] = {}
            self.restarts += 1
            self._spawn(index)

    def stats(self) -> dict[str, Any]:
        """The workers' counters summed (including workers replaced since), as ``Ingest.stats`` has them."""
        self._collect()
        reports = [*self._past, *self._latest]
        total: dict[str, Any] = {key: sum(r.get(key, 0) for r in reports) for key in _SUMMED}
        rejected: Counter[str] = Counter()
        for r in reports:
            rejected.update(r.get("rejected", {}))
        connected = [r["connected_at"] for r in self._latest if r.get("connected")]
        return {
            "workers": self.count,
            "connected": len(connected),
            "connected_at": min(connected) if len(connected) == self.count else None,  # all connected, since when
            **total,
            "rejected": dict(rejected),
            "restarts": self.restarts,
        }

    def stop(self, timeout: float = _STOP_TIMEOUT_S) -> None:
        """Let every worker commit and ack what it holds, then exit; kill a worker that takes longer than timeout."""
        self._stop.set()
        if self._checkpointer.is_alive():
            self._checkpointer.join()
        for proc in self._procs:
            if proc is not None and proc.is_alive():
                proc.terminate()  # SIGTERM: the worker's cue to commit, ack and exit
        deadline = time.monotonic() + timeout
        for index, proc in enumerate(self._procs):
            if proc is None:
                continue
            while proc.is_alive() and time.monotonic() < deadline:
                self._collect(wait=0.05)  # keep reading, so that no worker blocks on a full pipe
                proc.join(0)
            if proc.is_alive():  # what it had not acked stays in its session at the broker
                event(log, "ingest_worker_killed", logging.WARNING, worker=index, after_s=timeout)
                proc.kill()
                proc.join()
        self._collect()
        for pipe in self._pipes:
            if pipe is not None:
                pipe.close()
        self._pipes = [None] * self.count

    def _collect(self, wait: float = 0.0) -> None:
        """Take the workers' reports that have arrived (waiting up to ``wait`` for the first)."""
        pipes = {pipe: index for index, pipe in enumerate(self._pipes) if pipe is not None}
        for pipe in mp_connection.wait(list(pipes), wait):
            try:
                while pipe.poll():  # type: ignore[union-attr]
                    self._latest[pipes[pipe]] = pipe.recv()  # type: ignore[union-attr]
            except (EOFError, OSError):  # the worker is gone; supervise() restarts it
                continue
