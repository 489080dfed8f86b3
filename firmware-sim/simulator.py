"""Run a fleet of real agent cores in one process, on one reactor thread.

Every simulated device is the real :class:`agent.core.AgentCore` (runtime, telemetry, outbox, MQTT link) with
its own state folder and its own MQTT connection. Devices that run the same model file share one loaded
runtime session (read-only, thread-safe) so hundreds of devices fit in memory; everything else is per device.
"""

from __future__ import annotations

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
from agent.config import AgentConfig, ModelConfig
from agent.core import AgentCore
from agent.logs import event
from agent.protocol import DEFAULT_PREFIX, Kind
from agent.reactor import Reactor, Timer
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
    id_prefix: str = "sim"


class SharedModels:
    """Loads each model file once for the whole simulated fleet."""

    def __init__(self) -> None:
        self._models: dict[Path, runtime.Model] = {}
        self._lock = threading.Lock()

    def load(self, cfg: ModelConfig) -> runtime.Model:
        with self._lock:
            if cfg.path not in self._models:
                self._models[cfg.path] = runtime.load_model(cfg.path, threads=1)
            return self._models[cfg.path]

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
    timer: Timer | None = None
    inferences: int = 0
    errors: int = 0

    def tick(self) -> None:
        frame, _label = self.sensor.read()
        try:
            self.core.predict(MODEL_NAME, frame)
        except runtime.RuntimeLayerError:
            self.errors += 1
        self.inferences += 1

    def report(self) -> dict[str, Any]:
        stats = self.core.outbox.stats()
        return {
            "device_id": self.core.device_id,
            "windows_produced": self.core.windows_produced,
            "windows_acked": self.core.link.acked[Kind.TELEMETRY],
            "windows_dropped": stats["dropped_total"],
            "inferences": self.inferences,
            "errors": self.errors,
            "connects": self.core.link.connects,
            "queued": stats["rows"],
        }


@dataclass
class Simulation:
    settings: SimSettings
    reactor: Reactor = field(default_factory=Reactor)
    devices: list[SimDevice] = field(default_factory=list)

    def __post_init__(self) -> None:
        s = self.settings
        self._models = SharedModels()
        frames, labels = held_out_digits(s.seed)
        rng = np.random.default_rng(s.seed)
        broker = BrokerAddress.parse(s.broker)
        model = ModelConfig(
            name=MODEL_NAME, path=s.model_dir / s.model_file, card=s.model_dir / "card.json", release=s.release
        )
        for i in range(s.devices):
            device_id = f"{s.id_prefix}-{i:04d}"
            config = AgentConfig(
                device_id=device_id,
                state_dir=s.state_root / device_id,
                broker=broker,
                prefix=s.prefix,
                window_s=s.window_s,
                reconnect_max_s=s.reconnect_max_s,
                models=(model,),
            )
            core = AgentCore(
                config,
                self.reactor,
                loader=lambda cfg: _Unclosable(self._models.load(cfg)),
                rng=random.Random(s.seed * 100_003 + i),
            )
            self.devices.append(SimDevice(core, DigitsSensor(frames, labels, rng)))

    def start(self) -> None:
        """Bring devices up spread over one second, as a real fleet never starts in the same millisecond."""
        rng = random.Random(self.settings.seed)
        for device in self.devices:
            device.core.start()
            device.timer = self.reactor.call_every(
                1.0 / self.settings.rate_hz, device.tick, first_delay=rng.uniform(0, 1.0)
            )
        event(log, "sim_started", devices=len(self.devices), broker=self.settings.broker)

    def finish(self) -> None:
        """Stop the sensors, close every window, wait for the outboxes to drain, disconnect."""
        for device in self.devices:
            if device.timer:
                device.timer.cancel()
            device.core.finish_windows()
        drained = self.reactor.run_until(
            lambda: all(d.core.outbox.stats()["rows"] == 0 for d in self.devices), self.settings.drain_timeout_s
        )
        if not drained:
            event(log, "sim_drain_timeout", logging.WARNING, queued=sum(d.report()["queued"] for d in self.devices))

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
                for key in ("windows_produced", "windows_acked", "windows_dropped", "inferences", "errors")
            },
            "elapsed_s": round(elapsed_s, 2),
            "seed": self.settings.seed,
        }
