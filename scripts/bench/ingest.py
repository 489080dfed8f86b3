"""Ingest throughput: telemetry windows per second stored by the fleet's ingest vs a bare paho subscriber.

Both subscribers take the same load from the same kind of broker (a fresh ``MosquittoBroker`` per measurement,
loopback): realistic digits windows, made by the real ``WindowAggregator`` from held-out digits and encoded with
``protocol.encode``, published with QoS 1 by several publisher clients, each in its own process.

Each subscriber runs in a fresh process of its own. The ingest runs as `fleet serve --ingest-workers N` does: an
``Ingest`` of status and events in that process, and N ``TelemetryWorkers`` processes on a shared subscription
(N = 0: one ``Ingest`` of everything). Its CPU includes the workers' (their start-up too).

(a) Saturation: the subscriber is offline with a persistent session (subscribed once beforehand) while the
    publishers put a backlog of M windows into the broker; then the subscriber starts and the drain is timed from
    its connection (the broker sends the backlog from then on; spawning worker processes is start-up, not
    throughput) until the M-th window is counted (bare: paho ``on_message`` count, auto-ack) or committed and acked
    (the ingest, into a fresh SQLite store; checked with ``store.window_counts()`` afterwards).
(b) Offered load: the subscriber is live while the publishers emit R windows/s for T seconds; reported are the rate
    at which windows were stored (M / (last stored - first published)) and the lag (last stored - last published).

    python scripts/bench/ingest.py [--models DIR] [--messages 20000] [--devices 200] [--publishers 4]
                                   [--rates 500,2000] [--seconds 10] [--repeat 3] [--workers 2] [--profile]
                                   [--json]
                                   [--gc default|freeze|off]   (diagnostic: the subscribers' garbage collector)

Without ``--models`` the good digits example is built into a temporary folder first (a few seconds). ``--profile``
adds one ingest drain sampled by py-spy (``pip install py-spy``): the share of samples holding the GIL, by function.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import multiprocessing as mp
import os
import pickle
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import benchinfo
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent import protocol
from agent.protocol import Kind
from fleet.ingest.workers import DEFAULT_INGEST_WORKERS

TARGET_RATIO = 0.7
#: mosquitto drops QoS 1 messages for an offline session beyond this (``MosquittoBroker``'s config).
BROKER_MAX_QUEUED = 100_000
MODEL = "digits"
RELEASE = "digits:1.0.0"
WINDOW_S = 60.0
POLL_S = 0.002

Message = tuple[str, bytes]


# -- payloads ----------------------------------------------------------------------------------------------------


def make_payloads(models: Path, devices: int, total: int, rows: int, bodies: int, seed: int) -> list[Message]:
    """``total`` encoded telemetry windows, round-robin over ``devices`` ids, seq unique per device.

    Each device has ``bodies`` distinct windows of ``rows`` single-row inferences of held-out digits (real model
    outputs, real single-row latencies), made by the real ``WindowAggregator``; message k of a device uses body
    k % bodies with its own seq and time span, so every payload differs.
    """
    import numpy as np

    from agent.health import HealthSampler
    from agent.runtime import load_model
    from agent.telemetry import WindowAggregator
    from fleet.examples.modelgen import digits_split

    card = json.loads((models / "card.json").read_text())
    edges = card["drift"]["edges"]
    _, x_test, _, _ = digits_split(seed)
    model = load_model(models / "int8.onnx", threads=1)
    probs = model.predict(x_test)
    latencies = []
    for i in range(len(x_test)):  # what one row really costs through the runtime layer
        start = time.perf_counter()
        model.predict(x_test[i : i + 1])
        latencies.append(time.perf_counter() - start)
    model.close()
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as state:
        health = HealthSampler(Path(state)).sample()
    base = time.time() - WINDOW_S * (total // devices + 2)
    per_device: list[tuple[str, str, list[dict[str, Any]]]] = []
    for d in range(devices):
        clock = [base]
        agg = WindowAggregator(MODEL, RELEASE, edges, probs.shape[1], clock=lambda c=clock: c[0])
        made = []
        for b in range(bodies):
            for i in rng.integers(len(x_test), size=rows):
                agg.record(x_test[i : i + 1], probs[i : i + 1], latencies[int(rng.integers(len(latencies)))])
            made.append(agg.flush(base + WINDOW_S * (b + 1)))
        per_device.append((f"bench-{d:04d}", uuid.UUID(int=int(rng.integers(2**63)) + d).hex, made))
    out = []
    for k in range(total):
        device_id, boot_id, made = per_device[k % devices]
        seq = k // devices
        body = made[seq % bodies]
        start = base + WINDOW_S * seq
        message = {
            "v": protocol.SCHEMA_VERSION,
            "device_id": device_id,
            "boot_id": boot_id,
            "seq": seq,
            "dropped": 0,
            "health": health,
            **body,
            "window_start": start,
            "window_end": start + WINDOW_S,
        }
        topic = protocol.topic(protocol.DEFAULT_PREFIX, device_id, Kind.TELEMETRY)
        out.append((topic, protocol.encode(Kind.TELEMETRY, message)))
    return out


# -- publishers (child processes) --------------------------------------------------------------------------------


def _publisher(host: str, port: int, path: str, index: int, procs: int, rate: float, conn: Connection) -> None:
    """Publish this process's share of the messages with QoS 1 (as fast as paho goes if ``rate`` is 0, else at
    ``rate`` windows/s for all processes together), wait for every PUBACK, and send back the publish times."""
    with open(path, "rb") as f:
        messages: list[Message] = pickle.load(f)
    acked = 0
    all_acked = threading.Event()
    connected = threading.Event()

    def on_publish(*_: Any) -> None:
        nonlocal acked
        acked += 1
        if acked == len(messages):
            all_acked.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{index}-{uuid.uuid4().hex[:8]}")
    client.on_publish = on_publish
    client.on_connect = lambda *_: connected.set()
    client.connect(host, port)
    client.loop_start()
    connected.wait(10)
    conn.send("ready")
    start_at: float = conn.recv()
    time.sleep(max(0.0, start_at - time.time()))
    first = time.time()
    for i, (topic, payload) in enumerate(messages):
        if rate > 0:
            delay = start_at + (i * procs + index) / rate - time.time()
            if delay > 0:
                time.sleep(delay)
        client.publish(topic, payload, qos=1)
    last = time.time()
    all_acked.wait(600)
    conn.send({"first": first, "last": last, "sent": len(messages), "acked": acked})
    client.disconnect()
    client.loop_stop()


class Publishers:
    """``procs`` publisher processes, each with one paho client and its share of the messages."""

    def __init__(self, workdir: Path, messages: list[Message], procs: int) -> None:
        self.paths = []
        for i in range(procs):
            path = workdir / f"publisher-{i}.pickle"
            with open(path, "wb") as f:
                pickle.dump(messages[i::procs], f)
            self.paths.append(path)

    def run(self, host: str, port: int, rate: float = 0.0) -> dict[str, float]:
        """Publish every message; returns the first and last publish times (unix s) over all processes."""
        ctx = mp.get_context("spawn")
        pipes, procs = [], []
        for i, path in enumerate(self.paths):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_publisher, args=(host, port, str(path), i, len(self.paths), rate, child))
            p.start()
            pipes.append(parent)
            procs.append(p)
        for pipe in pipes:
            if not pipe.poll(60) or pipe.recv() != "ready":
                raise RuntimeError("a publisher did not connect")
        start_at = time.time() + 0.5
        for pipe in pipes:
            pipe.send(start_at)
        results = [pipe.recv() for pipe in pipes]
        for p in procs:
            p.join()
        if any(r["acked"] != r["sent"] for r in results):
            raise RuntimeError(f"the broker did not acknowledge every publish: {results}")
        return {"first": min(r["first"] for r in results), "last": max(r["last"] for r in results)}


# -- subscribers (one fresh child process per measurement) -------------------------------------------------------


class Subscriber(Protocol):
    def start(self) -> None: ...

    def wait_ready(self, timeout: float) -> bool: ...

    def connected_at(self) -> float | None: ...

    def done(self) -> int: ...

    def stop(self) -> None: ...


class BareSubscriber:
    """A paho client that only counts messages: QoS 1, persistent session, acked by paho after ``on_message``."""

    def __init__(self, url: str, client_id: str) -> None:
        self.count = 0
        self._connected_at: float | None = None
        self._ready = threading.Event()
        self._address = url.removeprefix("mqtt://").split(":")
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False, protocol=mqtt.MQTTv311
        )
        client.on_connect = self._on_connect
        client.on_subscribe = lambda *_: self._ready.set()
        client.on_message = self._on_message
        self._client = client

    def _on_connect(self, client: mqtt.Client, *_: Any) -> None:
        self._connected_at = time.time()
        client.subscribe([(protocol.subscription(protocol.DEFAULT_PREFIX, k), 1) for k in protocol.DEVICE_PUBLISHED])

    def _on_message(self, _c: mqtt.Client, _u: Any, _m: mqtt.MQTTMessage) -> None:
        self.count += 1

    def connected_at(self) -> float | None:
        return self._connected_at

    def start(self) -> None:
        self._client.connect_async(self._address[0], int(self._address[1]))
        self._client.loop_start()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def done(self) -> int:
        return self.count

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class IngestSubscriber:
    """What `fleet serve --ingest-workers N` runs: the fleet's ``Ingest`` (default batching) into a SQLite ``Store``,
    with telemetry in N worker processes on a shared subscription if N > 0; done counts committed and acked windows.
    """

    def __init__(self, url: str, client_id: str, db: Path, workers: int) -> None:
        from fleet.ingest.mqtt import Ingest
        from fleet.ingest.workers import TelemetryWorkers, WorkerSpec
        from fleet.store import open_store

        self.store = open_store(db)
        kinds = (Kind.STATUS, Kind.EVENTS) if workers else protocol.DEVICE_PUBLISHED
        self.ingest = Ingest(self.store, url, client_id=client_id, kinds=kinds)
        spec = WorkerSpec(db, url, protocol.DEFAULT_PREFIX, client_id, client_id, None, "WARNING")
        self.workers = TelemetryWorkers(spec, workers) if workers else None

    def start(self) -> None:
        if self.workers is not None:
            self.workers.start()
        self.ingest.start()

    def wait_ready(self, timeout: float) -> bool:
        ready = self.ingest.wait_ready(timeout)
        return ready and (self.workers is None or self.workers.wait_ready(timeout))

    def connected_at(self) -> float | None:
        stats = self.ingest.stats() if self.workers is None else self.workers.stats()
        return stats["connected_at"]  # type: ignore[no-any-return]

    def done(self) -> int:
        stored = int(self.ingest.stats()["stored"])
        return stored + (int(self.workers.stats()["stored"]) if self.workers is not None else 0)

    def stats(self) -> dict[str, Any]:
        stats = self.ingest.stats()
        return stats if self.workers is None else {"main": stats, "workers": self.workers.stats()}

    def stop(self) -> None:
        if self.workers is not None:
            self.workers.stop()
        self.ingest.stop()


def _cpu_s(path: str) -> float:
    """utime + stime from a /proc stat file."""
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_count(sub: Subscriber, expected: int, timeout: float) -> float | None:
    """Poll until ``expected`` messages are done; the unix time it was seen, or None on timeout."""
    deadline = time.monotonic() + timeout
    while sub.done() < expected:
        if time.monotonic() > deadline:
            return None
        time.sleep(POLL_S)
    return time.time()


def _subscriber_main(
    kind: str,
    url: str,
    client_id: str,
    db: str,
    task: str,
    expected: int,
    gc_mode: str,
    timeout: float,
    workers: int,
    conn: Connection,
) -> None:
    """One subscriber in a fresh process, so its heap is that of a process running only it (the collector's work
    grows with the heap). Sends "built", waits for "go", then per ``task``: "subscribe" (subscribe, go away), "drain"
    (time the drain of ``expected`` queued windows from start()), or "live" (send "ready" once subscribed, then
    wait for ``expected`` windows). Replies with the times, CPU per thread, and the store's count."""
    sub: Subscriber = (
        BareSubscriber(url, client_id) if kind == "bare" else IngestSubscriber(url, client_id, Path(db), workers)
    )
    if gc_mode == "freeze":
        gc.freeze()
    elif gc_mode == "off":
        gc.disable()
    conn.send("built")
    conn.recv()
    before = set(threading.enumerate())
    cpu = time.process_time()
    started = time.time()
    sub.start()
    if not sub.wait_ready(30):
        raise RuntimeError(f"{kind}: no SUBACK")
    # The drain is timed from the connection (the broker sends the queued windows from then on), not from start():
    # spawning the ingest's worker processes is start-up, not throughput.
    t0 = sub.connected_at() or started
    if task == "subscribe":
        sub.stop()
        conn.send({})
        return
    if task == "live":
        conn.send("ready")
    t1 = _wait_count(sub, expected, timeout)
    cpu = time.process_time() - cpu
    threads = {}
    for t in threading.enumerate():
        if t not in before and t.native_id is not None:
            with contextlib.suppress(OSError):
                threads[t.name.split("-bench")[0]] = round(_cpu_s(f"/proc/self/task/{t.native_id}/stat"), 2)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    sub.stop()
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers, reaped by stop()
    cpu += sum(getattr(children_after, f) - getattr(children, f) for f in ("ru_utime", "ru_stime"))
    result: dict[str, Any] = {
        "t0": t0,
        "t1": t1,
        "startup_s": round(t0 - started, 3),
        "cpu_s": round(cpu, 2),
        "thread_cpu_s": threads,
    }
    if isinstance(sub, IngestSubscriber):
        result["stored_in_db"] = sum(sub.store.window_counts().values())
        result["ingest_stats"] = sub.stats()
        sub.store.close()
    else:
        result["received"] = sub.done()
    conn.send(result)


class Bench:
    def __init__(
        self, workdir: Path, messages: list[Message], publishers: int, timeout: float, gc_mode: str, workers: int
    ) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-", dir=workdir))  # brokers and stores never reused
        self.workers = workers
        self.messages = messages
        self.publishers = publishers
        self.timeout = timeout
        self.gc_mode = gc_mode
        self._n = 0

    @contextlib.contextmanager
    def _broker(self) -> Iterator[Any]:
        from fleet.broker import MosquittoBroker

        self._n += 1
        broker = MosquittoBroker(self.workdir / f"broker-{self._n}")
        broker.start()
        try:
            yield broker
        finally:
            broker.stop()

    @contextlib.contextmanager
    def _subscriber(self, kind: str, url: str, client_id: str, task: str, expected: int) -> Iterator[Any]:
        """A subscriber process, built and waiting for "go"; yields (process, pipe)."""
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        db = str(self.workdir / f"fleet-{self._n}.db")
        args = (kind, url, client_id, db, task, expected, self.gc_mode, self.timeout, self.workers, child)
        proc = ctx.Process(target=_subscriber_main, args=args)
        proc.start()
        try:
            if not parent.poll(120) or parent.recv() != "built":
                raise RuntimeError(f"the {kind} subscriber did not start")
            yield proc, parent
        finally:
            proc.join(60)
            if proc.is_alive():
                proc.kill()

    @staticmethod
    def _reply(pipe: Connection, timeout: float) -> dict[str, Any]:
        if not pipe.poll(timeout):
            raise RuntimeError("the subscriber did not report")
        reply: dict[str, Any] = pipe.recv()
        return reply

    def saturation(self, kind: str, count: int, profile: Path | None = None) -> dict[str, Any]:
        """Publish ``count`` windows while the subscriber is away, then time its drain of the backlog."""
        messages = self.messages[:count]
        with self._broker() as broker:
            client_id = f"bench-{kind}-{uuid.uuid4().hex[:8]}"
            with self._subscriber(kind, broker.url, client_id, "subscribe", 0) as (_, pipe):
                pipe.send("go")
                self._reply(pipe, 30)
            Publishers(self.workdir, messages, self.publishers).run(broker.host, broker.port)
            with self._subscriber(kind, broker.url, client_id, "drain", len(messages)) as (proc, pipe):
                spy = _start_py_spy(proc.pid, profile) if profile else None
                broker_cpu = _cpu_s(f"/proc/{broker.proc.pid}/stat")
                pipe.send("go")
                r = self._reply(pipe, self.timeout + 60)
                broker_cpu = _cpu_s(f"/proc/{broker.proc.pid}/stat") - broker_cpu
        drain = None if r["t1"] is None else r["t1"] - r["t0"]
        result = {
            "windows": len(messages),
            "drain_s": None if drain is None else round(drain, 3),
            "windows_per_s": None if drain is None else round(len(messages) / drain, 1),
            "subscriber_cpu_s": r["cpu_s"],
            "subscriber_thread_cpu_s": r["thread_cpu_s"],
            "broker_cpu_s": round(broker_cpu, 2),
            **{k: r[k] for k in ("received", "stored_in_db", "ingest_stats") if k in r},
        }
        if spy is not None and profile is not None:
            spy.wait(30)
            result["profile"] = _py_spy_top(profile)
        return result

    def offered(self, kind: str, rate: float, seconds: float) -> dict[str, Any]:
        """Publish at ``rate`` windows/s for ``seconds`` to a live subscriber; stored rate and lag."""
        messages = self.messages[: int(rate * seconds)]
        with self._broker() as broker:
            client_id = f"bench-{kind}-{uuid.uuid4().hex[:8]}"
            with self._subscriber(kind, broker.url, client_id, "live", len(messages)) as (_, pipe):
                pipe.send("go")
                if self._reply(pipe, 30) != "ready":  # type: ignore[comparison-overlap]
                    raise RuntimeError(f"the {kind} subscriber did not subscribe")
                broker_cpu = _cpu_s(f"/proc/{broker.proc.pid}/stat")
                sent = Publishers(self.workdir, messages, self.publishers).run(broker.host, broker.port, rate)
                r = self._reply(pipe, self.timeout + 60)
                broker_cpu = _cpu_s(f"/proc/{broker.proc.pid}/stat") - broker_cpu
        last = r["t1"]
        return {
            "windows": len(messages),
            "published_per_s": round(len(messages) / (sent["last"] - sent["first"]), 1),
            "stored_per_s": None if last is None else round(len(messages) / (last - sent["first"]), 1),
            "lag_s": None if last is None else round(last - sent["last"], 3),
            "subscriber_cpu_s": r["cpu_s"],
            "subscriber_thread_cpu_s": r["thread_cpu_s"],
            "broker_cpu_s": round(broker_cpu, 2),
            **{k: r[k] for k in ("received", "stored_in_db", "ingest_stats") if k in r},
        }


# -- profiling and component costs -------------------------------------------------------------------------------


def _start_py_spy(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    """Sample the subscriber process's GIL holder with py-spy (pip install py-spy), if it is installed."""
    binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(binary).exists():
        print("py-spy is not installed: no profile", file=sys.stderr)
        return None
    command = [binary, "record", "--gil", "--rate", "250", "--format", "raw", "--pid", str(pid), "-o", str(out)]
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached before the drain starts
    return spy


def _py_spy_top(path: Path, n: int = 20) -> dict[str, list[tuple[str, float]]]:
    """Share of GIL-holding samples by function: own (leaf) and inclusive, from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
            if not any("Thread._bootstrap" in frame for frame in frames):
                continue  # the main thread only polls for the end
            n_samples = int(count)
            total += n_samples
            own[frames[-1]] += n_samples
            for frame in set(frames):
                if "(threading.py)" not in frame:
                    inclusive[frame] += n_samples

    def share(counts: Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(v / total * 100, 1)) for k, v in counts.most_common(n)] if total else []

    return {"own_percent": share(own), "inclusive_percent": share(inclusive)}


def _components_main(path: str, conn: Connection) -> None:
    """Single-threaded costs of the ingest's stages in a fresh process, µs per window, best of three passes:
    decoding a payload, and storing decoded windows with their payloads in batches of 100 into a fresh store (as
    the ingest does, at most a batch of decoded windows is alive at a time)."""
    from fleet.store import open_store

    with open(path, "rb") as f:
        sample: list[Message] = pickle.load(f)
    decode_s, store_s = [], []
    for i in range(3):
        store = open_store(Path(path).with_name(f"components-{i}.db"))
        decode = write = 0.0
        for j in range(0, len(sample), 100):
            payloads = [payload for _, payload in sample[j : j + 100]]
            start = time.perf_counter()
            batch = [protocol.decode(Kind.TELEMETRY, payload) for payload in payloads]
            decode += time.perf_counter() - start
            start = time.perf_counter()
            store.write_batch(windows=batch, payloads=payloads)
            write += time.perf_counter() - start
        store.close()
        decode_s.append(decode)
        store_s.append(write)
    conn.send(
        {
            "decode_us": round(min(decode_s) / len(sample) * 1e6, 1),
            "store_us": round(min(store_s) / len(sample) * 1e6, 1),
        }
    )


def components(messages: list[Message], workdir: Path, n: int = 2000) -> dict[str, float]:
    path = workdir / "components.pickle"
    with open(path, "wb") as f:
        pickle.dump(messages[:n], f)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_components_main, args=(str(path), child))
    proc.start()
    result: dict[str, float] = parent.recv()
    proc.join()
    return result


def machine() -> dict[str, Any]:
    import sqlite3

    paho = mqtt.__version__ if hasattr(mqtt, "__version__") else "?"
    return {**benchinfo.machine(), "paho_mqtt": paho, "sqlite": sqlite3.sqlite_version}


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r[key] is not None]
    return round(statistics.median(values), 1) if len(values) == len(runs) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def run(args: argparse.Namespace, models: Path, workdir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    rates = [float(r) for r in args.rates.split(",") if r]
    total = max([args.messages, *(int(r * args.seconds) for r in rates)])
    say(f"encoding {total} windows for {args.devices} devices ...")
    started = time.perf_counter()
    messages = make_payloads(models, args.devices, total, args.rows, args.bodies, args.seed)
    sizes = [len(p) for _, p in messages]
    result: dict[str, Any] = {
        "machine": machine(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "models")},
        "payload": {
            "windows": total,
            "wire_bytes_mean": round(statistics.mean(sizes)),
            "json_bytes_mean": round(statistics.mean(len(protocol._inflate(p)) for _, p in messages[:500])),
            "encode_s": round(time.perf_counter() - started, 1),
        },
        "components": components(messages, workdir),
    }
    bench = Bench(workdir, messages, args.publishers, args.timeout, args.gc, args.workers)
    runs: dict[str, list[dict[str, Any]]] = {"bare": [], "ingest": []}
    for i in range(args.repeat):
        for kind in ("bare", "ingest"):
            r = bench.saturation(kind, args.messages)
            say(f"saturation {i + 1}/{args.repeat} {kind}: {r['windows_per_s']} windows/s")
            runs[kind].append(r)
    bare, ingest = _median(runs["bare"], "windows_per_s"), _median(runs["ingest"], "windows_per_s")
    result["saturation"] = {"runs": runs, "bare_per_s": bare, "ingest_per_s": ingest, "ratio": _ratio(ingest, bare)}
    result["offered"] = []
    for rate in rates:
        row: dict[str, Any] = {"rate": rate, "seconds": args.seconds}
        for kind in ("bare", "ingest"):
            row[kind] = bench.offered(kind, rate, args.seconds)
            say(f"offered {rate:.0f}/s {kind}: lag {row[kind]['lag_s']} s")
        row["ratio"] = _ratio(row["ingest"]["stored_per_s"], row["bare"]["stored_per_s"])
        result["offered"].append(row)
    if args.profile:
        say("profiling one more ingest drain (py-spy, GIL holder) ...")
        result["profile"] = bench.saturation("ingest", args.messages, profile=workdir / "py-spy.txt")
    result["machine"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    ratio = result["saturation"]["ratio"]
    result["target"] = {"ratio_min": TARGET_RATIO, "met": ratio is not None and ratio >= TARGET_RATIO}
    return result


def print_table(result: dict[str, Any]) -> None:
    m, p, c = result["machine"], result["payload"], result["components"]
    print(f"{m['cpu']}, {m['nproc']} CPUs, load {m['load_before']} -> {m['load_after']}; {m['mosquitto']}")
    print(
        f"payload: {p['wire_bytes_mean']} B on the wire ({p['json_bytes_mean']} B JSON); "
        f"decode {c['decode_us']} µs, store {c['store_us']} µs per window (one thread, batches of 100)"
    )
    s = result["saturation"]
    print(f"\n(a) saturation: drain a backlog of {s['runs']['bare'][0]['windows']} windows")
    print(f"{'subscriber':<10} {'run':>3} {'drain s':>8} {'windows/s':>10} {'sub CPU s':>10} {'broker CPU s':>13}")
    for kind in ("bare", "ingest"):
        for i, r in enumerate(s["runs"][kind]):
            print(
                f"{kind:<10} {i + 1:>3} {r['drain_s']!s:>8} {r['windows_per_s']!s:>10} "
                f"{r['subscriber_cpu_s']:>10.2f} {r['broker_cpu_s']:>13.2f}"
            )
    print(f"median: bare {s['bare_per_s']}/s, ingest {s['ingest_per_s']}/s, ratio {s['ratio']}")
    for kind in ("bare", "ingest"):
        threads = ", ".join(f"{n} {c} s" for n, c in s["runs"][kind][-1]["subscriber_thread_cpu_s"].items())
        print(f"CPU by thread, last {kind} run: {threads}")
    print("\n(b) offered load")
    print(f"{'rate/s':>7} {'subscriber':<10} {'published/s':>11} {'stored/s':>9} {'lag s':>7} {'sub CPU s':>10}")
    for row in result["offered"]:
        for kind in ("bare", "ingest"):
            r = row[kind]
            print(
                f"{row['rate']:>7.0f} {kind:<10} {r['published_per_s']:>11} {r['stored_per_s']!s:>9} "
                f"{r['lag_s']!s:>7} {r['subscriber_cpu_s']:>10.2f}"
            )
    if result.get("profile", {}).get("profile"):
        prof = result["profile"]
        print(
            f"\nprofiled ingest drain ({prof['windows_per_s']} windows/s under py-spy), share of GIL-holding samples:"
        )
        for title, key in (("own", "own_percent"), ("inclusive", "inclusive_percent")):
            print(f"  {title}:")
            for name, pct in prof["profile"][key][:15]:
                print(f"    {pct:>5.1f}%  {name}")
    t = result["target"]
    print(f"\nratio ingest/bare >= {t['ratio_min']}: {'met' if t['met'] else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, help="folder from `fleet model example` (default: build one)")
    parser.add_argument("--messages", type=int, default=20_000, help="backlog size for (a)")
    parser.add_argument("--devices", type=int, default=200, help="distinct device ids")
    parser.add_argument("--publishers", type=int, default=4, help="publisher processes (one client each)")
    parser.add_argument("--rates", default="500,2000", help="offered loads for (b), windows/s, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each offered load")
    parser.add_argument("--repeat", type=int, default=3, help="saturation runs per subscriber (median counts)")
    parser.add_argument("--rows", type=int, default=600, help="inferences per window (60 s at 10/s)")
    parser.add_argument("--bodies", type=int, default=2, help="distinct window bodies per device")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300.0, help="give up on a drain after this long, s")
    parser.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_INGEST_WORKERS,
        help="telemetry ingest worker processes, as `fleet serve --ingest-workers` (0: all in one process)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="add one ingest drain sampled by py-spy (the subscriber process only: use it with --workers 0)",
    )
    parser.add_argument(
        "--gc",
        choices=("default", "freeze", "off"),
        default="default",
        help="diagnostic: gc.freeze() or gc.disable() in the subscriber processes after start-up",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if args.messages > BROKER_MAX_QUEUED:
        parser.error(f"--messages over the broker's max_queued_messages ({BROKER_MAX_QUEUED}) would be dropped")

    from agent import logs

    logs.setup("WARNING")
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.json else print
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-ingest-") as tmp:
        models = args.models
        if models is None:
            from fleet.examples.modelgen import build_example

            say("building the good digits example ...")
            models = Path(tmp) / "good"
            build_example(models, "good")
        result = run(args, models, Path(tmp), say)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print()
        print_table(result)


if __name__ == "__main__":
    main()
