"""Rollout campaigns end to end: `fleet rollout create` on a running fleet service, whole simulated devices
(`firmware-sim run --enroll`: the agent's own update path, smoke test and probation included) on its broker, and the
campaign's outcome as `fleet rollout status --json`, the audit log and the devices themselves tell it.

Every device first runs digits:1.0.0 (the good model, assigned and committed), so a rollback has a committed release
to return to. The 30 devices of ``fleet_of_30`` (half their predictions come back labelled: feedback) serve the first
tests of this module in turn, each creating its campaign and waiting for its end; the tests that stop devices or kill
the fleet service run fleets of their own.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet_fixtures import wait_for
from test_release_cli import fleet, ok_json, publish
from test_sim_fleet import enrolled_sim, listed

from fleet.broker import MosquittoBroker
from fleet.server import FleetServer, ServerSettings

DEVICES = 30
ENDS = ("succeeded", "rolled_back", "aborted")
#: The releases every fleet here has: variant of the example model -> version.
RELEASES = {"good": "1.0.0", "better": "1.1.0", "inaccurate": "1.2.0", "slow": "1.3.0", "broken": "1.4.0"}


def on_release(home: Path, ref: str, ids: list[str]) -> bool:
    now = listed(home)
    return all(now[i]["releases"] == {"digits": ref} for i in ids)


def publish_all(home: Path, example_model: Callable[[str], Path]) -> None:
    for variant, version in RELEASES.items():
        publish(home, example_model(variant) / "int8.onnx", f"digits:{version}")


def assign_good(home: Path, ids: list[str]) -> None:
    assigned = fleet("assign", *ids, "--release", "digits:1.0.0", "--home", home)
    assert assigned.exit_code == 0, assigned.output
    wait_for(lambda: on_release(home, "digits:1.0.0", ids), 180, "every device on digits:1.0.0")


@pytest.fixture(scope="module")
def fleet_of_30(
    tmp_path_factory: pytest.TempPathFactory, example_model: Callable[[str], Path]
) -> Iterator[tuple[Path, list[str]]]:
    """A running fleet service and 30 simulated devices over 3 sites on digits:1.0.0, committed; every release of
    ``RELEASES`` published."""
    tmp_path = tmp_path_factory.mktemp("rollout")
    home = tmp_path / "home"
    ok_json("init", "--home", home)
    with FleetServer(ServerSettings(home=home, ingest_workers=0, log_level="WARNING", rollout_tick_s=0.5)):
        publish_all(home, example_model)
        with enrolled_sim(home, tmp_path, example_model, "--sites", "3", "--feedback", "0.5", devices=DEVICES) as ids:
            assign_good(home, ids)
            yield home, ids


def create(home: Path, *args: str) -> str:
    return ok_json("rollout", "create", *args, "--home", home, "--json")["id"]


def status(home: Path, campaign: str) -> dict[str, Any]:
    return ok_json("rollout", "status", campaign, "--home", home)


def ended(home: Path, campaign: str, timeout: float) -> dict[str, Any]:
    done = wait_for(lambda: (s := status(home, campaign))["state"] in ENDS and s, timeout, f"{campaign} to end")
    print(f"{campaign}: {done['state']}: {done['reason']}")  # what a failed assertion on it should be read with
    return done


def sent(home: Path, release: str) -> list[str]:
    """The devices the audit log says were sent a desired state naming ``release``, once per send."""
    entries = json.loads(fleet("audit", "--json", "--home", home).stdout)["entries"]
    return [e["subject"] for e in entries if e["action"] == "assign" and e["detail"].get("release") == release]


def touched(done: dict[str, Any]) -> set[str]:
    return {d["device_id"] for d in done["devices"] if d["state"] != "queued"}


def wave(done: dict[str, Any], n: int) -> set[str]:
    return {d["device_id"] for d in done["devices"] if d["wave"] == n}


def test_a_good_release_reaches_every_device_wave_by_wave_with_no_rollback(fleet_of_30: tuple[Path, list[str]]) -> None:
    home, ids = fleet_of_30
    campaign = create(home, "--release", "digits:1.1.0", "--waves", "10,50,100", "--soak", "2s", "--seed", "7",
                      "--spread-by", "site")  # fmt: skip
    done = ended(home, campaign, 240)
    assert done["state"] == "succeeded", (done["reason"], json.dumps(done["decisions"])[-3000:])
    assert [w["devices"] for w in done["waves"]] == [3, 12, 15]
    sites = {d["device_id"]: d["tags"]["site"] for d in ok_json("devices", "list", "--home", home)}
    assert {sites[d] for d in wave(done, 1)} == {"site-0", "site-1", "site-2"}, "wave 1 spread across the sites"
    assert all(d["state"] == "succeeded" and d["attempts"] == 1 for d in done["devices"]), done["devices"]
    assert on_release(home, "digits:1.1.0", ids)
    assert sorted(sent(home, "digits:1.1.0")) == sorted(ids), "each device sent the release once"
    assert all(g["verdict"] in ("pass", "n/a") for g in done["gates"]), done["gates"]
    waves_started = [d for d in done["decisions"] if d["gate"] == "failed" and d["verdict"] == "pass"]
    assert waves_started, "the failed-share gate decided before the campaign went on"


def test_a_broken_release_trips_the_failed_gate_in_its_first_wave_and_no_other_device_is_ever_sent_it(
    fleet_of_30: tuple[Path, list[str]],
) -> None:
    home, ids = fleet_of_30
    campaign = create(home, "--release", "digits:1.4.0", "--soak", "2s", "--seed", "3")
    done = ended(home, campaign, 240)
    assert done["state"] == "rolled_back", (done["reason"], json.dumps(done["decisions"])[-3000:])
    assert done["reason"].startswith("wave 1: failed 3 of 3 devices (100%"), done["reason"]
    assert touched(done) == wave(done, 1) and len(wave(done, 1)) == 3
    assert set(sent(home, "digits:1.4.0")) == wave(done, 1), "no device outside the first wave was sent it"
    assert all(d["state"] == "rolled_back" and d["reason"].startswith("smoke_") for d in done["devices"]
               if d["wave"] == 1), done["devices"]  # fmt: skip
    assert on_release(home, "digits:1.1.0", ids), "every touched device back on its last committed release"
    rollbacks = [d for d in done["decisions"] if d["action"] == "rollback"]
    assert [d["gate"] for d in rollbacks] == ["failed"] and rollbacks[0]["figures"]["count"] == 3


def test_a_slow_release_commits_on_the_devices_but_the_latency_gate_rolls_the_campaign_back(
    fleet_of_30: tuple[Path, list[str]],
) -> None:
    home, ids = fleet_of_30
    campaign = create(home, "--release", "digits:1.3.0", "--soak", "5s", "--seed", "5")
    done = ended(home, campaign, 240)
    assert done["state"] == "rolled_back", (done["reason"], json.dumps(done["decisions"])[-3000:])
    assert "p95 latency" in done["reason"] and done["reason"].startswith("wave 1: "), done["reason"]
    tripped = [d for d in done["decisions"] if d["action"] == "rollback"]
    assert [d["gate"] for d in tripped] == ["latency_p95 <= 1.5x"], tripped
    figures = tripped[0]["figures"]
    assert figures["p_value"] < 0.01 and figures["count"] >= 50, figures  # early: a quarter of the sample at least
    assert set(sent(home, "digits:1.3.0")) == wave(done, 1) == touched(done)
    events = ok_json("devices", "show", sorted(wave(done, 1))[0], "--home", home)["last_events"]
    assert any(e["type"] == "install_committed" and e["detail"]["release"] == "digits:1.3.0" for e in events), (
        "the slow release passed the device's own probation: only the fleet's telemetry could catch it"
    )
    assert on_release(home, "digits:1.1.0", ids)


def test_an_inaccurate_release_trips_the_accuracy_gate_from_the_devices_feedback(
    fleet_of_30: tuple[Path, list[str]],
) -> None:
    home, ids = fleet_of_30
    campaign = create(home, "--release", "digits:1.2.0", "--soak", "5s", "--seed", "9", "--waves", "20,100",
                      "--kpi", "accuracy >= -0.05", "--kpi-min-count", "50")  # fmt: skip
    done = ended(home, campaign, 240)
    assert done["state"] == "rolled_back", (done["reason"], json.dumps(done["decisions"])[-3000:])
    assert done["reason"].startswith("wave 1: accuracy"), done["reason"]
    gate = next(g for g in done["gates"] if g["gate"] == "accuracy >= -0.05")
    assert gate["verdict"] == "fail" and gate["value"] < 0.5 < gate["figures"]["baseline"], gate
    assert set(sent(home, "digits:1.2.0")) == wave(done, 1)
    assert on_release(home, "digits:1.1.0", ids)


def test_pause_holds_the_next_wave_resume_finishes_it_and_abort_ends_a_campaign_without_undoing_it(
    fleet_of_30: tuple[Path, list[str]],
) -> None:
    home, ids = fleet_of_30
    campaign = create(home, "--release", "digits:1.0.0", "--soak", "2s", "--seed", "11", "--waves", "10,100")
    wait_for(lambda: status(home, campaign)["waves"][0]["state"] == "soaking", 120, "wave 1 done and soaking")
    paused = ok_json("rollout", "pause", campaign, "--home", home, "--reason", "checking dashboards")
    assert paused["state"] == "paused"
    time.sleep(4)  # twice the soak: a running campaign would have sent wave 2 by now
    held = status(home, campaign)
    assert held["state"] == "paused" and held["reason"] == "checking dashboards"
    assert touched(held) == wave(held, 1), "no device of wave 2 was sent anything while paused"
    assert ok_json("rollout", "resume", campaign, "--home", home)["state"] == "running"
    assert ended(home, campaign, 180)["state"] == "succeeded"
    assert on_release(home, "digits:1.0.0", ids)

    aborted = create(home, "--release", "digits:1.1.0", "--soak", "30s", "--seed", "13", "--waves", "10,100")
    wait_for(lambda: status(home, aborted)["waves"][0]["state"] == "soaking", 120, "wave 1 done and soaking")
    assert ok_json("rollout", "abort", aborted, "--home", home)["state"] == "aborted"
    done = status(home, aborted)
    assert set(sent(home, "digits:1.1.0")) >= wave(done, 1) and touched(done) == wave(done, 1)
    assert all(d["state"] == "succeeded" for d in done["devices"] if d["wave"] == 1), "abort undoes nothing"
    refused = fleet("rollout", "resume", aborted, "--home", home)
    assert refused.exit_code == 1 and "an aborted campaign cannot resume" in refused.output, refused.output

    actions = [e["action"] for e in json.loads(fleet("audit", "--json", "--home", home).stdout)["entries"]
               if e["subject"] in (campaign, aborted)]  # fmt: skip
    assert actions.count("rollout_pause") == actions.count("rollout_resume") == 1, actions
    assert actions.count("rollout_create") == actions.count("rollout_start") == 2 and "rollout_abort" in actions
    assert actions.count("rollout_wave") == 3 and actions.count("rollout_complete") == 1, actions
    verified = fleet("audit", "--verify", "--home", home)
    assert verified.exit_code == 0, verified.output


def test_the_audit_log_of_all_those_campaigns_verifies_and_fails_once_a_row_is_edited(
    fleet_of_30: tuple[Path, list[str]],
) -> None:
    home, _ = fleet_of_30
    assert fleet("audit", "--verify", "--home", home).exit_code == 0
    db = sqlite3.connect(home / "fleet.db")
    with db:
        db.execute("DROP TRIGGER audit_no_update")
        db.execute("UPDATE audit SET detail = replace(detail, 'digits:1.4.0', 'digits:1.1.0') "
                   "WHERE action = 'rollout_create' AND detail LIKE '%digits:1.4.0%'")  # fmt: skip
    db.close()
    tampered = fleet("audit", "--verify", "--home", home)
    assert tampered.exit_code == 1 and "audit chain broken at row" in tampered.output, tampered.output


def test_silent_devices_time_out_count_toward_their_gate_and_return_once_they_speak_again(
    tmp_path: Path, example_model: Callable[[str], Path]
) -> None:
    home = tmp_path / "home"
    ok_json("init", "--home", home)
    with FleetServer(ServerSettings(home=home, ingest_workers=0, log_level="WARNING", rollout_tick_s=0.5)):
        publish_all(home, example_model)
        processes: list[subprocess.Popen[str]] = []
        with enrolled_sim(home, tmp_path, example_model, devices=6, id_prefix="mute", processes=processes) as ids:
            assign_good(home, ids)
            os.kill(processes[0].pid, signal.SIGSTOP)  # every device hangs: no message, no will
            campaign = create(home, "--release", "digits:1.1.0", "--soak", "1s", "--seed", "1", "--waves", "50,100",
                              "--device-timeout", "3s", "--retries", "1", "--max-timed-out", "20")  # fmt: skip
            done = ended(home, campaign, 120)
            assert done["state"] == "rolled_back", (done["reason"], json.dumps(done["decisions"])[-3000:])
            assert done["reason"] == "wave 1: timed out 3 of 3 devices (100%; limit 20%)", done["reason"]
            first = wave(done, 1)
            assert all(d["state"] == "timed_out" and d["attempts"] == 2 for d in done["devices"]
                       if d["device_id"] in first), done["devices"]  # fmt: skip
            assert touched(done) == first and sorted(sent(home, "digits:1.1.0")) == sorted([*first, *first]), (
                "each silent device was sent the release twice (one retry), no other device at all"
            )
            os.kill(processes[0].pid, signal.SIGCONT)
            wait_for(lambda: all(d["state"] == "rolled_back" for d in status(home, campaign)["devices"]
                                 if d["device_id"] in first), 120, "the silent devices back, rolled back")  # fmt: skip
            assert on_release(home, "digits:1.0.0", ids)


def test_a_fleet_service_killed_mid_wave_continues_the_campaign_where_it_was_after_a_restart(
    tmp_path: Path, example_model: Callable[[str], Path], private_broker: MosquittoBroker
) -> None:
    home = tmp_path / "home"
    ok_json("init", "--home", home)
    serve = [str(Path(sys.executable).parent / "fleet"), "serve", "--home", str(home), "--broker", private_broker.url,
             "--ingest-workers", "0"]  # fmt: skip
    log = (tmp_path / "serve.log").open("a")
    proc = subprocess.Popen(serve, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("broker: ")
        publish_all(home, example_model)
        with enrolled_sim(home, tmp_path, example_model, devices=12, id_prefix="kill") as ids:
            assign_good(home, ids)
            campaign = create(home, "--release", "digits:1.1.0", "--soak", "1s", "--seed", "4",
                              "--waves", "25,50,100")  # fmt: skip
            def mid_second_wave() -> bool:
                """Wave 2 under way, its downloads done. A kill mid-download ends the same way, 30 s later: the
                repository server dies with the service, the devices' downloads fail as passing failures (retrying,
                not failed) and their retry comes after the agent's 30 s back-off."""
                now = status(home, campaign)
                second = [d["state"] for d in now["devices"] if d["wave"] == 2]
                return now["wave"] == 2 and "succeeded" in second and not {"notified", "downloading"} & set(second)

            wait_for(mid_second_wave, 120, "the second wave under way")
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed = status(home, campaign)
            assert killed["state"] == "running" and killed["wave"] == 2
            proc = subprocess.Popen(serve, stdout=subprocess.PIPE, stderr=log, text=True)
            done = ended(home, campaign, 180)
            assert done["state"] == "succeeded", (done["reason"], json.dumps(done["decisions"])[-3000:])
            assert all(d["state"] == "succeeded" for d in done["devices"])
            assert done["counts"] == {"succeeded": 12}, "no device counted twice"
            sends = sent(home, "digits:1.1.0")
            assert set(sends) == set(ids) and len(sends) <= len(ids) + 1, sends
            assert on_release(home, "digits:1.1.0", ids)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()
