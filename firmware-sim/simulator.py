"""Run a fleet of real agent cores in one process, on one reactor thread.

Every simulated device is the real :class:`agent.core.AgentCore` (runtime, telemetry, outbox, MQTT link) with
its own state folder and its own MQTT connection. Enrolled with a fleet (``SimSettings.updates``, from
:mod:`firmware_sim.enrollment`), each also runs the real update path, as ``edge-agent run`` does: its own installer
thread, TUF client, slots, smoke-test child processes and probation fed by its simulated traffic. Devices that run
the same model bytes share one loaded runtime session (read-only, thread-safe) so hundreds of devices fit in memory;
everything else is per device.

Each device gets what its plan says (``SimSettings.plan``, from a scenario: :mod:`firmware_sim.scenario`): drift in
its sensor, network faults through the run's proxy, a skewed clock, a silent spell, and power cuts at an install
state, after which it boots again from its state folder (:mod:`firmware_sim.power`). Its report puts that plan, the
ground truth, beside what it produced, sent and had acknowledged, summed over its boots.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
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
from agent.update import smoke
from agent.update.states import State
from firmware_sim.drift import Drift, DriftingFrames
from firmware_sim.faults import DeviceFaults, RunClock, armed, device_clock
from firmware_sim.netfaults import Proxy
from firmware_sim.power import PowerSwitch, drop, quiet_power_cuts
from firmware_sim.scenario import DevicePlan
from firmware_sim.sensors import DigitsSensor, held_out_digits

log = logging.getLogger(__name__)

MODEL_NAME = "digits"
#: How often the reactor looks for devices whose power was cut, to start them again.
POWER_WATCH_S = 0.2
#: The report's totals: sums over the devices.
TOTALS = ("windows_produced", "windows_acked", "windows_dropped", "events_acked", "messages_sent", "inferences",
          "errors", "labelled", "boots")  # fmt: skip


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
    #: What each device gets from the scenario (by device id): tags, drift, faults; none for a device not in it.
    plan: Mapping[str, DevicePlan] = field(default_factory=dict)
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
    """One simulated device: its agent core (a new one after each power cut), sensor, drift and faults."""

    core: AgentCore
    sensor: DigitsSensor
    #: Decides which predictions get their true label back (``feedback_share`` of them), per device and seeded.
    rng: random.Random
    drift: DriftingFrames
    faults: DeviceFaults
    run: RunClock
    #: Builds the device's core again after a power cut: the same config and state folder, a new boot.
    make_core: Callable[[Callable[[State], None] | None], AgentCore]
    switch: PowerSwitch | None = None
    feedback_share: float = 0.0
    timer: Timer | None = None
    inferences: int = 0
    errors: int = 0
    labelled: int = 0
    #: Each power cut: the install state it landed on and when (seconds into the run).
    power_cuts: list[dict[str, Any]] = field(default_factory=list)
    #: What the cores lost to power cuts had counted.
    past: Counter[str] = field(default_factory=Counter)

    def tick(self) -> None:
        frame, label = self.sensor.read()
        frame, label = self.drift.apply(frame, label, self.run.elapsed(), self.sensor.rng)
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

    def note_power_cut(self, switch: PowerSwitch) -> None:
        state, at = switch.cut_state, switch.cut_at
        since = at - self.run.started if at is not None and self.run.started is not None else self.run.elapsed()
        self.power_cuts.append({"state": state.value if state else None, "at_s": round(since, 3)})

    def power_cycle(self) -> None:
        """The power came back after a cut: drop what the process held, start again from what is on disk (reactor
        thread). The switch stays tripped, so the new core is never cut again by it."""
        self.past.update(self._counts())
        drop(self.core)
        self.core = self.make_core(None)
        self.core.start()
        self.faults.restarted(self.core.link)

    def _counts(self) -> Counter[str]:
        link = self.core.link
        return Counter({"windows_produced": self.core.windows_produced, "windows_acked": link.acked[Kind.TELEMETRY],
                        "events_acked": link.acked[Kind.EVENTS], "messages_sent": link.sent,
                        "connects": link.connects})  # fmt: skip

    def report(self) -> dict[str, Any]:
        """What the device got (its plan: the ground truth) beside what it produced, sent and had acknowledged."""
        stats = self.core.outbox.stats()
        counts = self._counts() + self.past
        served = self.core.serving(MODEL_NAME)
        return {
            "device_id": self.core.device_id,
            **self.faults.plan.to_json(),
            "power_cuts": self.power_cuts,
            "network": self.faults.network(),
            "boots": 1 + len(self.power_cuts),
            "silent_at_end": self.faults.plan.silent_at(self.run.elapsed()),
            "release": served.release if served else None,
            **{key: counts[key] for key in ("windows_produced", "windows_acked", "events_acked", "messages_sent")},
            "windows_dropped": stats["dropped_total"],
            "inferences": self.inferences,
            "errors": self.errors,
            "labelled": self.labelled,
            "connects": counts["connects"],
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
        self.run_clock = RunClock()
        frames, labels = held_out_digits(s.seed)
        broker = BrokerAddress.parse(s.broker)
        model = ModelConfig(
            name=MODEL_NAME, path=s.model_dir / s.model_file, card=s.model_dir / "card.json", release=s.release
        )
        plans = {d: s.plan.get(d, DevicePlan()) for i, d in enumerate(s.device_ids()) if s.in_shard(i)}
        if s.updates:  # hundreds of devices may install at once: fork their smoke tests from a preloaded server
            smoke.prefork()
        self.proxy = Proxy().start() if any(p.network_faults for p in plans.values()) else None
        for i, device_id in enumerate(s.device_ids()):
            if not s.in_shard(i):
                continue
            plan = replace(plans[device_id], drifts=s.drifts + plans[device_id].drifts)
            faults = DeviceFaults(device_id, plan, self.proxy, self.run_clock)
            config = AgentConfig(
                device_id=device_id,
                state_dir=s.state_root / device_id,
                broker=faults.broker(broker),
                prefix=s.prefix,
                window_s=s.window_s,
                reconnect_max_s=s.reconnect_max_s,
                models=(model,),
                update=faults.update(s.updates.get(device_id)),
            )
            clock = device_clock(plan, self.run_clock)
            make_core = self._core_maker(config, random.Random(s.seed * 100_003 + i), clock)
            cuts = plan.of("power_loss")
            switch = PowerSwitch(State(cuts[0].state)) if cuts and config.update else None
            fault_point = armed(switch, cuts[0].fault.start_s, self.run_clock) if switch else None
            rng = np.random.default_rng([s.seed, i])
            device = SimDevice(
                core=make_core(fault_point),
                sensor=DigitsSensor(frames, labels, rng),
                rng=random.Random(s.seed * 100_003 + i + 7),
                drift=DriftingFrames(plan.drifts, frames, labels),
                faults=faults,
                run=self.run_clock,
                make_core=make_core,
                switch=switch,
                feedback_share=s.feedback_share,
            )
            self.devices.append(device)
            if self.progress:
                self.progress(1)

    def _core_maker(
        self, config: AgentConfig, rng: random.Random, clock: Callable[[], float]
    ) -> Callable[[Callable[[State], None] | None], AgentCore]:
        def make(fault_point: Callable[[State], None] | None) -> AgentCore:
            return AgentCore(config, self.reactor, loader=lambda cfg: _Unclosable(self._models.load(cfg)),
                             clock=clock, rng=rng, fault_point=fault_point)  # fmt: skip

        return make

    def start(self) -> None:
        """Bring devices up spread over one second, as a real fleet never starts in the same millisecond; arm the
        scenario's faults from now."""
        rng = random.Random(self.settings.seed)
        self.run_clock.start()
        for device in self.devices:
            device.core.start()
            device.faults.arm(self.reactor, lambda d=device: d.core.link)  # type: ignore[misc]
            device.timer = self.reactor.call_every(
                1.0 / self.settings.rate_hz, device.tick, first_delay=rng.uniform(0, 1.0)
            )
        if any(d.switch for d in self.devices):
            quiet_power_cuts()
            self.reactor.call_every(POWER_WATCH_S, self._restore_power)
        event(log, "sim_started", devices=len(self.devices), broker=self.settings.broker)

    def _restore_power(self) -> None:
        """Boot again each device whose power was cut: queued, so what its dead worker handed the reactor before the
        cut runs first (:func:`firmware_sim.power.drop`)."""
        for device in self.devices:
            if device.switch is not None and device.switch.tripped.is_set() and not device.power_cuts:
                device.note_power_cut(device.switch)
                self.reactor.call_soon_threadsafe(device.power_cycle)

    @property
    def reached_broker(self) -> bool:
        """Whether any device has connected to the broker in this run."""
        return any(d.core.link.connects or d.past["connects"] for d in self.devices)

    def finish(self) -> None:
        """Stop the sensors, lift the network faults, close every window, wait for the outboxes to drain.

        A device silent at the end owes nothing and is not waited for. The wait ends when every other outbox is
        empty, after ``drain_timeout_s``, or when nothing can be delivered: no device has been connected for
        ``reconnect_max_s`` (a full reconnect backoff, so every device tried again), or for ``first_connect_s`` when
        none has reached the broker in the whole run.
        """
        s = self.settings
        for device in self.devices:
            if device.timer:
                device.timer.cancel()
            device.faults.lift()
            device.core.finish_windows()
        owing = [d for d in self.devices if not d.faults.plan.silent_at(self.run_clock.elapsed())]
        last_connected = time.monotonic()

        def drained_or_stuck() -> bool:
            nonlocal last_connected
            if all(d.core.outbox.stats()["rows"] == 0 for d in owing):
                return True
            now = time.monotonic()
            if any(d.core.link.connected for d in owing):
                last_connected = now
            return now - last_connected >= (s.reconnect_max_s if self.reached_broker else s.first_connect_s)

        self.reactor.run_until(drained_or_stuck, s.drain_timeout_s)
        queued = sum(d.core.outbox.stats()["rows"] for d in owing)
        if queued:
            event(log, "sim_drain_timeout", logging.WARNING, queued=queued, reached_broker=self.reached_broker)

    def close(self) -> None:
        for device in self.devices:
            device.core.close(timeout=2.0)
        if self.proxy is not None:
            self.proxy.close()
        self._models.close()
        self.reactor.close()

    def run(
        self, until: Callable[[], bool] | None = None, on_start: Callable[[], None] | None = None
    ) -> dict[str, Any]:
        """Start the devices (then call ``on_start``), run until the duration ends or ``until()``, drain, report."""
        started = time.monotonic()
        self.start()
        if on_start is not None:
            on_start()
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
            "totals": {key: sum(d[key] for d in devices) for key in TOTALS},
            "elapsed_s": round(elapsed_s, 2),
            "seed": self.settings.seed,
        }
