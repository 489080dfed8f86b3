"""Scenarios: a TOML file and a seed make a simulated run reproducible, and its report is the ground truth.

Everything is real: the session's Mosquitto, the fleet's ingest and SQLite store, the project's digits model, the
fault-injecting proxy forwarding to the real broker, and `firmware-sim` as a process where the user meets it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import test_sim_cli
from click.testing import CliRunner
from fleet_fixtures import wait_for

from firmware_sim.cli import main as firmware_sim
from firmware_sim.scenario import Scenario, ScenarioError, device_tags, shipped
from firmware_sim.simulator import SimSettings, Simulation
from fleet.broker import MosquittoBroker
from fleet.ingest.mqtt import Ingest
from fleet.store import Store, open_store

LAUNCH = "from firmware_sim.launcher import main; main()"

TOUR = """
name = "ground truth"
[fleet]
devices = 6
sites = 2
duration = 3
window = 1
rate = 10
[[drift]]
kind = "brightness"
size = 0.4
tag = "site=site-1"
[[drift]]
kind = "noise"
size = 0.2
share = 0.5
start = 1
[[fault]]
kind = "flaky_link"
disconnect_every = 0.75
blackhole_every = 2
blackhole_s = 0.3
share = 0.34
[[fault]]
kind = "clock_skew"
offset = -30
devices = ["ID-0005"]
"""


#: The fleet's ingest on the session's broker (windows count as acknowledged only once it stored them), as
#: test_sim_cli's runs have it.
fleet = test_sim_cli.fleet


def scenario_file(tmp_path: Path, text: str, id_prefix: str) -> Path:
    path = tmp_path / f"scenario-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(text.replace("ID-", f"{id_prefix}-"))
    return path


def sim(tmp_path: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", LAUNCH, "run", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path)  # fmt: skip


def ground_truth(report: dict[str, Any]) -> dict[str, Any]:
    return {d["device_id"]: {k: d[k] for k in ("tags", "drifts", "faults")} for d in report["devices"]}


def test_the_same_scenario_and_seed_give_the_same_ground_truth_in_one_process_or_two(
    tmp_path: Path, broker: MosquittoBroker, fleet: Ingest, example_model: Callable[[str], Path]
) -> None:
    prefix = f"gt{uuid.uuid4().hex[:6]}"
    path = scenario_file(tmp_path, TOUR, prefix)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "good-0").symlink_to(example_model("good"))
    common = ["--broker", broker.url, "--scenario", str(path), "--id-prefix", prefix, "--model-dir",
              str(tmp_path / "models")]  # fmt: skip
    one = sim(tmp_path, *common, "--report", "one.json")
    two = sim(tmp_path, *common, "--shards", "2", "--json")
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    first, second = json.loads((tmp_path / "one.json").read_text()), json.loads(two.stdout)
    assert ground_truth(first) == ground_truth(second), "same file and seed: the same plan, in one process or two"
    ids = [f"{prefix}-{i:04d}" for i in range(6)]
    scenario, tags = Scenario.load(path), device_tags(ids, {}, 2)
    assert ground_truth(first) == scenario.plan(tags, 0, 3).to_json()["devices"], "the report is the plan"
    assert ground_truth(first) != scenario.plan(tags, 2, 3).to_json()["devices"], "another seed: another plan"

    truth = ground_truth(first)
    assert {d: t["tags"] for d, t in truth.items()} == {f"{prefix}-{i:04d}": {"site": f"site-{i % 2}"}
                                                         for i in range(6)}  # fmt: skip
    bright = {d for d, t in truth.items() if any(x["kind"] == "brightness" for x in t["drifts"])}
    assert bright == {f"{prefix}-{i:04d}" for i in (1, 3, 5)}, "the drift of one tag reaches its devices only"
    assert sum(any(x["kind"] == "noise" for x in t["drifts"]) for t in truth.values()) == 3, "half the fleet"
    flaky = [t["faults"][0] for t in truth.values() if t["faults"] and t["faults"][0]["kind"] == "flaky_link"]
    # Ids carry a random prefix, so the seeded times differ per run: one at least disconnects within the 3 s in all but
    # 3 runs of 10,000 (e^-4 per device).
    assert len(flaky) == 2 and any(f["disconnects_at_s"] for f in flaky), "a third of the fleet, with its times"
    for device in first["devices"]:  # a flaky link, reconnects and all, loses no window
        assert device["windows_produced"] == device["windows_acked"] > 0, device
    assert sum(d["connects"] for d in first["devices"]) > 6, "the flaky links did drop connections"
    skewed = fleet.store.telemetry(f"{prefix}-0005").windows
    assert skewed and all(25 < w["received_at"] - w["window_end"] < 40 for w in skewed), "its clock is 30 s behind"


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("[[fault]]\nkind = 'meltdown'", "kind 'meltdown' is not a fault; use one of silent"),
        ("[[fault]]\nkind = 'silent'\nconnection = 'half'", 'connection must be "open" or "dropped"'),
        ("[[fault]]\nkind = 'silent'\nstart = 10\nend = 5", "end (5 s) must come after start (10 s)"),
        ("[[fault]]\nkind = 'silent'\nrate = 5", "silent has no setting 'rate'"),
        ("[[fault]]\nkind = 'broker_restart'\ntag = 'site=a'", "a broker restart is fleet-wide"),
        ("[[drift]]\nkind = 'brightness'\nsize = 3", "drift size 3.0 must be between 0 and 1"),
        ("[[drift]]\nkind = 'noise'\nsize = 0.1\ntag = 'north'", "tag 'north' is not KEY=VALUE"),
        ("[fleet]\ndevices = 'many'", "devices must be a int"),
        ("[fleet\n", "is not TOML"),
    ],
)
def test_a_scenario_mistake_is_refused_in_one_line_that_names_the_entry(tmp_path: Path, text: str, said: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = CliRunner().invoke(firmware_sim, ["run", "--broker", "mqtt://127.0.0.1:1", "--scenario", str(path)])
    assert result.exit_code == 2 and (result.exception is None or isinstance(result.exception, SystemExit))
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and said in errors[0] and str(path) in errors[0], result.output


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("[[fault]]\nkind = 'power_loss'", "the scenario's power_loss acts on installs: run with --enroll"),
        ("[[fault]]\nkind = 'cut_download'\nshare = 0.5", "the scenario's cut_download acts on installs"),
        ("[[fault]]\nkind = 'broker_restart'", "run with --start-broker PORT"),
    ],
)
def test_a_fault_the_run_cannot_give_is_refused_in_one_line_before_any_device_starts(
    tmp_path: Path, text: str, said: str, example_model: Callable[[str], Path]
) -> None:
    path = tmp_path / "needs.toml"
    path.write_text(text)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "good-0").symlink_to(example_model("good"))
    done = sim(tmp_path, "--broker", "mqtt://127.0.0.1:1", "--scenario", str(path), "--model-dir",
               str(tmp_path / "models"), "--state-dir", str(tmp_path / "devices"), timeout=60)  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and said in errors[0], done.stderr
    assert not list((tmp_path / "devices").glob("*/outbox.sqlite")), "no device was set up"


def test_every_shipped_scenario_loads_and_plans_with_its_own_fleet() -> None:
    for name in ("faults-tour", "site-drift", "broker-restart"):
        scenario = Scenario.load(shipped(name))
        fleet = scenario.fleet
        ids = [f"sim-{i:04d}" for i in range(fleet["devices"])]
        plan = scenario.plan(device_tags(ids, fleet.get("tags", {}), fleet.get("sites")), 0, fleet["duration"])
        assert list(plan.devices) == ids
        assert any(p.faults or p.drifts for p in plan.devices.values()) or plan.broker_restarts, name
    with pytest.raises(ScenarioError, match="cannot read the scenario"):
        Scenario.load(shipped("no-such-scenario"))


def test_a_shipped_scenario_runs_by_name_and_reports_its_ground_truth(
    tmp_path: Path, private_broker: MosquittoBroker, example_model: Callable[[str], Path]
) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "good-7").symlink_to(example_model("good"))  # the scenario's seed is 7
    store = open_store(tmp_path / "fleet.db")  # a broker and fleet of the test's own: the scenario names sim-0004
    ingest = Ingest(store, private_broker.url, client_id="shipped-fleet")
    ingest.start()
    try:
        done = sim(tmp_path, "--broker", private_broker.url, "--scenario", "site-drift", "--duration", "3",
                   "--window", "1", "--model-dir", str(tmp_path / "models"), "--report", "truth.json")  # fmt: skip
    finally:
        ingest.stop()
        store.close()
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "truth.json").read_text())
    assert report["scenario"] == "site drift" and report["seed"] == 7 and len(report["devices"]) == 30
    kinds = {d["device_id"]: [x["kind"] for x in d["drifts"]] for d in report["devices"]}
    assert kinds["sim-0004"][:2] == ["occlusion", "brightness"], "one lens, and its site's light"
    assert all("prior" in k for k in kinds.values()), "the fleet-wide class mix"
    assert sum("concept" in k for k in kinds.values()) == 3, "a tenth of 30"

    other = sim(tmp_path, "--broker", private_broker.url, "--scenario", "site-drift", "--id-prefix", "north",
                "--model-dir", str(tmp_path / "models"), timeout=60)  # fmt: skip
    errors = [line for line in other.stderr.splitlines() if line.startswith("Error: ")]
    assert other.returncode == 1 and len(errors) == 1, other.stderr[-2000:]
    assert "[[drift]] #1 names sim-0004, which is not in this fleet of 30 (north-0000, ...)" in errors[0]


def test_the_faults_tour_plans_every_fault() -> None:
    scenario = Scenario.load(shipped("faults-tour"))
    fleet = scenario.fleet
    ids = [f"sim-{i:04d}" for i in range(fleet["devices"])]
    plan = scenario.plan(device_tags(ids, fleet["tags"], fleet["sites"]), fleet["seed"], fleet["duration"])
    planned = {s.fault.kind for p in plan.devices.values() for s in p.faults}
    assert planned == {"silent", "flaky_link", "slow_download", "cut_download", "clock_skew", "power_loss"}
    assert all(p.tags["hw"] == "sim" for p in plan.devices.values())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_broker_the_run_started_restarts_without_its_state_and_the_fleet_still_gets_every_window(
    tmp_path: Path, example_model: Callable[[str], Path]
) -> None:
    path = tmp_path / "restart.toml"
    path.write_text("[fleet]\ndevices = 5\nduration = 8\nwindow = 1\nrate = 10\n"
                    "[[fault]]\nkind = 'broker_restart'\nstart = 4\ndown = 1\n")  # fmt: skip
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "good-0").symlink_to(example_model("good"))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, "run", "--start-broker", str(port), "--scenario", str(path), "--json",
         "--model-dir", str(tmp_path / "models")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert proc.stderr is not None
    first = proc.stderr.readline()
    assert first.strip() == f"broker: mqtt://127.0.0.1:{port}", first
    store = open_store(tmp_path / "fleet.db")
    ingest = Ingest(store, f"mqtt://127.0.0.1:{port}", client_id="restart-fleet")
    ingest.start()
    try:
        out, err = proc.communicate(timeout=180)
    finally:
        ingest.stop()
        store.close()
    assert proc.returncode == 0, err[-3000:]
    report = json.loads(out)
    assert [r["down_s"] >= 1 for r in report["broker_restarts"]] == [True]
    totals = report["totals"]
    assert totals["windows_produced"] == totals["windows_acked"] > 0, "nothing lost to the restart"
    connects = [d["connects"] for d in report["devices"]]
    assert all(n >= 2 for n in connects), f"every device reconnected after the restart: {connects}"


def stored_between(store: Store, device_id: str, start: float, end: float) -> int:
    return sum(1 for w in store.telemetry(device_id).windows if start <= w["received_at"] < end)


def test_a_silent_device_tells_the_fleet_nothing_while_silent_and_delivers_what_it_kept_once_it_speaks_again(
    tmp_path: Path, broker: MosquittoBroker, fleet: Ingest, example_model: Callable[[str], Path]
) -> None:
    prefix = f"sl{uuid.uuid4().hex[:6]}"
    ids = [f"{prefix}-{i:04d}" for i in range(4)]
    scenario = Scenario.parse({"fault": [
        {"kind": "silent", "connection": "open", "start": 2, "end": 6, "devices": [ids[0]]},
        {"kind": "silent", "connection": "dropped", "start": 2, "end": 6, "devices": [ids[1]]},
        {"kind": "silent", "connection": "open", "start": 2, "devices": [ids[2]]},
    ]})  # fmt: skip
    plan = scenario.plan(device_tags(ids, {}, None), seed=0, duration_s=9)
    settings = SimSettings(devices=4, broker=broker.url, state_root=tmp_path / "devices", id_prefix=prefix,
                           model_dir=example_model("good"), duration_s=9, window_s=1, rate_hz=10,
                           plan=plan.devices)  # fmt: skip
    simulation = Simulation(settings)
    reports: list[dict[str, Any]] = []
    runner = threading.Thread(target=lambda: reports.append(simulation.run()))
    started = time.time()
    runner.start()
    wait_for(lambda: time.time() > started + 4.5, 10, "the middle of the silent spell")
    during = {d: fleet.store.device(d) for d in ids}
    runner.join(120)
    assert reports, "the run ended"
    by_id = {d["device_id"]: d for d in reports[0]["devices"]}
    store = fleet.store
    for device in ids[:3]:
        assert stored_between(store, device, started + 3, started + 6) == 0, f"{device} said nothing while silent"
    assert stored_between(store, ids[3], started + 3, started + 6) >= 2, "the others went on"
    hung, cut_off = during[ids[0]], during[ids[1]]
    assert hung is not None and hung.device.online, "silent with its connection open: still online"
    assert cut_off is not None and not cut_off.device.online, "its network dropped: the broker's will says so"
    for device in (ids[0], ids[1], ids[3]):
        assert by_id[device]["windows_produced"] == by_id[device]["windows_acked"] > 0, by_id[device]
        assert not by_id[device]["silent_at_end"]
    silent = by_id[ids[2]]
    assert silent["silent_at_end"] and silent["windows_acked"] < silent["windows_produced"], silent
