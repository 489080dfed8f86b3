"""The campaign controller, one round at a time: a real store, real signed releases, the real session broker, and a
fake clock (the only fake) for maintenance windows, soaks and device timeouts.

Devices are registered in the store by their births and enrollments, as the ingest and `fleet enroll` would; their
progress is the events the ingest would store from them, each answering the desired state the controller sent.
"""

from __future__ import annotations

import platform
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from test_release_cli import ok_json, publish

from agent import protocol
from fleet.broker import MosquittoBroker
from fleet.errors import FleetError
from fleet.ops import rollout as ops
from fleet.publisher import DesiredPublisher
from fleet.rollout.controller import CampaignController
from fleet.rollout.spec import parse_spec
from fleet.store import open_store
from fleet.store.api import Store
from fleet.store.rows import Campaign
from fleet.trust.repository import Repository

OLD, NEW = "digits:1.0.0", "digits:1.1.0"
BOOT = "e" * 32


class FakeClock:
    """The fleet's clock, moved by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def at_utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, example_model: Callable[[str], Path]) -> Path:
    """A fleet home with digits:1.0.0 (good) and digits:1.1.0 (better) published, made once and copied per test."""
    home = tmp_path_factory.mktemp("rollout-controller") / "home"
    ok_json("init", "--home", home)
    publish(home, example_model("good") / "int8.onnx", OLD)
    publish(home, example_model("better") / "int8.onnx", NEW)
    return home


class Fleet:
    """One test's fleet: its store and repository, its devices, and a controller factory."""

    def __init__(self, home: Path, broker_url: str) -> None:
        self.home, self.broker_url = home, broker_url
        self.store: Store = open_store(home / "fleet.db")
        self.repo = Repository(home, ledger=self.store)
        self.clock = FakeClock(time.time())
        self._outbox: Counter[str] = Counter()
        self.refs = {self.repo.release("digits", v)["target"]: f"digits:{v}" for v in ("1.0.0", "1.1.0")}

    def controller(self) -> CampaignController:
        return CampaignController(
            self.store, Repository(self.home, ledger=self.store), lambda: DesiredPublisher(self.broker_url),
            clock=self.clock,
        )  # fmt: skip

    def add_devices(self, n: int, *, tz: str | None = None, site: str = "north", runs: str = OLD) -> list[str]:
        ids = [f"rc-{uuid.uuid4().hex[:10]}" for _ in range(n)]
        self.store.write_batch(status=[self.birth(d, runs) for d in ids])
        for d in ids:
            self.store.record_enrollment(d, "test", {"tags": {"site": site, **({"tz": tz} if tz else {})}})
        return ids

    def birth(self, device_id: str, runs: str = OLD) -> dict[str, Any]:
        runtime = self.repo.release("digits", "1.1.0")["runtime"]
        return {"v": protocol.SCHEMA_VERSION, "device_id": device_id, "state": "online", "boot_id": BOOT,
                "agent_version": "0.4.0", "hardware": {"machine": platform.machine()}, "runtimes": [runtime],
                "models": {"digits": {"release": runs}}}  # fmt: skip

    def create(self, **options: Any) -> Campaign:
        spec = parse_spec(kpis=["none"], seed=1, **options)
        return ops.create(self.store, self.repo, "digits", "1.1.0", spec, actor="op").campaign

    def desired_ref(self, device_id: str) -> str | None:
        """The release the device's desired state names, or None if it was never sent one."""
        record = self.store.desired(device_id)
        return None if record is None else self.refs[record.models["digits"]["target"]]

    def desired_seq(self, device_id: str) -> int | None:
        record = self.store.desired(device_id)
        return None if record is None else record.seq

    def report(self, device_id: str, kind: str, *, state: str | None = None, reason: str | None = None,
               release: str = NEW) -> None:  # fmt: skip
        """The device's event answering its current desired state, as the ingest stores it."""
        self._outbox[device_id] += 1
        detail = {"release": release, "seq": self.desired_seq(device_id), "state": state, "reason": reason}
        self.store.write_batch(events=[{"v": protocol.SCHEMA_VERSION, "device_id": device_id, "boot_id": BOOT,
                                        "seq": self._outbox[device_id], "ts": self.clock.now, "type": kind,
                                        "model": "digits", "detail": detail}], received_at=self.clock.now)  # fmt: skip

    def states(self, campaign: Campaign) -> dict[str, str]:
        return {e.device_id: e.state for e in self.store.executions(campaign.id)}

    def waves(self, campaign: Campaign) -> list[list[str]]:
        executions = self.store.executions(campaign.id)
        return [[e.device_id for e in executions if e.wave == w] for w in range(campaign.waves)]

    def campaign(self, campaign: Campaign) -> Campaign:
        found = self.store.campaign(campaign.id)
        assert found is not None
        return found


@pytest.fixture
def fleet_home(template: Path, tmp_path: Path, broker: MosquittoBroker) -> Iterator[Fleet]:
    home = tmp_path / "home"
    shutil.copytree(template, home)
    f = Fleet(home, broker.url)
    yield f
    f.store.close()


def test_a_maintenance_window_defers_a_wave_until_it_opens(fleet_home: Fleet) -> None:
    f = fleet_home
    f.add_devices(4)
    campaign = f.create(window="0 2 * * * 1h", waves="50,100", soak="0s")
    first, second = f.waves(campaign)
    controller = f.controller()
    f.clock.now = at_utc("2026-03-02T01:30:00")
    controller.tick()
    assert f.campaign(campaign).state == "running"
    assert all(f.store.desired(d) is None for d in first + second)
    assert set(f.states(campaign).values()) == {"queued"}
    f.clock.now = at_utc("2026-03-02T02:10:00")
    controller.tick()
    assert {d: f.desired_ref(d) for d in first} == dict.fromkeys(first, NEW)
    assert all(f.store.desired(d).campaign == campaign.id for d in first)  # type: ignore[union-attr]
    assert all(f.store.desired(d) is None for d in second)
    assert {f.states(campaign)[d] for d in first} == {"notified"}


def test_a_device_s_maintenance_window_is_judged_in_its_own_time_zone(fleet_home: Fleet) -> None:
    f = fleet_home
    (tokyo,) = f.add_devices(1, tz="Asia/Tokyo")
    (utc,) = f.add_devices(1, tz="UTC")
    (untagged,) = f.add_devices(1)
    campaign = f.create(window="0 2 * * * 1h", waves="100", soak="0s")
    controller = f.controller()
    f.clock.now = at_utc("2026-03-02T02:10:00")  # 11:10 in Tokyo
    controller.tick()
    assert (f.desired_ref(utc), f.desired_ref(untagged), f.desired_ref(tokyo)) == (NEW, NEW, None)
    assert f.states(campaign)[tokyo] == "queued"
    f.clock.now = at_utc("2026-03-02T17:10:00")  # 02:10 the next day in Tokyo
    controller.tick()
    assert f.desired_ref(tokyo) == NEW


def test_a_device_succeeds_only_at_install_committed_and_the_next_wave_waits_for_the_soak(fleet_home: Fleet) -> None:
    f = fleet_home
    f.add_devices(4)
    campaign = f.create(waves="50,100", soak="10m")
    first, second = f.waves(campaign)
    controller = f.controller()
    controller.tick()
    for d in first:
        f.report(d, "desired_accepted")
        f.report(d, "install_state", state="DOWNLOADING")
        f.report(d, "install_state", state="PROBATION")
    controller.tick()
    assert {f.states(campaign)[d] for d in first} == {"probation"}
    assert f.campaign(campaign).wave_done_at is None
    for d in first:
        f.report(d, "install_committed")
    controller.tick()
    assert {f.states(campaign)[d] for d in first} == {"succeeded"}
    done_at = f.campaign(campaign).wave_done_at
    assert done_at == f.clock.now
    f.clock.advance(9 * 60)
    controller.tick()
    assert (f.campaign(campaign).wave, [f.store.desired(d) for d in second]) == (0, [None, None])
    f.clock.advance(61)
    controller.tick()
    assert f.campaign(campaign).wave == 1
    assert [f.desired_ref(d) for d in second] == [NEW, NEW]
    for d in second:
        f.report(d, "install_committed")
    controller.tick()
    controller.tick()
    f.clock.advance(601)
    controller.tick()
    ended = f.campaign(campaign)
    assert (ended.state, ended.reason) == ("succeeded", f"4 of 4 devices run {NEW}")


def test_a_silent_device_is_sent_again_then_times_out_and_the_timed_out_gate_rolls_back(fleet_home: Fleet) -> None:
    f = fleet_home
    f.add_devices(6)
    campaign = f.create(waves="50,100", soak="0s", device_timeout="1m", retries=1, max_timed_out=20)
    first, second = f.waves(campaign)
    silent, *speaking = first
    controller = f.controller()
    controller.tick()
    sent_seq = f.desired_seq(silent)
    for d in speaking:
        f.report(d, "install_committed")
    f.clock.advance(30)
    controller.tick()
    assert f.desired_seq(silent) == sent_seq
    f.clock.advance(31)
    controller.tick()
    resent = f.desired_seq(silent)
    assert resent is not None and sent_seq is not None and resent > sent_seq
    assert f.desired_ref(silent) == NEW
    (row,) = [e for e in f.store.executions(campaign.id) if e.device_id == silent]
    assert (row.state, row.attempts, row.desired_seq, row.first_seq) == ("notified", 2, resent, sent_seq)
    f.clock.advance(61)
    controller.tick()
    rolling = f.campaign(campaign)
    assert rolling.state == "rolling_back"
    assert rolling.reason == "wave 1: timed out 1 of 3 devices (33%; limit 20%)"
    assert [f.desired_ref(d) for d in first] == [OLD, OLD, OLD]
    assert [f.store.desired(d) for d in second] == [None] * len(second)
    states = f.states(campaign)
    assert {states[d] for d in first} == {"rolling_back"}
    assert {states[d] for d in second} == {"queued"}
    decisions = [(d.gate, d.verdict, d.action) for d in f.store.decisions(campaign.id) if d.action]
    assert decisions == [("timed_out", "fail", "rollback")]
    for d in first:
        f.report(d, "install_committed", release=OLD)
    controller.tick()
    assert f.campaign(campaign).state == "rolled_back"
    assert {f.states(campaign)[d] for d in first} == {"rolled_back"}
    assert [f.store.desired(d) for d in second] == [None] * len(second)


def test_a_controller_built_again_on_the_same_store_continues_where_the_last_stopped(fleet_home: Fleet) -> None:
    f = fleet_home
    f.add_devices(4)
    campaign = f.create(waves="50,100", soak="10m")
    first, second = f.waves(campaign)
    f.controller().tick()
    seqs = {d: f.desired_seq(d) for d in first}
    f.report(first[0], "install_committed")
    f.report(first[1], "install_state", state="PROBATION")
    restarted = f.controller()
    restarted.tick()
    assert {d: f.desired_seq(d) for d in first} == seqs
    assert [f.states(campaign)[d] for d in first] == ["succeeded", "probation"]
    f.report(first[0], "install_committed")  # the outbox sends it again after a reconnect
    f.report(first[1], "install_committed")
    again = f.controller()
    again.tick()
    again.tick()
    counts = Counter(f.states(campaign).values())
    assert counts == Counter({"succeeded": 2, "queued": 2})
    assert {d: f.desired_seq(d) for d in first} == seqs
    assert [f.store.desired(d) for d in second] == [None, None]
    attempts = {e.device_id: e.attempts for e in f.store.executions(campaign.id)}
    assert [attempts[d] for d in first] == [1, 1]


def test_an_operator_pauses_resumes_and_aborts_a_campaign_and_every_action_is_audited(fleet_home: Fleet) -> None:
    f = fleet_home
    f.add_devices(6)
    campaign = f.create(waves="34,67,100", soak="0s")
    first, second, third = f.waves(campaign)
    assert first and second and third
    controller = f.controller()
    controller.tick()
    for d in first:
        f.report(d, "install_committed")
    controller.tick()
    assert f.campaign(campaign).wave_done_at is not None
    assert ops.act(f.store, campaign.id, "pause", actor="op").state == "paused"
    f.clock.advance(60)
    controller.tick()
    controller.tick()
    assert f.campaign(campaign).state == "paused"
    assert all(f.store.desired(d) is None for d in second + third)
    assert ops.act(f.store, campaign.id, "resume", actor="op").state == "running"
    controller.tick()
    assert [f.desired_ref(d) for d in second] == [NEW] * len(second)
    for d in second:
        f.report(d, "install_committed")
    controller.tick()
    assert ops.act(f.store, campaign.id, "abort", actor="op", reason="enough").state == "aborted"
    f.clock.advance(60)
    controller.tick()
    ended = f.campaign(campaign)
    assert (ended.state, ended.reason) == ("aborted", "enough")
    assert all(f.store.desired(d) is None for d in third)
    assert {f.states(campaign)[d] for d in third} == {"queued"}
    trail = [(a.actor, a.action) for a in f.store.audit() if a.subject == campaign.id]
    assert [t for t in trail if t[0] == "op"] == [("op", "rollout_create"), ("op", "rollout_pause"),
                                                  ("op", "rollout_resume"), ("op", "rollout_abort")]  # fmt: skip
    assert ("controller", "rollout_start") in trail
    assert trail.count(("controller", "rollout_wave")) == 2
    with pytest.raises(FleetError, match="aborted campaign cannot resume: it takes rollback"):
        ops.act(f.store, campaign.id, "resume", actor="op")


def test_a_second_campaign_of_the_model_on_overlapping_devices_is_refused_and_nothing_is_created(
    fleet_home: Fleet,
) -> None:
    f = fleet_home
    north = f.add_devices(3, site="north")
    f.add_devices(3, site="south")
    first = f.create(select="site=north")
    audit_before = len(f.store.audit())
    with pytest.raises(FleetError) as refused:
        f.create()
    assert refused.value.reason == "overlapping_campaign"
    assert first.id in refused.value.detail
    assert [c.id for c in f.store.campaigns()] == [first.id]
    assert len(f.store.audit()) == audit_before
    other = f.create(select="site=south")
    assert {e.device_id for e in f.store.executions(other.id)}.isdisjoint(north)


def test_a_device_sent_its_state_in_a_maintenance_window_is_timed_out_on_the_same_clock(fleet_home: Fleet) -> None:
    f = fleet_home
    (device,) = f.add_devices(1)
    campaign = f.create(window="0 2 * * * 1h", waves="100", soak="0s", device_timeout="1m", retries=1)
    controller = f.controller()
    f.clock.now = at_utc("2020-03-02T02:10:00")
    controller.tick()
    sent_seq = f.desired_seq(device)
    (row,) = f.store.executions(campaign.id)
    assert row.notified_at == f.clock.now
    f.clock.advance(61)
    controller.tick()
    resent = f.desired_seq(device)
    assert sent_seq is not None and resent is not None and resent > sent_seq


def test_a_rollback_of_devices_on_a_factory_model_ends_leaving_them_where_they_are_and_says_why(
    fleet_home: Fleet,
) -> None:
    f = fleet_home
    factory = f.add_devices(2, runs="digits:good")  # the model their image came with: no signed release to send
    returnable = f.add_devices(1)
    campaign = f.create(waves="100", soak="0s")
    controller = f.controller()
    controller.tick()
    for device in [*factory, *returnable]:
        f.report(device, "install_committed")
    controller.tick()
    ops.act(f.store, campaign.id, "rollback", actor="op")
    controller.tick()
    assert [f.desired_ref(d) for d in returnable] == [OLD]
    assert [f.desired_ref(d) for d in factory] == [NEW, NEW], "nothing to send them: their state stays"
    f.report(returnable[0], "install_committed", release=OLD)
    controller.tick()
    assert f.campaign(campaign).state == "rolled_back", "the rollback ends: it waits on no device it cannot send"
    rows = {e.device_id: e for e in f.store.executions(campaign.id)}
    assert rows[returnable[0]].state == "rolled_back"
    for device in factory:
        assert (rows[device].state, rows[device].reason) == ("succeeded", "nothing_to_return_to")
        assert "digits:good, which is not a published release" in (rows[device].detail or "")
