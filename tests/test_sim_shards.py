"""`firmware-sim run --shards K`: the fleet over K processes, one report; Ctrl-C ends every shard's run with its report;
a shard that dies or cannot set its devices up fails the run in one line, soon.

Runs are real `firmware-sim` processes against the session's mosquitto, with the fleet's ingest of
``test_sim_cli`` acknowledging windows.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import test_sim_cli
from test_sim_cli import sim_command, wait_for

from agent.config import UpdateConfig
from firmware_sim.drift import Drift
from firmware_sim.scenario import Scenario, device_tags, shipped
from firmware_sim.shards import merge_reports
from firmware_sim.simulator import SimSettings, device_ids
from fleet.broker import MosquittoBroker

# The fleet's ingest on the session broker (so windows get acknowledged), the model cache and the runs' temp folder.
fleet, model_cache, sim_env = test_sim_cli.fleet, test_sim_cli.model_cache, test_sim_cli.sim_env

#: How long a run may take to end once asked to, or once one of its shards has died.
ENDS_WITHIN_S = 30.0


def test_merge_reports_joins_devices_by_id_sums_totals_and_keeps_the_longest_run() -> None:
    first = {
        "devices": [{"device_id": "sim-0002", "installs": [1]}, {"device_id": "sim-0000", "installs": []}],
        "totals": {"windows_produced": 3, "inferences": 10},
        "elapsed_s": 4.5,
        "seed": 7,
        "scenario": "a",
    }
    second = {
        "devices": [{"device_id": "sim-0001", "installs": [2, 3]}],
        "totals": {"windows_produced": 2, "inferences": 6, "errors": 1},
        "elapsed_s": 5.25,
        "seed": 7,
    }
    assert merge_reports([first, second]) == {
        "devices": [{"device_id": "sim-0000", "installs": []}, {"device_id": "sim-0001", "installs": [2, 3]},
                    {"device_id": "sim-0002", "installs": [1]}],
        "totals": {"windows_produced": 5, "inferences": 16, "errors": 1},
        "elapsed_s": 5.25,
        "seed": 7,
        "scenario": "a",
    }  # fmt: skip
    assert merge_reports([first]) == {**first, "devices": sorted(first["devices"], key=lambda d: d["device_id"])}


def test_settings_with_enrollment_drift_and_a_scenarios_faults_reach_a_shard_intact(tmp_path: Path) -> None:
    """Children are spawned: their settings travel pickled."""
    update = UpdateConfig("http://127.0.0.1:1/", tmp_path / "root.json", tmp_path / "director.json")
    ids = device_ids("sim", 12)
    plan = Scenario.load(shipped("faults-tour")).plan(device_tags(ids, {"hw": "sim"}, 2), seed=1, duration_s=180)
    assert any(p.faults for p in plan.devices.values())
    settings = SimSettings(devices=12, broker="mqtt://127.0.0.1:1883", state_root=tmp_path, model_dir=tmp_path,
                           duration_s=1, drifts=(Drift("noise", 0.5, 3.0),), updates={"sim-0000": update},
                           plan=plan.devices, shard=(1, 2))  # fmt: skip
    assert pickle.loads(pickle.dumps(settings)) == settings


def start(args: list[str], env: dict[str, str], err: Path) -> subprocess.Popen[str]:
    """`firmware-sim ARGS` in a session of its own (a terminal's process group), logging at info into ``err``."""
    with err.open("w") as stderr:
        return subprocess.Popen(sim_command("run", *args, "--log-level", "info"), env=env, stdout=subprocess.PIPE,
                                stderr=stderr, text=True, start_new_session=True)  # fmt: skip


def logged(err: Path, name: str) -> list[dict[str, Any]]:
    """The events called ``name`` in a run's stderr (its own and its shards')."""
    lines = [line for line in err.read_text().split("\n")[:-1] if line.startswith("{")]  # whole lines only
    return [e for e in map(json.loads, lines) if e["event"] == name]


def said(err: Path) -> list[str]:
    """What a run said on stderr besides its JSON logs."""
    return [line for line in err.read_text().splitlines() if not line.startswith("{")]


def wait_until_logged(proc: subprocess.Popen[str], err: Path, name: str, times: int) -> None:
    def seen() -> bool:
        assert proc.poll() is None, f"the run exited {proc.returncode}: {said(err)[-5:]}"
        return len(logged(err, name)) >= times

    wait_for(seen, 60, f"{times} {name} events")


def test_two_shards_run_the_same_devices_as_one_process_and_a_terminals_ctrl_c_ends_both_with_the_report(
    tmp_path: Path, broker: MosquittoBroker, model_cache: Path, sim_env: dict[str, str]
) -> None:
    runs: dict[int, tuple[str, subprocess.Popen[str], Path]] = {}
    for shards in (1, 2):
        prefix = f"shard{shards}x{uuid.uuid4().hex[:6]}"
        args = ["--devices", "6", "--shards", str(shards), "--broker", broker.url, "--duration", "120", "--window",
                "1", "--rate", "5", "--id-prefix", prefix, "--model-dir", str(model_cache), "--json"]  # fmt: skip
        runs[shards] = (prefix, start(args, sim_env, tmp_path / f"{shards}.err"), tmp_path / f"{shards}.err")
    try:
        for _, proc, err in runs.values():
            wait_until_logged(proc, err, "mqtt_connected", 6)
        time.sleep(1.5)  # a window or so each
        one, two = runs[1][1], runs[2][1]
        one.send_signal(signal.SIGTERM)
        os.killpg(two.pid, signal.SIGINT)  # Ctrl-C on a terminal: to the whole process group, the shards included
        reports = {}
        for shards, (_, proc, err) in runs.items():
            out, _ = proc.communicate(timeout=ENDS_WITHIN_S)
            assert proc.returncode == 0, said(err)[-5:]
            reports[shards] = json.loads(out)
            assert reports[shards]["elapsed_s"] < 60, "the run ended early"
    finally:
        for _, proc, _ in runs.values():
            proc.kill()
            proc.communicate()
    started = [e["devices"] for e in logged(runs[2][2], "sim_started")]
    assert started == [3, 3], "two processes, three devices each"
    for shards, report in reports.items():
        ids = [d["device_id"].removeprefix(runs[shards][0]) for d in report["devices"]]
        assert ids == [f"-{i:04d}" for i in range(6)], "every device of the fleet, once, in order"
    for report in reports.values():
        assert all(d["connects"] == 1 and d["windows_produced"] == d["windows_acked"] > 0 for d in report["devices"])
        assert report["totals"]["windows_acked"] == sum(d["windows_acked"] for d in report["devices"])


def shard_processes(parent: int) -> list[psutil.Process]:
    """The run's shards (not multiprocessing's resource tracker, which is a child of the run too)."""
    try:
        children = psutil.Process(parent).children()
    except psutil.NoSuchProcess:
        return []
    return [c for c in children if "spawn_main" in " ".join(c.cmdline())]


def test_a_killed_shard_fails_the_run_in_one_line_soon_and_the_other_shard_is_stopped(
    tmp_path: Path, broker: MosquittoBroker, model_cache: Path, sim_env: dict[str, str]
) -> None:
    err = tmp_path / "run.err"
    args = ["--devices", "4", "--shards", "2", "--broker", broker.url, "--duration", "300", "--window", "1",
            "--id-prefix", f"killed{uuid.uuid4().hex[:6]}", "--model-dir", str(model_cache), "--json"]  # fmt: skip
    proc = start(args, sim_env, err)
    try:
        wait_until_logged(proc, err, "sim_started", 2)
        shards = shard_processes(proc.pid)
        assert len(shards) == 2
        killed_at = time.monotonic()
        shards[0].send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=ENDS_WITHIN_S)
        ended_in = time.monotonic() - killed_at
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == 1 and out == ""
    lines = said(err)
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: shard "), lines
    assert "of 2 ended without its report (exit code -9: killed by SIGKILL)" in lines[0], lines
    assert ended_in < ENDS_WITHIN_S
    assert not shards[1].is_running() or shards[1].status() == psutil.STATUS_ZOMBIE, "the other shard was stopped"


def test_a_shard_that_cannot_set_up_its_devices_says_why_in_one_line(
    tmp_path: Path, model_cache: Path, sim_env: dict[str, str], broker: MosquittoBroker
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    done = subprocess.run(
        sim_command("run", "--devices", "4", "--shards", "2", "--broker", broker.url, "--duration", "0",
                    "--model-dir", str(model_cache), "--state-dir", str(a_file / "devices")),
        env=sim_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if not line.startswith("{")]
    assert len(lines) == 1 and lines[0].startswith("Error: shard "), lines
    assert ": cannot set up the devices' state: " in lines[0] and "Not a directory" in lines[0], lines
