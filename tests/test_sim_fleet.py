"""Simulated devices as whole agents in a real fleet: `firmware-sim run --enroll` enrolls each device with the running
fleet service (`fleet enroll`'s bundle), `fleet assign` reaches them, and each installs the release through the agent's
own update path (director check, TUF, download, smoke-test child, probation on its simulated traffic) until the fleet
shows it committed. Everything is real: `fleet init`, the fleet service with its embedded broker and repository
server, the `fleet` CLI, the project's digits models and the `firmware-sim` console entry point as a process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from fleet_fixtures import wait_for
from test_release_cli import fleet, ok_json, publish

from firmware_sim.power import CUT_STATES
from fleet.server import FleetServer, ServerSettings

#: Issue 11's fleet for the install test; the other tests need fewer.
DEVICES = 30
LAUNCH = "from firmware_sim.launcher import main; main()"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Path]:
    """A fleet home made by `fleet init`, with its service running (embedded broker, repository, ingest)."""
    home = tmp_path / "home"
    ok_json("init", "--home", home)
    with FleetServer(ServerSettings(home=home, ingest_workers=0, log_level="WARNING")):
        yield home


def listed(home: Path) -> dict[str, dict[str, Any]]:
    return {d["device_id"]: d for d in ok_json("devices", "list", "--home", home)}


@contextlib.contextmanager
def enrolled_sim(
    home: Path,
    tmp_path: Path,
    example_model: Callable[[str], Path],
    *options: str,
    devices: int = 5,
    reports: list[dict[str, Any]] | None = None,
    id_prefix: str = "simfleet",
    processes: list[subprocess.Popen[str]] | None = None,
) -> Iterator[list[str]]:
    """`firmware-sim run --enroll` of ``devices`` devices on the fleet of ``home``, as a process; yields their ids
    once the fleet has heard from each, then ends the run (SIGTERM) and checks that the fleet acknowledged every
    window; the report is appended to ``reports``, the process to ``processes`` (to stop it, say)."""
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    if not (models / "good-0").exists():
        (models / "good-0").symlink_to(example_model("good"))
    sim = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, "run", "--enroll", "--home", str(home), "--devices", str(devices),
         "--duration", "120", "--window", "2", "--rate", "20", "--model-dir", str(models),
         "--state-dir", str(tmp_path / "devices"), "--id-prefix", id_prefix, "--json", *options],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    try:
        if processes is not None:
            processes.append(sim)
        ids = [f"{id_prefix}-{i:04d}" for i in range(devices)]
        wait_for(lambda: set(ids) <= set(listed(home)), 60, "the simulated devices reporting to the fleet")
        yield ids
    finally:
        sim.send_signal(signal.SIGCONT)  # in case the test stopped it
        sim.send_signal(signal.SIGTERM)  # the run ends early, with its report
        out, err = sim.communicate(timeout=120)
    assert sim.returncode == 0, err[-3000:]
    report = json.loads(out)
    assert report["totals"]["windows_produced"] == report["totals"]["windows_acked"] > 0
    if reports is not None:
        reports.append(report)


def last_installs(home: Path, ids: list[str]) -> dict[str, dict[str, Any]]:
    return {i: ok_json("devices", "show", i, "--home", home)["last_install"] or {} for i in ids}


def test_thirty_simulated_devices_enrolled_with_the_fleet_install_an_assigned_release_through_the_whole_update_path(
    served: Path, tmp_path: Path, example_model: Callable[[str], Path]
) -> None:
    home = served
    publish(home, example_model("better") / "int8.onnx", "digits:1.1.0")
    with enrolled_sim(home, tmp_path, example_model, "--sites", "2", "--tag", "hw=sim", devices=DEVICES) as ids:
        fleet_view = listed(home)
        assert [fleet_view[i]["tags"] for i in ids] == [{"hw": "sim", "site": f"site-{n % 2}"} for n in range(DEVICES)]
        audit = json.loads(fleet("audit", "--json", "--home", home).stdout)
        enrolled = {e["subject"] for e in audit["entries"] if (e["action"], e["actor"]) == ("enroll", "firmware-sim")}
        assert enrolled >= set(ids), "each device was enrolled (and audited) as `fleet enroll` does"
        assert all(fleet_view[i]["releases"] == {"digits": "digits:good"} for i in ids)

        assigned = fleet("assign", *ids, "--release", "digits:1.1.0", "--home", home)
        assert assigned.exit_code == 0, assigned.output

        def all_committed() -> bool:
            now = listed(home)
            return all(now[i]["releases"] == {"digits": "digits:1.1.0"} for i in ids) and all(
                last.get("type") == "install_committed" for last in last_installs(home, ids).values()
            )

        wait_for(all_committed, 240, "every simulated device serving digits:1.1.0, its install committed")
        for device_id, last in last_installs(home, ids).items():
            assert (last["release"], last["reason"]) == ("digits:1.1.0", ""), last
            state = tmp_path / "devices" / device_id
            assert (state / "bundle" / "agent.toml").is_file() and (state / "bundle" / "root.json").is_file()


#: A power cut at each install state: the success path's, on devices 0-6, and REVERTING on device 7 (the broken
#: release fails its smoke test there, so its install reverts).
CUTS = tuple(state.value for state in CUT_STATES)


def test_a_power_cut_at_each_install_state_of_a_simulated_device_ends_on_a_verified_working_model(
    served: Path, tmp_path: Path, example_model: Callable[[str], Path]
) -> None:
    home = served
    publish(home, example_model("better") / "int8.onnx", "digits:1.1.0")
    publish(home, example_model("broken") / "int8.onnx", "digits:1.9.0")
    better_sha256 = hashlib.sha256((example_model("better") / "int8.onnx").read_bytes()).hexdigest()
    scenario = tmp_path / "cuts.toml"
    scenario.write_text("".join(f"[[fault]]\nkind = 'power_loss'\nstate = '{state}'\ndevices = ['simfleet-{i:04d}']\n"
                                for i, state in enumerate(CUTS)))  # fmt: skip
    reports: list[dict[str, Any]] = []
    with enrolled_sim(home, tmp_path, example_model, "--scenario", str(scenario), devices=len(CUTS),
                      reports=reports) as ids:  # fmt: skip
        good, bad = ids[:-1], ids[-1]
        assert fleet("assign", *good, "--release", "digits:1.1.0", "--home", home).exit_code == 0
        assert fleet("assign", bad, "--release", "digits:1.9.0", "--home", home).exit_code == 0

        def settled() -> bool:
            last = last_installs(home, ids)
            return all(last[i].get("type") == "install_committed" for i in good) and last[bad].get("type") == (
                "install_failed"
            )

        wait_for(settled, 150, "every device's install settled after its power cut")
        fleet_view = listed(home)
        assert all(fleet_view[i]["releases"] == {"digits": "digits:1.1.0"} for i in good), fleet_view
        assert fleet_view[bad]["releases"] == {"digits": "digits:good"}, "the broken release reverted to the factory"
        assert last_installs(home, [bad])[bad]["reason"].startswith("smoke_")
    by_id = {d["device_id"]: d for d in reports[0]["devices"]}
    for device_id, state in zip(ids, CUTS, strict=True):
        device = by_id[device_id]
        assert [c["state"] for c in device["power_cuts"]] == [state] and device["boots"] == 2, device
        assert device["release"] == ("digits:good" if state == "REVERTING" else "digits:1.1.0"), device
        assert device["errors"] == 0 and device["inferences"] > 0, "it served predictions all along"
        status = json.loads((tmp_path / "devices" / device_id / "status.json").read_text())["models"]["digits"]
        assert status["release"] == device["release"], status
        if state != "REVERTING":  # the file it serves is the signed release's, byte for byte
            served = tmp_path / "devices" / device_id / "models" / "digits" / status["file"]
            assert hashlib.sha256(served.read_bytes()).hexdigest() == better_sha256 == Path(status["file"]).stem


def test_a_broken_release_is_refused_at_the_smoke_test_on_every_simulated_device_with_its_reason_in_the_fleet(
    served: Path, tmp_path: Path, example_model: Callable[[str], Path]
) -> None:
    home = served
    broken = example_model("broken")
    publish(home, broken / "int8.onnx", "digits:1.9.0")
    with enrolled_sim(home, tmp_path, example_model) as ids:
        assigned = fleet("assign", *ids, "--release", "digits:1.9.0", "--home", home)
        assert assigned.exit_code == 0, assigned.output
        wait_for(lambda: all(last.get("type") == "install_failed" for last in last_installs(home, ids).values()),
                 90, "every simulated device refusing digits:1.9.0")  # fmt: skip
        for last in last_installs(home, ids).values():
            assert last["release"] == "digits:1.9.0" and last["reason"].startswith("smoke_"), last
        assert all(d["releases"] == {"digits": "digits:good"} for d in listed(home).values())


def test_enroll_without_a_running_fleet_says_so_in_one_line(tmp_path: Path) -> None:
    ok_json("init", "--home", tmp_path / "home")
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", LAUNCH, "run", "--enroll", "--home", str(tmp_path / "home"), "--duration", "0"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert errors == [f"Error: no `fleet serve` runs on {tmp_path / 'home'}: start it, or pass --home of one that runs"]
    assert time.monotonic() - started < 60


def test_a_bad_tag_is_refused_in_one_line_before_any_device_is_enrolled(served: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", LAUNCH, "run", "--enroll", "--home", str(served), "--tag", "Site=x", "--duration", "0",
         "--state-dir", str(tmp_path / "devices")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "'Site=x' is not a tag; write KEY=VALUE" in errors[0], done.stderr
    assert not (tmp_path / "devices").exists() or not list((tmp_path / "devices").rglob("agent.toml"))
    assert listed(served) == {}


def test_run_needs_a_broker_enroll_or_a_broker_of_its_own() -> None:
    done = subprocess.run([sys.executable, "-c", LAUNCH, "run", "--duration", "0"], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    wanted = "pass --broker URL, --enroll to use the broker of the running `fleet serve`, or --start-broker PORT"
    assert done.returncode == 2 and wanted in done.stderr, done.stderr


@pytest.mark.slow  # the cut costs a 30 s retry back-off; tests/test_sim_netfaults.py covers the proxy in every run
def test_slow_and_cut_downloads_through_the_fault_proxy_delay_an_install_and_it_still_commits(
    served: Path, tmp_path: Path, example_model: Callable[[str], Path]
) -> None:
    home = served
    publish(home, example_model("better") / "int8.onnx", "digits:1.1.0")
    scenario = tmp_path / "downloads.toml"
    scenario.write_text(
        "[[fault]]\nkind = 'slow_download'\nrate = 4096\ndevices = ['simfleet-0000']\n"
        "[[fault]]\nkind = 'cut_download'\nafter = 6000\ntimes = 1\ndevices = ['simfleet-0001']\n"
    )
    reports: list[dict[str, Any]] = []
    with enrolled_sim(home, tmp_path, example_model, "--scenario", str(scenario), devices=3, reports=reports) as ids:
        assert fleet("assign", *ids, "--release", "digits:1.1.0", "--home", home).exit_code == 0
        wait_for(lambda: all(last.get("type") == "install_committed" for last in last_installs(home, ids).values()),
                 150, "every device committing digits:1.1.0")  # fmt: skip
        events = {i: ok_json("devices", "show", i, "--home", home)["last_events"] for i in ids}
    by_id = {d["device_id"]: d for d in reports[0]["devices"]}
    slow, cut, clean = (by_id[i] for i in ids)
    assert slow["network"]["repo"]["bytes_down"] > 8192 and slow["network"]["repo"]["cuts"] == 0
    assert cut["network"]["repo"]["cuts"] == 1, "one download connection was cut"
    assert clean["network"] == {}, "a device without network faults connects straight to the broker and repository"

    def download_s(device_id: str) -> float:
        states = {e["detail"].get("state"): datetime.fromisoformat(e["ts"]) for e in events[device_id]
                  if e["type"] == "install_state"}  # fmt: skip
        return (states["VERIFYING"] - states["DOWNLOADING"]).total_seconds()

    assert download_s(ids[0]) > 1.5 > download_s(ids[2]), "at 4 KiB/s the 8 KiB release takes seconds"
    outcomes = ("install_failed", "install_retry_scheduled", "install_committed")
    told = [(e["type"], e["detail"].get("reason")) for e in reversed(events[ids[1]]) if e["type"] in outcomes]
    assert told == [
        ("install_failed", "tuf_refresh_failed"),
        ("install_retry_scheduled", "tuf_refresh_failed"),
        ("install_committed", ""),
    ], "metadata cut mid-file: the refresh failed, was retried, went through"
