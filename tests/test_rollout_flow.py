"""Rollout campaigns end to end: `fleet rollout create` on a running fleet service, 30 whole simulated devices
(`firmware-sim run --enroll`: the agent's own update path, probation included) on its embedded broker, and the
campaign's outcome as `fleet rollout status --json` and the devices themselves tell it.

Every device first runs digits:1.0.0 (the good model, assigned and committed), so a rollback has a committed release
to return to. One fleet serves the flows of this module in turn: each creates its campaign and waits for its end.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet_fixtures import wait_for
from test_release_cli import fleet, ok_json, publish
from test_sim_fleet import enrolled_sim, listed

from fleet.server import FleetServer, ServerSettings

DEVICES = 30
ENDS = ("succeeded", "rolled_back", "aborted")


@pytest.fixture
def fleet_of_30(tmp_path: Path, example_model: Callable[[str], Path]) -> Iterator[tuple[Path, list[str]]]:
    """A running fleet service and 30 simulated devices on digits:1.0.0, committed; releases 1.1.0 (better),
    1.2.0 (inaccurate), 1.3.0 (slow) and 1.4.0 (broken) published."""
    home = tmp_path / "home"
    ok_json("init", "--home", home)
    with FleetServer(ServerSettings(home=home, ingest_workers=0, log_level="WARNING", rollout_tick_s=0.5)):
        for variant, version in (("good", "1.0.0"), ("better", "1.1.0"), ("broken", "1.4.0")):
            publish(home, example_model(variant) / "int8.onnx", f"digits:{version}")
        with enrolled_sim(home, tmp_path, example_model, "--sites", "3", devices=DEVICES) as ids:
            assigned = fleet("assign", *ids, "--release", "digits:1.0.0", "--home", home)
            assert assigned.exit_code == 0, assigned.output
            wait_for(lambda: all(d["releases"] == {"digits": "digits:1.0.0"} for d in listed(home).values()), 180,
                     "every device on digits:1.0.0")  # fmt: skip
            yield home, ids


def rollout(home: Path, *args: str) -> str:
    return ok_json("rollout", "create", *args, "--home", home, "--json")["id"]


def status(home: Path, campaign: str) -> dict[str, Any]:
    return ok_json("rollout", "status", campaign, "--home", home)


def ended(home: Path, campaign: str, timeout: float) -> dict[str, Any]:
    return wait_for(lambda: (s := status(home, campaign))["state"] in ENDS and s, timeout, f"{campaign} to end")


def test_a_good_release_reaches_every_device_wave_by_wave_and_a_broken_one_stops_in_its_first_wave_and_rolls_back(
    fleet_of_30: tuple[Path, list[str]],
) -> None:
    home, _ = fleet_of_30
    good = rollout(home, "--release", "digits:1.1.0", "--waves", "10,50,100", "--soak", "2s", "--seed", "7",
                   "--spread-by", "site")  # fmt: skip
    done = ended(home, good, 240)
    assert done["state"] == "succeeded", json.dumps(done)[:3000]
    assert [w["devices"] for w in done["waves"]] == [3, 12, 15]
    assert all(d["state"] == "succeeded" for d in done["devices"]), done["devices"]
    assert all(d["releases"] == {"digits": "digits:1.1.0"} for d in listed(home).values())
    Path("/tmp/good.json").write_text(json.dumps(done, indent=1))

    broken = rollout(home, "--release", "digits:1.4.0", "--soak", "2s", "--seed", "7")
    done = ended(home, broken, 240)
    assert done["state"] == "rolled_back", json.dumps(done)[:3000]
    first_wave = {d["device_id"] for d in done["devices"] if d["wave"] == 1}
    assert done["reason"].startswith("wave 1: failed")
    touched = {d["device_id"] for d in done["devices"] if d["state"] != "queued"}
    assert touched == first_wave
    audit = json.loads(fleet("audit", "--json", "--home", home).stdout)
    sent_broken = {e["subject"] for e in audit["entries"] if e["action"] == "assign"
                   and e["detail"].get("release") == "digits:1.4.0"}  # fmt: skip
    assert sent_broken == first_wave, "no device outside the first wave was ever sent the broken release"
    assert all(d["releases"] == {"digits": "digits:1.1.0"} for d in listed(home).values())
    Path("/tmp/broken.json").write_text(json.dumps(done, indent=1))
