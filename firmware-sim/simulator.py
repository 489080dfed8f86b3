"""Run a fleet of real agent cores in one process, on one reactor thread.

Every simulated device is the real :class:`agent.core.AgentCore` (runtime, telemetry, outbox, MQTT link) with
its own state folder and its own MQTT connection. Enrolled with a fleet (``SimSettings.updates``, from
:mod:`firmware_sim.enrollment`), each also runs the real update path, as ``edge-agent run`` does: its own installer
thread, TUF client, slots, smoke-test child processes and probation fed by its simulated traffic. Devices that run
the same model bytes share one loaded runtime session (read-only, thread-safe) so hundreds of devices fit in memory;
everything else is per device.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent import runtime
from agent.broker_address import BrokerAddress
from agent.config import AgentConfig, ModelConfig, UpdateConfig
from agent.core import AgentCore
from agent.logs import event
from agent.protocol import DEFAULT_PREFIX, Kind
from agent.reactor import Reactor, Timer
from firmware_sim.drift import Drift, DriftingFrames
from firmware_sim.sensors import DigitsSensor, held_out_digits

log = logging.getLogger(__name__)

MODEL_NAME = "digits"


@dataclass(frozen=True)
class SimSettings:
    devices: int
    broker: str
    state_root: Path
    model_dir: Path
    duration_s: float
    seed: int = 0
    window_s: float = 60.0
    rate_hz: float = 2.0
    prefix: str = DEFAULT_PREFIX
    model_file: str = "int8.onnx"
    release: str = "digits:1.0.0"
    reconnect_max_s: float = 10.0
    drain_timeout_s: float = 60.0
    #: How long the drain waits for a first connection when no device has reached the broker during the run.
    first_connect_s: float = 2.0
    id_prefix: str = "sim"
    #: The share of predictions whose true label each device sends back (the agent's feedback path).
    feedback_share: float = 0.0
    #: Sensor drift every device gets (:mod:`firmware_sim.drift`), each from its start into the run.
    drifts: tuple[Drift, ...] = ()
    #: Each enrolled device's ``[update]`` (by device id): those devices install what the fleet assigns them.
    updates: dict[str, UpdateConfig] = field(default_factory=dict)
    #: ``(index, count)``: this process runs every ``count``-th device of the fleet from ``index`` (``--shards``).
    #: A device behaves the same in any shard: its seeds come from its place in the whole fleet.
    shard: tuple[int, int] = (0, 1)

    def device_ids(self) -> list[str]:
        """The whole fleet's device ids, in every shard."""
        return device_ids(self.id_prefix, self.devices)

    def in_shard(self, index: int) -> bool:
        """Whether the fleet's ``index``-th device runs in this process."""
        return index % self.shard[1] == self.shard[0]


def device_ids(id_prefix: str, devices: int) -> list[str]:
    """A run's device ids: ID_PREFIX-0000, ID_PREFIX-0001, ..."""
    return [f"{id_prefix}-{i:04d}" for i in range(devices)]


class SharedModels:
    """Loads each model once for the whole simulated fleet: by its bytes' sha256 and runtime, so the copies of one
    release installed in every device's own state folder share one session."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, str | None], runtime.Model] = {}
        self._lock = threading.Lock()

    def load(self, cfg: ModelConfig) -> runtime.Model:
        try:
            key = (hashlib.sha256(cfg.path.read_bytes()).hexdigest(), cfg.runtime)
        except OSError:  # the runtime layer says it in its own words
            return runtime.load_model(cfg.path, threads=1, runtime=cfg.runtime)
        with self._lock:
            if key not in self._models:
                self._models[key] = runtime.load_model(cfg.path, threads=1, runtime=cfg.runtime)
            return self._models[key]

    def close(self) -> None:
        for model in self._models.values():
            model.close()


class _Unclosable:
    """Hands a shared model to one core; the core's close() must not close it for the others."""

    def __init__(self, model: runtime.Model) -> None:
        self._model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def close(self) -> None:
        return None


@dataclass
class SimDevice:
    core: AgentCore
    sensor: DigitsSensor
    #: Decides which predictions get their true label back (``feedback_share`` of them), per device and seeded.
    rng: random.Random
    drift: DriftingFrames
    started: float = 0.0
    feedback_share: float = 0.0
    timer: Timer | None = None
    inferences: int = 0
    errors: int = 0
    labelled: int = 0

    def tick(self) -> None:
        frame, label = self.sensor.read()
        frame, label = self.drift.apply(frame, label, time.monotonic() - self.started, self.sensor.rng)
        self.inferences += 1
        try:
            if not self.feedback_share:
                self.core.predict(MODEL_NAME, frame)
                return
            answer = self.core.infer(MODEL_NAME, frame)
        except runtime.RuntimeLayerError:
            self.errors += 1
            return
        if self.rng.random() < self.feedback_share:
            self.core.feedback(answer.prediction_ids[0], label, MODEL_NAME)
            self.labelled += 1

    def report(self) -> dict[str, Any]:
        stats = self.core.outbox.stats()
        return {
            "device_id": self.core.device_id,
            "windows_produced": self.core.windows_produced,
            "windows_acked": self.core.link.acked[Kind.TELEMETRY],
            "windows_dropped": stats["dropped_total"],
            "inferences": self.inferences,
            "errors": self.errors,
            "labelled": self.labelled,
            "connects": self.core.link.connects,
            "queued": stats["rows"],
        }


@dataclass
class Simulation:
    settings: SimSettings
    reactor: Reactor = field(default_factory=Reactor)
    devices: list[SimDevice] = field(default_factory=list)
    #: Called with 1 each time a device is set up (a progress bar's update).
    progress: Callable[[int], None] | None = None

    def __post_init__(self) -> None:
        s = self.settings
        self._models = SharedModels()
        frames, labels = held_out_digits(s.seed)
        rng = np.random.default_rng(s.seed)
        broker = BrokerAddress.parse(s.broker)
        model = ModelConfig(
            name=MODEL_NAME, path=s.model_dir / s.model_file, card=s.model_dir / "card.json", release=s.release
        )
        for i, device_id in enumerate(s.device_ids()):
            if not s.in_shard(i):
                continue
            config = AgentConfig(
                device_id=device_id,
                state_dir=s.state_root / device_id,
                broker=broker,
                prefix=s.prefix,
                window_s=s.window_s,
                reconnect_max_s=s.reconnect_max_s,
                models=(model,),
                update=s.updates.get(device_id),
            )
            core = AgentCore(
                config,
                self.reactor,
                loader=lambda cfg: _Unclosable(self._models.load(cfg)),
                rng=random.Random(s.seed * 100_003 + i),
            )
            feedback_rng = random.Random(s.seed * 100_003 + i + 7)
            drift = DriftingFrames(s.drifts, frames, labels)
            sensor = DigitsSensor(frames, labels, rng)
            self.devices.append(SimDevice(core, sensor, feedback_rng, drift, feedback_share=s.feedback_share))
            if self.progress:
                self.progress(1)

    def start(self) -> None:
        """Bring devices up spread over one second, as a real fleet never starts in the same millisecond."""
        rng = random.Random(self.settings.seed)
        started = time.monotonic()
        for device in self.devices:
            device.started = started
            device.core.start()
            device.timer = self.reactor.call_every(
                1.0 / self.settings.rate_hz, device.tick, first_delay=rng.uniform(0, 1.0)
            )
        event(log, "sim_started", devices=len(self.devices), broker=self.settings.broker)

    @property
    def reached_broker(self) -> bool:
        """Whether any device has connected to the broker in this run."""
        return any(d.core.link.connects for d in self.devices)

    def finish(self) -> None:
        """Stop the sensors, close every window, wait for the outboxes to drain.

        The wait ends when every outbox is empty, after ``drain_timeout_s``, or when nothing can be delivered: no
        device has been connected for ``reconnect_max_s`` (a full reconnect backoff, so every device tried again),
        or for ``first_connect_s`` when none has reached the broker in the whole run.
        """
        s = self.settings
        for device in self.devices:
            if device.timer:
                device.timer.cancel()
            device.core.finish_windows()
        last_connected = time.monotonic()

        def drained_or_stuck() -> bool:
            nonlocal last_connected
            if all(d.core.outbox.stats()["rows"] == 0 for d in self.devices):
                return True
            now = time.monotonic()
            if any(d.core.link.connected for d in self.devices):
                last_connected = now
            return now - last_connected >= (s.reconnect_max_s if self.reached_broker else s.first_connect_s)

        self.reactor.run_until(drained_or_stuck, s.drain_timeout_s)
        queued = sum(d.core.outbox.stats()["rows"] for d in self.devices)
        if queued:
            event(log, "sim_drain_timeout", logging.WARNING, queued=queued, reached_broker=self.reached_broker)

    def close(self) -> None:
        for device in self.devices:
            device.core.close(timeout=2.0)
        self._models.close()
        self.reactor.close()

    def run(self, until: Callable[[], bool] | None = None) -> dict[str, Any]:
        started = time.monotonic()
        self.start()
        deadline = started + self.settings.duration_s
        while time.monotonic() < deadline and not (until and until()):
            self.reactor.run_once(max_wait=min(0.5, max(0.0, deadline - time.monotonic())))
        self.finish()
        report = self.report(time.monotonic() - started)
        self.close()
        return report

    def report(self, elapsed_s: float) -> dict[str, Any]:
        devices = [d.report() for d in self.devices]
        return {
            "devices": devices,
            "totals": {
                key: sum(d[key] for d in devices)
                for key in ("windows_produced", "windows_acked", "windows_dropped", "inferences", "errors", "labelled")
            },
            "elapsed_s": round(elapsed_s, 2),
            "seed": self.settings.seed,
        }
