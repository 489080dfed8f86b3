"""Drift end to end: a scenario on whole simulated devices (`firmware-sim run --enroll --scenario`) against a running
fleet service and its real broker; the one device whose lens gets dirty is the one drift alarm `fleet drift status`
shows, with the pixels that went dark."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from fleet_fixtures import wait_for
from test_release_cli import fleet, ok_json, publish
from test_sim_fleet import enrolled_sim, listed

from fleet.server import FleetServer, ServerSettings

SCENARIO = """
name = "one dirty lens"
[fleet]
rate = 50
window = 1

[[drift]]
kind = "occlusion"
size = 0.5
start = {start}
devices = ["drf-0003"]
"""


@pytest.mark.slow  # 26 s: the default run is past its 10 minutes; test_drift_detector covers the same on a real store
def test_one_device_whose_lens_gets_dirty_is_the_one_drift_alarm_of_the_fleet(
    tmp_path: Path, example_model: Callable[[str], Path]
) -> None:
    home = tmp_path / "home"
    ok_json("init", "--home", home)
    scenario = tmp_path / "lens.toml"
    scenario.write_text(SCENARIO.format(start=1))  # before its first window on the release: its data never looks right
    settings = ServerSettings(home=home, ingest_workers=0, log_level="WARNING", drift_round_s=1.0)
    with FleetServer(settings):
        publish(home, example_model("good") / "int8.onnx", "digits:1.0.0")
        sim = enrolled_sim(home, tmp_path, example_model, "--scenario", str(scenario), devices=6, id_prefix="drf")
        with sim as ids:
            assert fleet("assign", *ids, "--release", "digits:1.0.0", "--home", home).exit_code == 0
            wait_for(lambda: all(d["releases"] == {"digits": "digits:1.0.0"} for d in listed(home).values()), 120,
                     "every device on digits:1.0.0")  # fmt: skip

            def alarmed() -> list[dict]:
                return [d for d in ok_json("drift", "status", "--home", home) if d["state"] == "drift"]

            found = wait_for(lambda: {d["kind"]: d for d in alarmed() if d["kind"] == "data"}, 120, "the dirty lens")
            assert {(d["scope"], d["device_id"]) for d in alarmed()} == {("device", "drf-0003")}, alarmed()
            assert all(f["direction"] < 0 for f in found["data"]["features"]), "pixels went dark"
            shown = json.loads(fleet("drift", "show", "drf-0003", "--json", "--home", home).stdout)
            assert {t["kind"] for t in shown["tracks"]} >= {"data", "prediction", "accuracy", "concept"}
            actions = [e["action"] for e in json.loads(fleet("audit", "--json", "--home", home).stdout)["entries"]]
            assert "drift_alarm" in actions
