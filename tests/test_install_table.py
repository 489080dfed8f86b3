"""The install state machine on its own: the pure table, then the installer driven through a stand-in host.

No MQTT, no reactor, no runtime here: the table is data, and the installer knows the agent only as an
:class:`~agent.update.host.InstallHost`, so a plain object that records what it is asked can stand in for the agent
core. Releases still come from a real signed TUF repository on loopback HTTP and run real smoke-test children: that
is the installer's own work. tests/test_install.py runs the same machine inside real agents, killed at every state.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from fleet_fixtures import Fleet, wait_for

from agent.config import ModelConfig, UpdateConfig
from agent.protocol import LATENCY_EDGES_MS, Kind
from agent.telemetry import Totals
from agent.update.desired import DesiredState
from agent.update.host import InstallHost
from agent.update.inbox import Inbox, Work
from agent.update.install import Installer
from agent.update.probation import Watch, watch_start
from agent.update.record import InstallRecord
from agent.update.slots import SlotStore
from agent.update.states import (
    AT_REST,
    ON_RESTART,
    TRANSITIONS,
    Event,
    IllegalTransition,
    Restart,
    State,
    next_state,
)
from fleet.trust.repository import ReleaseInfo

HAPPY_PATH = [State.DOWNLOADING, State.VERIFYING, State.STAGED, State.SMOKE_TEST, State.ACTIVATING, State.PROBATION,
              State.COMMITTED]  # fmt: skip
BEFORE_ACTIVATION = {State.DOWNLOADING, State.VERIFYING, State.STAGED, State.SMOKE_TEST}

# --------------------------------------------------------------------------------------------------------------
# The table


def test_done_walks_the_happy_path_in_order() -> None:
    state, walked = next_state(State.IDLE, Event.START), []
    while state not in AT_REST:
        walked.append(state)
        state = next_state(state, Event.DONE)
    assert [*walked, state] == HAPPY_PATH
    assert next_state(State.COMMITTED, Event.START) is State.DOWNLOADING


def test_every_state_but_reverting_fails_into_reverting_which_ends_idle() -> None:
    for state in State:
        if state is State.REVERTING:
            with pytest.raises(IllegalTransition):
                next_state(state, Event.FAIL)
        else:
            assert next_state(state, Event.FAIL) is State.REVERTING
    assert next_state(State.REVERTING, Event.DONE) is State.IDLE


def test_only_an_install_cut_before_activation_resumes_and_only_from_downloading() -> None:
    resumable = {state for (state, event) in TRANSITIONS if event is Event.RESUME}
    assert resumable == BEFORE_ACTIVATION
    assert {TRANSITIONS[state, Event.RESUME] for state in resumable} == {State.DOWNLOADING}
    assert {state for (state, event) in TRANSITIONS if event is Event.START} == AT_REST


ILLEGAL = [(State.PROBATION, Event.START), (State.ACTIVATING, Event.RESUME), (State.IDLE, Event.DONE),
           (State.COMMITTED, Event.RESUME), (State.REVERTING, Event.START)]  # fmt: skip


@pytest.mark.parametrize(("state", "event"), ILLEGAL)
def test_a_move_the_table_lacks_is_refused_as_an_internal_error(state: State, event: Event) -> None:
    with pytest.raises(IllegalTransition) as refused:
        next_state(state, event)
    assert refused.value.reason == "internal_error"
    assert refused.value.detail == f"{state.value} --{event.value}--> is not a transition"


def committed_record(ts: float) -> InstallRecord:
    outcome = {"outcome": "install_committed", "release": "digits:1.1.0", "seq": 1, "ts": ts, "reported": True}
    return InstallRecord(state=State.COMMITTED, outcome=outcome)


def test_the_commit_watch_counts_unclean_starts_until_the_limit_then_rolls_back() -> None:
    rec, verdicts = committed_record(1000.0), []
    for _ in range(3):
        verdict, rec = watch_start(rec, now=1010.0, window_s=3600, limit=3, unclean=True)
        verdicts.append(verdict)
    assert verdicts == [Watch.ON, Watch.ON, Watch.CRASH_LOOP] and rec.restarts == 3


def test_the_commit_watch_ends_with_its_window_its_start_cap_or_a_clock_outside_it_and_stays_over() -> None:
    for now in (1000.0 + 3600, 999.0):  # the window passed; the clock set back before the commit
        verdict, rec = watch_start(committed_record(1000.0), now=now, window_s=3600, limit=3, unclean=True)
        assert (verdict, rec.watch_over, rec.restarts) == (Watch.ENDED, True, 0)
        assert watch_start(rec, now=1001.0, window_s=3600, limit=3, unclean=True)[0] is Watch.OFF
    rec, verdicts = committed_record(1000.0), []
    for unclean in (False, True, False, True, False, False):  # clean stops do not count; 2 x limit starts end it
        verdict, rec = watch_start(rec, now=1001.0, window_s=3600, limit=3, unclean=unclean)
        verdicts.append(verdict)
    assert verdicts == [Watch.ON] * 5 + [Watch.LAST] and rec.watch_over
    assert watch_start(InstallRecord(), now=0.0, window_s=3600, limit=3, unclean=True)[0] is Watch.OFF


def test_the_inbox_keeps_the_newest_desired_state_and_wakes_for_retries_as_they_fall_due() -> None:
    now = [0.0]
    inbox = Inbox(clock=lambda: now[0])
    older, newer = (DesiredState("d", seq, 0.0, 1.0, "c", {}) for seq in (1, 2))
    inbox.put(older)
    inbox.put(newer)
    inbox.retry("digits", 30.0)
    assert inbox.take() == Work(newer, frozenset())
    assert inbox.due_in("digits") == 30.0
    now[0] = 30.0
    assert inbox.take() == Work(None, frozenset({"digits"}))
    assert inbox.due_in("digits") is None
    inbox.retry("digits", 5.0)
    inbox.cancel("digits")
    inbox.stop()
    assert inbox.take() is None


def test_every_state_is_reachable_has_a_restart_action_and_leads_back_to_rest() -> None:
    reachable, frontier = {State.IDLE}, [State.IDLE]
    while frontier:
        state = frontier.pop()
        for (source, _), target in TRANSITIONS.items():
            if source is state and target not in reachable:
                reachable.add(target)
                frontier.append(target)
    assert reachable == set(State)
    assert set(ON_RESTART) == set(State)
    assert {s for s, action in ON_RESTART.items() if action is Restart.RESTART} == BEFORE_ACTIVATION
    assert {s for s, action in ON_RESTART.items() if action is Restart.WATCH_COMMIT} == {State.COMMITTED}
    for state in State:  # DONE or FAIL, every state ends at rest: no install can be left hanging by the table
        seen = set()
        while state not in AT_REST and state not in seen:
            seen.add(state)
            state = TRANSITIONS.get((state, Event.DONE)) or TRANSITIONS[state, Event.FAIL]
        assert state in AT_REST


# --------------------------------------------------------------------------------------------------------------
# The installer through a stand-in host


def idle_totals(count: int = 0, errors: int = 0) -> Totals:
    return Totals(count, errors, (count, *[0] * len(LATENCY_EDGES_MS)))


@dataclass
class StandInHost:
    """An InstallHost that serves nothing: it records what the installer asks, and reports the counts it is given."""

    device_id: str = "stand-in-1"
    events: list[tuple[str, str | None, dict[str, Any]]] = field(default_factory=list)
    served: dict[str, ModelConfig] = field(default_factory=dict)
    activated: list[ModelConfig] = field(default_factory=list)
    counts: dict[str, Totals] = field(default_factory=dict)
    status_changes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def clock(self) -> float:
        return time.time()

    def emit(self, type_: str, model: str | None = None, **detail: Any) -> int:
        with self.lock:
            self.events.append((type_, model, detail))
            return len(self.events)

    def activate(self, cfg: ModelConfig) -> object:
        self.activated.append(cfg)
        self.served[cfg.name], self.counts[cfg.name] = cfg, idle_totals()
        return None

    def serving(self, model: str) -> ModelConfig | None:
        return self.served.get(model)

    def totals(self, model: str) -> Totals:
        return self.counts[model]

    def status_changed(self) -> None:
        self.status_changes += 1

    def of(self, type_: str) -> list[dict[str, Any]]:
        with self.lock:
            return [detail for t, _, detail in self.events if t == type_]

    def states(self) -> list[str]:
        return [detail["state"] for detail in self.of("install_state")]

    def wait_for(self, type_: str, **expected: Any) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            return next((d for d in self.of(type_) if expected.items() <= d.items()), None)

        return wait_for(found, 30, f"{type_} {expected}")


@dataclass
class Bench:
    """A fleet's signed repository on loopback and what a device is provisioned with; installers made on demand."""

    fleet: Fleet
    update: UpdateConfig
    factory: ModelConfig
    state_dir: Path
    release: ReleaseInfo
    made: list[Installer] = field(default_factory=list)

    def installer(self, host: InstallHost) -> Installer:
        self.made.append(Installer(host, self.update, [self.factory], self.state_dir))
        return self.made[-1]


@pytest.fixture
def bench(tmp_path: Path, example_model: Callable[[str], Path]) -> Iterator[Bench]:
    fleet = Fleet.create(tmp_path / "fleet")
    good, better = example_model("good"), example_model("better")
    release = fleet.publish(better / "int8.onnx", "1.1.0", json.loads((better / "card.json").read_text()))
    root, director = fleet.enroll(tmp_path / "enrolled")
    update = UpdateConfig(fleet.server.url, root, director, probation_inferences=20, probation_s=60,
                          smoke_timeout_s=30, crash_loop_limit=3)  # fmt: skip
    factory = ModelConfig("digits", good / "int8.onnx", good / "card.json", "digits:1.0.0")
    made = Bench(fleet, update, factory, tmp_path / "state", release)
    yield made
    for installer in made.made:
        installer.close(5)
    fleet.stop()


def install_to_probation(bench: Bench, host: StandInHost) -> Installer:
    installer = bench.installer(host)
    host.served = installer.recover(lambda cfg: cfg)
    installer.start()
    installer.on_command(Kind.DESIRED, bench.fleet.desired(host.device_id, 1, bench.release))
    host.wait_for("install_state", state="PROBATION")
    return installer


def test_an_install_runs_the_table_and_reaches_the_core_only_through_its_host(bench: Bench) -> None:
    host = StandInHost()
    install_to_probation(bench, host)
    assert [cfg.release for cfg in host.activated] == ["digits:1.1.0"]
    assert host.serving("digits") == host.activated[0]
    host.counts["digits"] = idle_totals(count=20)  # what the served release did: 20 healthy inferences
    committed = host.wait_for("install_committed")
    assert (committed["release"], committed["inferences"], committed["errors"]) == ("digits:1.1.0", 20, 0)
    assert host.states() == [s.value for s in HAPPY_PATH]
    assert [t for t, _, _ in host.events][:2] == ["desired_accepted", "install_state"]
    assert host.status_changes >= len(HAPPY_PATH)


def test_a_failed_probation_reverts_and_the_host_serves_the_factory_model_again(bench: Bench) -> None:
    host = StandInHost()
    install_to_probation(bench, host)
    host.counts["digits"] = idle_totals(count=10, errors=5)
    rolled_back = host.wait_for("rolled_back")
    assert (rolled_back["reason"], rolled_back["to"]) == ("probation_errors", "digits:1.0.0")
    assert host.states()[-2:] == ["REVERTING", "IDLE"]
    wait_for(lambda: len(host.activated) == 2, 10, "the factory model to be served again")
    assert host.activated[-1] == bench.factory and host.serving("digits") == bench.factory


def test_the_restart_table_continues_probation_and_reverts_a_crash_loop_without_the_network(bench: Bench) -> None:
    first = StandInHost()
    install_to_probation(bench, first).close(5)  # a clean stop in PROBATION
    bench.fleet.stop()  # from here on, no repository

    again = StandInHost()
    continued = bench.installer(again)
    served = continued.recover(lambda cfg: cfg)
    assert served["digits"].release == "digits:1.1.0"  # the release on probation is served at once
    resumed = {"state": "PROBATION", "release": "digits:1.1.0", "seq": 1, "restarts": 0, "action": "CONTINUE_PROBATION"}
    assert again.of("install_resumed") == [resumed]
    continued.close(5)

    # As if the agent had crashed in probation twice already: the third start reverts, before serving anything.
    store = SlotStore(bench.state_dir)
    slots, stored = store.load("digits")
    crashed = replace(InstallRecord.from_dict(stored), restarts=2, clean_stop=False)
    store.save("digits", slots, crashed.to_dict())
    store.close()
    looped = StandInHost()
    served = bench.installer(looped).recover(lambda cfg: cfg)
    assert served["digits"] == bench.factory
    rolled_back = looped.wait_for("rolled_back")
    assert (rolled_back["reason"], rolled_back["detail"]) == ("crash_loop", "3 agent restarts in PROBATION")
    assert looped.states() == ["REVERTING", "IDLE"] and looped.activated == []
