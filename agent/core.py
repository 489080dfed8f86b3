"""The agent core: models, telemetry windows, the outbox and the MQTT link, wired together on one reactor.

The daemon (`edge-agent run`) runs one core on its own reactor; the simulator runs hundreds of cores on one
shared reactor. Inference may be called from any thread; everything else runs on the reactor thread, except
installs, which run on the installer's worker thread (agent/update/) when agent.toml has an ``[update]`` table.
The core is the installer's :class:`~agent.update.host.InstallHost`: the installer sees it through that protocol only.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent import __version__, protocol, runtime
from agent.config import AgentConfig, ModelConfig
from agent.files import is_disk_full, write_atomic
from agent.health import HealthSampler
from agent.link import Backoff, MqttLink, new_boot_id
from agent.logs import event
from agent.outbox import Outbox
from agent.protocol import Kind
from agent.reactor import Reactor, Timer
from agent.telemetry import Totals, WindowAggregator
from agent.update.install import Installer
from agent.update.states import State

log = logging.getLogger(__name__)

ModelLoader = Callable[[ModelConfig], runtime.Model]

#: How many recent predictions keep their id for feedback; older ids are forgotten first.
RECENT_PREDICTIONS = 10_000

#: How often the reactor folds queued inferences into the window's histograms.
DRAIN_INTERVAL_S = 0.25


class UnknownModel(KeyError):
    """Inference was asked of a model this agent does not serve."""


class CardError(runtime.UnsupportedModel, ValueError):
    """A model's card cannot be read, or does not fit the model: the fix is the card, not the model file.

    An :class:`~agent.runtime.UnsupportedModel` (the model cannot be served as described: an install's activation
    fails with it) and a ValueError (a bad value in a file), as an unreadable card always was.
    """


def load_configured(cfg: ModelConfig) -> runtime.Model:
    return runtime.load_model(cfg.path, threads=cfg.threads, runtime=cfg.runtime)


def read_card(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        card = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CardError(f"model card {path} is unreadable ({exc}); regenerate it with `fleet model example`") from None
    if not isinstance(card, dict):
        raise CardError(f"model card {path} is not a JSON object; regenerate it with `fleet model example`")
    return card


@dataclass(frozen=True)
class Inference:
    outputs: np.ndarray
    prediction_ids: list[str]
    model: str
    release: str


@dataclass
class ServedModel:
    config: ModelConfig
    model: runtime.Model
    telemetry: WindowAggregator
    #: The model's predict, measured and aggregated: what AgentCore.predict and infer call.
    run: Callable[[np.ndarray], np.ndarray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.run = self.telemetry.measure(self.model.predict, runtime.RuntimeLayerError, _model_failed)


def _model_failed(exc: Exception) -> bool:
    """Whether a failed call counts against the model. A call of the wrong type, dtype or shape is the caller's
    mistake, refused before the model ran; NaN rows and runtime failures count."""
    return not isinstance(exc, runtime.InputError) or isinstance(exc, runtime.NonFiniteInput)


def hardware() -> dict[str, Any]:
    return {"machine": platform.machine(), "system": platform.system(), "cpus": os.cpu_count() or 1}


class AgentCore:
    def __init__(
        self,
        config: AgentConfig,
        reactor: Reactor,
        *,
        loader: ModelLoader = load_configured,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        fault_point: Callable[[State], None] | None = None,
    ) -> None:
        """``fault_point`` is a fault-injection hook for tests and the simulator, never set in production: the
        installer calls it with each install state it enters (see :mod:`agent.update.journal`)."""
        self.config = config
        self.reactor = reactor
        self.clock = clock
        self.device_id = config.device_id
        self.boot_id = new_boot_id()
        self._loader = loader
        self._rng = rng or random.Random()
        self.models: dict[str, ServedModel] = {}
        self.windows_produced = 0
        self.started_at = 0.0
        self._window_timer: Timer | None = None
        self._drain_timer: Timer | None = None
        self._recent: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._recent_lock = threading.Lock()
        self._status_stale = False
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(
            config.state_dir / "outbox.sqlite",
            max_rows=config.outbox_max_rows,
            max_bytes=config.outbox_max_bytes,
        )
        self.health = HealthSampler(config.state_dir)
        self.link = MqttLink(
            reactor,
            config.device_id,
            config.broker,
            self.outbox,
            self.birth,
            self.boot_id,
            prefix=config.prefix,
            keepalive=config.keepalive,
            tls=config.tls,
            on_command=self._on_command,
            backoff=Backoff(maximum=config.reconnect_max_s),
            rng=self._rng,
        )
        # Built last: the host methods it calls while it recovers (emit, clock, status_changed) need the outbox and
        # the link above; those it calls later (activate, serving, totals) need the models, which recover() returns.
        self.installer = (
            Installer(self, config.update, config.models, config.state_dir, fault_point=fault_point)
            if config.update
            else None
        )
        if self.installer is not None:  # serve what the slots say, once verified (the factory model is the fallback)
            self.models.update(self.installer.recover(self._build))
        else:
            for cfg in config.models:
                self.models[cfg.name] = self._build(cfg)

    # -- lifecycle (reactor thread) -----------------------------------------------------------------------------

    def start(self) -> None:
        self.started_at = self.clock()
        self.emit("agent_started", agent_version=__version__, models=self._model_summary())
        self.link.start()
        if self.installer is not None:
            self.installer.start()
        # The first window is shortened at random: devices started together (a power cut, a simulator) do not all
        # report in the same instant, which would make the fleet's load spiky.
        first = self.config.window_s * self._rng.uniform(0.5, 1.0)
        self._window_timer = self.reactor.call_every(self.config.window_s, self.flush_windows, first_delay=first)
        self._drain_timer = self.reactor.call_every(DRAIN_INTERVAL_S, self.drain_telemetry)
        self.write_status()

    def stop(self, timeout: float = 5.0) -> None:
        """Close the current windows so nothing measured is lost, give the outbox a moment, say goodbye."""
        self.finish_windows()
        self.reactor.run_until(lambda: self.drained, timeout)
        self.close(timeout)

    def finish_windows(self) -> None:
        for timer in (self._window_timer, self._drain_timer):
            if timer:
                timer.cancel()
        self.flush_windows()
        self.emit("agent_stopped")

    @property
    def drained(self) -> bool:
        """True when the fleet confirmed every stored message, or when the broker cannot be reached right now."""
        stats = self.outbox.stats()
        return not self.link.connected or stats["rows"] + stats["held_events"] == 0

    def close(self, timeout: float = 5.0) -> None:
        if self.installer is not None:  # first: its worker still records events and loads models
            self.installer.close(timeout)
        self.link.close(timeout)
        self.write_status(running=False)
        for served in self.models.values():
            served.model.close()
        self.outbox.close()

    def lose_power(self) -> None:
        """Leave only what a process killed at this instant leaves: what is on disk (the simulator's power cut,
        firmware_sim.power). Timers stop, the installer persists nothing more and its worker is told to stop, the
        outbox is closed as it stands, the MQTT connection drops without a goodbye (the broker publishes the last
        will); no window is flushed, no status written, nothing emitted. The models are left to the garbage collector
        (a simulator shares them between devices). Reactor thread. The core is dead after it: boot a new one."""
        for timer in (self._window_timer, self._drain_timer):
            if timer:
                timer.cancel()
        if self.installer is not None:
            self.installer.lose_power()
        self.outbox.close()
        self.link.lose_power()

    def _build(self, cfg: ModelConfig) -> ServedModel:
        card = read_card(cfg.card)
        model = self._loader(cfg)
        try:
            n_features = int(model.inputs[0].shape[-1] or 0)
            drift = card.get("drift")
            edges = (drift.get("edges") if isinstance(drift, dict) else None) or [[0.0, 1.0]] * n_features
            n_classes = int(model.outputs[0].shape[-1] or len(card.get("labels", [])) or 1)
            if len(edges) != n_features:
                raise ValueError(f"it has drift edges for {len(edges)} features, the model takes {n_features}")
            aggregator = WindowAggregator(cfg.name, cfg.release, edges, n_classes, clock=self.clock)
        except (TypeError, ValueError) as exc:  # a card of the wrong shape is as wrong as one that does not fit
            model.close()
            problem = f"model {cfg.name}: the card does not fit {cfg.path.name}: {exc}; fix the card"
            raise CardError(problem) from exc
        return ServedModel(cfg, model, aggregator)

    def activate(self, cfg: ModelConfig) -> ServedModel | None:
        """Serve ``cfg`` in place of the model of the same name, atomically; returns the model it replaced.

        Load first, swap second: callers keep getting answers from the old model until the new one is ready, and
        a call already running on the old one finishes on it (it holds its own reference). The old model's open
        window is sent as it stands, so no inference is lost from the telemetry or attributed to the wrong release,
        and the birth is published again, so the fleet sees the release now served.
        """
        served = self._build(cfg)
        old = self.models.get(cfg.name)
        self.models[cfg.name] = served  # one dict store: atomic for readers on other threads
        if old is not None:
            self.reactor.call_soon_threadsafe(lambda: self._send_window(old, self.health.sample()))
        self.reactor.call_soon_threadsafe(self.announce)
        return old

    def serving(self, model: str) -> ModelConfig | None:
        """What is served as ``model`` now (InstallHost)."""
        served = self.models.get(model)
        return served.config if served else None

    def totals(self, model: str) -> Totals:
        """The served ``model``'s counts since it was activated (InstallHost): what probation judges."""
        return self.models[model].telemetry.totals()

    def status_changed(self) -> None:
        """Rewrite the status file on the reactor thread (InstallHost: the installer calls it from its worker)."""
        self.reactor.call_soon_threadsafe(self.write_status)

    # -- inference (any thread) ---------------------------------------------------------------------------------

    def predict(self, model_name: str, inputs: np.ndarray) -> np.ndarray:
        """Run a batch through a served model; the call is measured and aggregated, the inputs never leave."""
        served = self.models.get(model_name)  # the lookup inlined: at batch 1 each call layer costs 1%
        if served is None:
            raise self._unknown(model_name)
        return served.run(inputs)

    def infer(self, model_name: str, inputs: np.ndarray) -> Inference:
        """predict(), plus one id per row that :meth:`feedback` can later attach a true label to."""
        served = self._served(model_name)  # one lookup: the release reported is the one that answered
        outputs = served.run(inputs)
        request = uuid.uuid4().hex[:16]
        ids = [f"{request}-{i}" for i in range(len(outputs))]
        predicted = outputs.argmax(axis=1).tolist()
        with self._recent_lock:
            for pid, cls in zip(ids, predicted, strict=True):
                self._recent[pid] = (model_name, cls)
            while len(self._recent) > RECENT_PREDICTIONS:
                self._recent.popitem(last=False)
        return Inference(outputs, ids, model_name, served.config.release)

    def feedback(self, prediction_id: str, true_label: int, model_name: str | None = None) -> None:
        """Attach the true label to an earlier prediction; it feeds the window's confusion counts.

        Raises KeyError for an id this agent does not remember (unknown, already labelled, too old, or of another
        model than ``model_name``) and ValueError for a label outside the model's classes; either way the id is
        kept, so a corrected call can still use it.
        """
        with self._recent_lock:
            name, predicted = self._recent[prediction_id]
            if model_name is not None and name != model_name:
                raise KeyError(prediction_id)
            served = self._served(name)
            if not 0 <= true_label < served.telemetry.n_classes:
                raise ValueError(f"label {true_label} is outside 0..{served.telemetry.n_classes - 1}")
            del self._recent[prediction_id]
        served.telemetry.record_feedback(true_label, predicted)

    def _served(self, model_name: str) -> ServedModel:
        served = self.models.get(model_name)
        if served is None:
            raise self._unknown(model_name)
        return served

    def _unknown(self, model_name: str) -> UnknownModel:
        return UnknownModel(f"no model named {model_name!r}; served: {sorted(self.models)}")

    def drain_telemetry(self) -> None:
        """Histogram queued inferences here, on the reactor thread, so the callers of predict() do not pay for it."""
        for served in self.models.values():
            served.telemetry.drain()

    # -- reporting ----------------------------------------------------------------------------------------------

    def flush_windows(self) -> None:
        health = self.health.sample()
        for served in list(self.models.values()):
            self._send_window(served, health)
        self.link.pump()
        self.write_status()

    def _send_window(self, served: ServedModel, health: dict[str, Any]) -> None:
        window = served.telemetry.flush(self.clock())
        message = {
            "v": protocol.SCHEMA_VERSION,
            "device_id": self.device_id,
            "boot_id": self.boot_id,
            "seq": 0,
            "dropped": 0,
            "health": health,
            **window,
        }
        self.outbox.append(Kind.TELEMETRY, self.link.topic(Kind.TELEMETRY), message)
        self.windows_produced += 1
        self.link.pump()

    def emit(self, type_: str, model: str | None = None, **detail: Any) -> int | None:
        """Record an event in the outbox (never dropped: on a full disk it is held in memory until there is room, and
        its seq is None) and log it; safe from any thread."""
        message: dict[str, Any] = {
            "v": protocol.SCHEMA_VERSION,
            "device_id": self.device_id,
            "boot_id": self.boot_id,
            "seq": 0,
            "ts": self.clock(),
            "type": type_,
            "detail": detail,
        }
        if model is not None:
            message["model"] = model
        seq = self.outbox.append(Kind.EVENTS, self.link.topic(Kind.EVENTS), message)
        event(log, type_, device_id=self.device_id, model=model, **detail)
        self.reactor.call_soon_threadsafe(self.link.pump)
        return seq

    def _on_command(self, kind: Kind, payload: bytes) -> None:
        if self.installer is None:
            event(log, "command_ignored", logging.WARNING, device_id=self.device_id, kind=kind.value,
                  reason="updates are off: agent.toml has no [update] table")  # fmt: skip
            return
        self.installer.on_command(kind, payload)

    def announce(self) -> None:
        """Tell the fleet again what this device runs (retained birth, status file): its models changed."""
        self.link.publish_birth()
        self.write_status()

    def _model_summary(self) -> dict[str, Any]:
        return {
            name: {"release": s.config.release, "runtime": s.model.runtime, "file": s.config.path.name}
            for name, s in self.models.items()
        }

    def birth(self) -> dict[str, Any]:
        return {
            "v": protocol.SCHEMA_VERSION,
            "device_id": self.device_id,
            "state": "online",
            "boot_id": self.boot_id,
            "ts": self.clock(),
            "agent_version": __version__,
            "hardware": hardware(),
            "runtimes": runtime.runtime_names(),
            "models": self._model_summary(),
        }

    def status(self, running: bool = True) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "boot_id": self.boot_id,
            "pid": os.getpid(),
            "running": running,
            "started_at": self.started_at,
            "updated_at": self.clock(),
            "agent_version": __version__,
            "broker": self.link.broker.url,
            "connected": self.link.connected,
            "models": {
                name: {**summary, **(self.installer.model_status(name) if self.installer else {})}
                for name, summary in self._model_summary().items()
            },
            "windows_produced": self.windows_produced,
            "outbox": self.outbox.stats(),
            # The fleet's acknowledgements: rows it confirmed (by kind), rows the broker took that wait for it, rows
            # sent again for want of one, and acknowledgements refused (by reason).
            "delivery": {
                "acked": {kind.value: n for kind, n in self.link.acked.items()},
                "unconfirmed": self.link.unconfirmed,
                "resent": self.link.resent,
                "ack_rejects": dict(self.link.ack_rejects),
            },
        }

    def write_status(self, running: bool = True) -> None:
        """Leave a status file for `edge-agent status`, which must work even when the broker is unreachable.

        On a full disk the last one stays (`edge-agent status` shows its age) and the failure is logged once."""
        path = self.config.state_dir / "status.json"
        try:
            write_atomic(path, json.dumps(self.status(running), indent=2).encode(), durable=False)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            if not self._status_stale:
                event(log, "status_write_failed", logging.WARNING, reason="disk_full", path=str(path))
            self._status_stale = True
        else:
            self._status_stale = False
