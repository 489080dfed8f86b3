"""One `firmware-sim run`, from its settings to its report: the fleet's tags, the scenario's plan, a broker the run
starts (and restarts, as the scenario says), the enrollment, the simulation in one process or K, and the ground truth.

The command line parses and calls :func:`execute`; everything it decides is here, so a test or a benchmark runs the
same thing.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.errors import EdgefleetError
from agent.logs import event
from firmware_sim import fdlimit
from firmware_sim.scenario import INSTALL_FAULTS, Plan, Scenario, ScenarioError, device_tags
from firmware_sim.simulator import SimSettings

log = logging.getLogger(__name__)


class RunError(EdgefleetError):
    """The run cannot start as asked; ``detail`` says why and what to do, in one line."""


@dataclass(frozen=True)
class RunRequest:
    """A run as asked for: the simulator's settings (``broker`` may be empty when the run enrolls or starts its own)
    and how to reach the fleet."""

    settings: SimSettings
    scenario: Scenario = field(default_factory=Scenario)
    #: ``KEY=VALUE`` tags every device has, and the number of sites to spread them over (``site=site-N``).
    tags: Sequence[str] = ()
    sites: int | None = None
    #: Enroll the devices with the `fleet serve` of this home (None: $EDGEFLEET_HOME), or do not (False).
    enroll: bool = False
    home: Path | None = None
    #: Start a Mosquitto for the run on this port (0: a free one), or None for the broker of ``settings``.
    start_broker: int | None = None
    shards: int = 1


def prepare(request: RunRequest) -> Plan:
    """The run's plan (each device's tags, drift and faults) once the run is known to be possible: its faults fit how
    it runs, and the process may open the files its devices need. Nothing is started. Raises :class:`RunError`."""
    s = request.settings
    tags = device_tags(s.device_ids(), _tags(request.tags), request.sites)
    try:
        plan = request.scenario.plan(tags, s.seed, s.duration_s)
    except ScenarioError as exc:
        raise RunError("bad_scenario", f"the scenario does not fit the run: {exc}") from None
    _check(request, plan)
    proxied = sum(1 for p in plan.devices.values() if p.network_faults)
    try:
        fdlimit.ensure_open_files(s.devices, s.devices if request.enroll else 0, proxied)
    except fdlimit.TooManyDevices as exc:
        raise RunError("too_many_devices", str(exc)) from None
    return plan


def execute(
    request: RunRequest,
    plan: Plan,
    simulate: Callable[[SimSettings, Callable[[], None]], dict[str, Any]],
    sharded: Callable[[SimSettings, int], dict[str, Any]],
    announce: Callable[[str], None] = lambda _line: None,
) -> dict[str, Any]:
    """Run ``request`` with its ``plan`` (:func:`prepare`): ``simulate`` runs the settings in this process (and calls
    its second argument once the devices started: the scenario's clock starts there), ``sharded`` in K processes (the
    clock starts as the shards are spawned); ``announce`` gets a line for the user (the address of a broker the run
    started). Raises :class:`RunError`."""
    s = request.settings
    with contextlib.ExitStack() as stack:
        restarts = None
        if request.start_broker is not None:
            broker = stack.enter_context(_own_broker(request.start_broker))
            announce(f"broker: {broker.url}")
            s = replace(s, broker=broker.url)
            restarts = BrokerRestarts(broker, plan.broker_restarts)
        if request.enroll:
            from firmware_sim.enrollment import EnrollError, enroll_devices

            try:
                url, prefix, updates = enroll_devices(request.home, s.device_ids(), s.state_root, request.tags,
                                                      request.sites)  # fmt: skip
            except EnrollError as exc:
                raise RunError(exc.reason, exc.detail) from None
            s = replace(s, broker=url, prefix=prefix, updates=updates)
        s = replace(s, plan=plan.devices)
        started = restarts.start if restarts is not None else lambda: None
        if restarts is not None:
            stack.callback(restarts.stop)
        if request.shards > 1:
            started()
            report = sharded(s, request.shards)
        else:
            report = simulate(s, started)
    report["scenario"] = request.scenario.name
    report["broker_restarts"] = restarts.done if restarts is not None else []
    return report


def owed_windows_delivered(report: dict[str, Any]) -> bool:
    """Whether the fleet acknowledged every window it was owed: all of each device's, but a device silent at the end
    of the run (by the scenario) owes nothing."""
    return all(d["windows_produced"] == d["windows_acked"] for d in report["devices"] if not d["silent_at_end"])


def _tags(pairs: Sequence[str]) -> dict[str, str]:
    """Tags for targeting; an enrolled run checks them as `fleet enroll --tag` does."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not (sep and key and value):
            raise RunError("bad_tag", f"{pair[:80]!r} is not a tag; write KEY=VALUE")
        out[key] = value
    return out


def _check(request: RunRequest, plan: Plan) -> None:
    needs_install = sorted({s.fault.kind for p in plan.devices.values() for s in p.of(*INSTALL_FAULTS)})
    if needs_install and not request.enroll:
        raise RunError("needs_enroll", f"the scenario's {needs_install[0]} acts on installs: run with --enroll")
    if plan.broker_restarts and request.start_broker is None:
        raise RunError("needs_own_broker", "the scenario restarts the broker, which only a broker the simulator "
                                           "started allows: run with --start-broker PORT")  # fmt: skip
    if request.start_broker is not None and request.enroll:
        raise RunError("broker_conflict", "--enroll uses the fleet's broker: drop --start-broker")


@contextlib.contextmanager
def _own_broker(port: int) -> Iterator[Any]:
    """A Mosquitto on loopback for the run, without persistence (a restart forgets every session and retained
    message: the hardest case for delivery), stopped when the run ends."""
    from fleet.broker import MosquittoBroker, port_free

    if not MosquittoBroker.available():
        raise RunError("no_broker", "--start-broker needs mosquitto: apt-get install mosquitto")
    if port and not port_free("127.0.0.1", port):
        raise RunError("port_busy", f"port {port} is in use: pick another for --start-broker, or 0 for a free one")
    with tempfile.TemporaryDirectory(prefix="firmware-sim-broker-") as workdir:
        broker = MosquittoBroker(Path(workdir), port or None, persistence=False)
        try:
            broker.start()
        except RuntimeError as exc:
            raise RunError("no_broker", str(exc)) from None
        try:
            yield broker
        finally:
            broker.stop()


class BrokerRestarts:
    """Restarts the run's own broker on the scenario's schedule, from :meth:`start` (the run's start), on a thread.

    ``done`` lists each restart as it happened: when it stopped (seconds into the run) and how long it was down."""

    def __init__(self, broker: Any, schedule: Sequence[tuple[float, float]]) -> None:
        self._broker = broker
        self._schedule = sorted(schedule)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="broker-restarts", daemon=True)
        self.done: list[dict[str, float]] = []

    def start(self) -> None:
        if self._schedule:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        started = time.monotonic()
        for start_s, down_s in self._schedule:
            if self._stop.wait(max(0.0, started + start_s - time.monotonic())):
                return
            at = time.monotonic() - started
            self._broker.stop()
            event(log, "sim_broker_stopped", logging.WARNING, at_s=round(at, 3), down_s=down_s)
            self._stop.wait(down_s)
            self._broker.start()
            self.done.append({"at_s": round(at, 3), "down_s": round(time.monotonic() - started - at, 3)})
            event(log, "sim_broker_started", at_s=round(time.monotonic() - started, 3))
