"""Issue 11: power loss at each install state, on simulated devices (firmware_sim.power).

Eight real agent cores run together on one reactor, as the simulator runs them, each enrolled with a real fleet: signed
TUF releases of the project's models served over HTTP on loopback, director-signed desired states delivered retained
on the session's real broker, the fleet's real ingest and store acknowledging what the devices send, real SQLite
state, real smoke-test child processes and probation fed by each device's own traffic. Each device has a
:class:`~firmware_sim.power.PowerSwitch` at one install state; the one thing injected is that cut. After it the
device's core is dropped (no goodbye: the broker publishes its last will) and a new core boots on the same state
folder, from what the first left on disk.
"""

from __future__ import annotations

import hashlib
import json
import queue
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from fleet_fixtures import EventTap, Fleet, deliver, new_device_id, wait_for
from paho.mqtt.enums import CallbackAPIVersion
from test_ingest import start_ingest
from test_install import card_of, fleet, releases, smoke_rows

from agent.broker_address import BrokerAddress
from agent.config import AgentConfig, ModelConfig, UpdateConfig
from agent.core import AgentCore
from agent.protocol import DEFAULT_PREFIX, Kind, topic
from agent.reactor import Reactor
from agent.update.slots import SlotStore, slot_problem
from agent.update.states import State
from firmware_sim.power import CUT_STATES, PowerCut, PowerSwitch, drop
from fleet.broker import MosquittoBroker
from fleet.store import Store, open_store
from fleet.trust.releases import ReleaseInfo

#: The fixtures shared with the install tests: pytest finds them by these names in this module.
SHARED_FIXTURES = (fleet, releases)
#: How often each device's application asks its model (traffic feeds probation and telemetry windows).
TICK_S = 0.05
_AFTER_RESTART = ["DOWNLOADING", "VERIFYING", "STAGED", "SMOKE_TEST", "ACTIVATING", "PROBATION", "COMMITTED"]
#: The install states the second core goes through, by the state the first was cut in: the restart table at work.
#: An install cut before activation starts again (through the cut state: the switch does not trip twice); one cut
#: in ACTIVATING completes the activation; one in PROBATION starts probation over; a revert is finished.
SECOND_BOOT_STATES: dict[State, list[str]] = {
    State.DOWNLOADING: _AFTER_RESTART,
    State.VERIFYING: _AFTER_RESTART,
    State.STAGED: _AFTER_RESTART,
    State.SMOKE_TEST: _AFTER_RESTART,
    State.ACTIVATING: ["PROBATION", "COMMITTED"],
    State.PROBATION: ["COMMITTED"],
    State.COMMITTED: [],
    State.REVERTING: ["IDLE"],
}


def retained_status(broker_url: str, device_id: str) -> dict[str, Any] | None:
    """The device's status as the broker retains it (what a fleet subscribing now is told), or None."""
    got: queue.Queue[dict[str, Any]] = queue.Queue()
    address = BrokerAddress.parse(broker_url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"status-{uuid.uuid4().hex[:8]}", clean_session=True)
    client.on_message = lambda _c, _u, message: message.retain and got.put(json.loads(message.payload))
    client.connect(address.host, address.port, keepalive=30)
    client.subscribe(topic(DEFAULT_PREFIX, device_id, Kind.STATUS), qos=1)
    client.loop_start()
    try:
        return got.get(timeout=5)
    except queue.Empty:
        return None
    finally:
        client.disconnect()
        client.loop_stop()


@dataclass
class PoweredDevice:
    """One simulated device: its config (the state folder outlives every core), its power switch, the core now
    booted, and what its first core had made when the power went."""

    config: AgentConfig
    switch: PowerSwitch
    reactor: Reactor
    release: ReleaseInfo
    tap: EventTap
    core: AgentCore = field(init=False)
    powered: bool = False
    cut_queued: bool = False
    first_boot: str = ""
    windows_before_cut: int = 0
    rows_at_cut: int = 0
    traffic: int = 0

    def boot(self) -> None:
        """Build and start a core on the device's config (a new boot id): recovery reads what is on disk. The same
        switch is given to every core: it has tripped once, so it never cuts again."""
        self.core = AgentCore(self.config, self.reactor, fault_point=self.switch)
        self.core.start()
        self.powered = True

    def cut(self) -> None:
        """The rest of the power cut, on the reactor thread, after what the worker handed over before it."""
        self.first_boot = self.core.boot_id
        self.windows_before_cut = self.core.windows_produced
        self.rows_at_cut = self.core.outbox.stats()["rows"]
        drop(self.core)
        self.powered = False

    def tick(self, rows: np.ndarray) -> None:
        if self.powered:
            self.core.predict("digits", rows[self.traffic % len(rows)][None, :])
            self.traffic += 1

    @property
    def install(self) -> dict[str, Any]:
        return self.core.status()["models"]["digits"]["install"]


@pytest.fixture
def fleet_store(tmp_path: Path, broker: MosquittoBroker) -> Iterator[Store]:
    """The fleet's real ingest and store: what the devices send is stored, then acknowledged to them."""
    store = open_store(tmp_path / "fleet.db")
    ingest = start_ingest(store, broker, DEFAULT_PREFIX)
    yield store
    ingest.stop()
    store.close()


def test_a_power_switch_trips_once_at_its_state() -> None:
    switch = PowerSwitch(State.STAGED)
    switch(State.VERIFYING)
    assert not switch.tripped.is_set() and switch.cut_state is None
    with pytest.raises(PowerCut):
        switch(State.STAGED)
    assert switch.tripped.is_set() and switch.cut_state is State.STAGED and switch.cut_at is not None
    switch(State.STAGED)  # a rebuilt core's recovery and worker pass the state again: no second cut
    assert not issubclass(PowerCut, Exception)  # the installer's `except Exception` lets it end the worker


# A PowerCut ends an installer's worker as a SystemExit; pytest's own thread hook reports every exception that ends a
# thread, this one included (the simulator's hook, firmware_sim.power.quiet_power_cuts, keeps it off stderr).
@pytest.mark.filterwarnings(
    r"ignore:(?s)Exception in thread install-.*PowerCut. power cut at:pytest.PytestUnhandledThreadExceptionWarning"
)
def test_power_lost_at_each_install_state_on_simulated_devices_ends_on_a_verified_working_model(
    tmp_path: Path,
    broker: MosquittoBroker,
    fleet: Fleet,
    releases: dict[str, ReleaseInfo],
    fleet_store: Store,
    example_model: Callable[[str], Path],
) -> None:
    """One device per state a cut can land in, all on one reactor: DOWNLOADING to COMMITTED installing digits 1.1.0,
    and REVERTING undoing digits 1.4.0, which loads but fails every inference, so its smoke test. Each cut is seen
    (the switch tripped, the broker retains the device's last will), each device boots again from its disk and ends
    on a model that verifies against its signed target and answers: 1.1.0 committed, or the factory 1.0.0 with
    1.4.0's install failed. Every message the first core stored reaches the fleet through the second."""
    good, broken = example_model("good"), example_model("broken")
    releases["broken"] = fleet.publish(broken / "int8.onnx", "1.4.0", card_of(broken))
    root, director = fleet.enroll(tmp_path / "enrolled")
    update = UpdateConfig(fleet.server.url, root, director, probation_inferences=20, probation_s=30.0,
                          smoke_timeout_s=60.0)  # fmt: skip
    reactor = Reactor()
    devices: list[PoweredDevice] = []
    for state in CUT_STATES:
        device_id = new_device_id(f"power-{state.value.lower().replace('_', '')}")
        config = AgentConfig(
            device_id=device_id,
            state_dir=tmp_path / device_id,
            broker=BrokerAddress.parse(broker.url),
            reconnect_max_s=1.0,
            window_s=0.5,
            models=(ModelConfig("digits", good / "int8.onnx", good / "card.json", "digits:1.0.0"),),
            update=update,
        )
        release = releases["broken" if state is State.REVERTING else "better"]
        devices.append(PoweredDevice(config, PowerSwitch(state), reactor, release, EventTap(broker.url, device_id)))
    rows = smoke_rows(good)

    def beat() -> None:
        for d in devices:
            d.tick(rows)
            if d.switch.tripped.is_set() and not d.cut_queued:
                d.cut_queued = True
                reactor.call_soon_threadsafe(d.cut)

    try:
        for d in devices:
            d.boot()
        traffic = reactor.call_every(TICK_S, beat)
        reactor.start_thread()
        wait_for(lambda: all(d.core.windows_produced >= 2 for d in devices), 30, "windows before the installs")
        for d in devices:
            deliver(broker.url, d.config.device_id, fleet.desired(d.config.device_id, 1, d.release))

        wait_for(lambda: all(d.first_boot for d in devices), 120, "the power cut on every device")
        for d in devices:
            assert d.switch.cut_state is d.switch.state, d

            def will(d: PoweredDevice = d) -> dict[str, Any] | None:
                status = retained_status(broker.url, d.config.device_id)
                return status if status and status["state"] == "offline" else None

            left = wait_for(will, 30, f"the last will of {d.config.device_id}")
            assert (left["boot_id"], left["reason"]) == (d.first_boot, "connection_lost")

        for d in devices:
            reactor.call_soon_threadsafe(d.boot)
        wait_for(lambda: all(d.powered for d in devices), 60, "every device booting again")

        for d in devices:
            outcome = "install_failed" if d.switch.state is State.REVERTING else "install_committed"
            d.tap.wait_for(outcome, 120, release=f"digits:{d.release.version}")
            at_rest = "IDLE" if d.switch.state is State.REVERTING else "COMMITTED"
            wait_for(lambda d=d, at_rest=at_rest: d.install["state"] == at_rest, 30, f"{d.config.device_id} at rest")
            assert d.core.boot_id != d.first_boot and d.switch.cut_state is d.switch.state
            assert len(d.tap.of("install_committed", "install_failed", "rolled_back")) == 1, d.tap.events
            assert_serves_verified(d, releases, example_model)
            if d.switch.state is State.REVERTING:
                assert d.tap.of("install_failed")[0]["detail"]["reason"].startswith("smoke_")
                assert "ACTIVATING" not in d.tap.states()

        traffic.cancel()
        reactor.stop()
        assert reactor.thread is not None
        reactor.thread.join(10)
        for d in devices:  # every window closed, then everything stored on the device delivered
            d.core.finish_windows()
        drained = reactor.run_until(lambda: all(d.core.outbox.stats()["rows"] == 0 for d in devices), 60)
        assert drained, {d.config.device_id: d.core.outbox.stats() for d in devices}
        for d in devices:
            assert_nothing_lost(d, fleet_store)
        # The fleet acknowledges a message a quarter of a second after it came at the soonest, and a device is dropped
        # within a beat of its cut: the event of the state cut into, at least, was still waiting in its outbox.
        assert sum(d.rows_at_cut for d in devices) > 0
    finally:
        reactor.stop()
        if reactor.thread is not None:
            reactor.thread.join(10)
        for d in devices:
            if d.powered:
                d.core.close(2.0)
            d.tap.close()
        reactor.close()


def assert_serves_verified(
    d: PoweredDevice, releases: dict[str, ReleaseInfo], example_model: Callable[..., Path]
) -> None:
    """The served model is the release the device reports, its file verifies against that release's signed sha256,
    and it answers the release's signed smoke samples as its card says."""
    expected, folder = (releases["good"], "good") if d.switch.state is State.REVERTING else (d.release, "better")
    served = d.core.serving("digits")
    assert served is not None and served.release == f"digits:{expected.version}"
    assert hashlib.sha256(served.path.read_bytes()).hexdigest() == expected.sha256
    slots, _ = (store := SlotStore(d.config.state_dir)).load("digits")
    store.close()
    if d.switch.state is State.REVERTING:
        assert slots.active is None and slots.staged is None  # the factory model serves
    else:
        assert slots.active is not None and slots.active.path == served.path
        assert slots.active.sha256 == expected.sha256 and slot_problem(slots.active) is None
    card = card_of(example_model(folder))["smoke_test"]
    outputs = d.core.predict("digits", np.asarray(card["inputs"], np.float32))
    assert np.abs(outputs - np.asarray(card["expected"]["int8.onnx"]["probabilities"])).max() <= card["atol"]


def assert_nothing_lost(d: PoweredDevice, store: Store) -> None:
    """Every window the first core made reached the fleet, and every seq of the device's outbox (both boots) is
    stored: what waited in the outbox at the cut was delivered by the second core."""
    stats = d.core.outbox.stats()
    assert stats["dropped_total"] == 0 and stats["held_events"] == 0
    windows = store.telemetry(d.config.device_id).windows
    assert sum(w["boot_id"] == d.first_boot for w in windows) == d.windows_before_cut > 0
    detail = store.device(d.config.device_id)
    assert detail is not None and detail.missing == 0 and not detail.gaps
    assert detail.events + detail.device.windows == stats["next_seq"] - 1
    first = sorted((e for e in d.tap.events if e["boot_id"] == d.first_boot), key=lambda e: e["seq"])
    last = "install_committed" if d.switch.state is State.COMMITTED else "install_state"
    assert first[-1]["type"] == last, "the first core went on after the cut"
    assert [e["detail"]["state"] for e in first if e["type"] == "install_state"][-1] == d.switch.state.value
    second = sorted((e for e in d.tap.of("install_state") if e["boot_id"] == d.core.boot_id), key=lambda e: e["seq"])
    assert [e["detail"]["state"] for e in second] == SECOND_BOOT_STATES[d.switch.state]
