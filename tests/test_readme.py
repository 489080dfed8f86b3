"""Every command the README shows runs as shown (installation itself is exercised by scripts/test)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.server import connect as server_connect
from fleet.broker import free_port, wait_for_port
from fleet.examples.modelgen import digits_split

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def readme_commands() -> list[str]:
    """Command lines of the README's sh blocks, comments and continuations stripped."""
    text = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line:
                lines.extend(part.strip() for part in line.split("&&"))
    return lines


#: Each README command and the test below that runs it. A new README command without a test fails here.
COVERED = {
    "python3 -m venv .venv": "scripts/test makes its virtualenv the same way",
    ". .venv/bin/activate": "scripts/test runs the virtualenv's own binaries",
    'pip install ".[all]"': "scripts/test installs .[all,dev]",
    "fleet model example --out models": "test_the_main_job_builds_models_and_runs_them",
    "fleet model run models/int8.onnx": "test_the_main_job_builds_models_and_runs_them",
    "bash scripts/test": "CI runs it",
    "fleet init": "test_the_fleet_flow_of_the_readme",
    "fleet serve": "test_the_fleet_flow_of_the_readme",
    "firmware-sim run --devices 20 --broker mqtt://127.0.0.1:PORT --duration 30 --window 5": "fleet flow",
    "fleet devices list --json": "test_the_fleet_flow_of_the_readme",
    "fleet telemetry sim-0000 --since 10m --json": "test_the_fleet_flow_of_the_readme",
    "fleet model example --out better --variant better": "test_the_fleet_flow_of_the_readme",
    "fleet release publish better/int8.onnx --name digits --version 1.1.0": "test_the_fleet_flow_of_the_readme",
    "fleet enroll pi-01 --out pi-01 --model-dir models --state-dir state": "test_the_fleet_flow_of_the_readme",
    "edge-agent run --config pi-01/agent.toml": "test_the_fleet_flow_of_the_readme",
    "fleet assign pi-01 --release digits:1.1.0": "test_the_fleet_flow_of_the_readme",
    "fleet devices show pi-01 --json": "test_the_fleet_flow_of_the_readme",
    "firmware-sim run --enroll --devices 5 --duration 300 --window 2": "test_sim_fleet (its first test)",
    "fleet assign sim-0000 sim-0001 sim-0002 sim-0003 sim-0004 --release digits:1.1.0": "test_sim_fleet",
    "fleet devices list": "test_sim_fleet (--json there)",
    "firmware-sim run --broker mqtt://127.0.0.1:PORT --scenario site-drift --duration 60 --report truth.json": (
        "test_sim_scenarios (shipped by name)"
    ),
    "firmware-sim run --enroll --scenario faults-tour": "test_sim_scenarios: test_the_faults_tour_plans_every_fault",
    "fleet rollout create --release digits:1.1.0 --waves 10,50,100 --soak 2m --spread-by site": (
        "test_rollout_flow: test_a_good_release_reaches_every_device_wave_by_wave_with_no_rollback"
    ),
    "fleet rollout status rollout-1 --watch": "test_rollout_cli: --watch until the campaign ends",
    "fleet rollout pause rollout-1": "test_rollout_flow: test_pause_holds_the_next_wave_resume_finishes_it...",
    "fleet rollout list --json": "test_rollout_cli",
}


def test_every_readme_command_is_covered_by_a_test() -> None:
    assert set(readme_commands()) == set(COVERED)


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """Run a command as a user would; fail the test with its stderr if it does not exit 0."""
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}: {done.stderr[-2000:]}"
    return done.stdout


def test_the_main_job_builds_models_and_runs_them(tmp_path: Path) -> None:
    run([str(BIN / "fleet"), "model", "example", "--out", "models"], cwd=tmp_path)
    assert {p.name for p in (tmp_path / "models").iterdir()} >= {"float.onnx", "int8.onnx", "int8.tflite", "card.json"}
    out = json.loads(run([str(BIN / "fleet"), "model", "run", "models/int8.onnx", "--json"], cwd=tmp_path))
    assert out["accuracy"] > 0.9


def test_the_fleet_flow_of_the_readme(tmp_path: Path) -> None:
    env = {**os.environ, "EDGEFLEET_HOME": str(tmp_path / "home")}
    run([str(BIN / "fleet"), "init"], cwd=tmp_path, env=env)
    serve = subprocess.Popen(
        [str(BIN / "fleet"), "serve"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert serve.stdout is not None
        line = serve.stdout.readline()
        assert line.startswith("broker: mqtt://127.0.0.1:"), line
        url = line.split()[1]
        sim = json.loads(
            run(
                [str(BIN / "firmware-sim"), "run", "--devices", "3", "--broker", url, "--duration", "4",
                 "--window", "1", "--model-dir", str(tmp_path / "cache"), "--json"],
                cwd=tmp_path,
                env=env,
            )
        )  # fmt: skip
        produced = {d["device_id"]: d["windows_produced"] for d in sim["devices"]}
        for _ in range(100):
            devices = json.loads(run([str(BIN / "fleet"), "devices", "list", "--json"], cwd=tmp_path, env=env))
            if {d["device_id"]: d["windows"] for d in devices} == produced:
                break
            time.sleep(0.2)
        assert {d["device_id"]: d["windows"] for d in devices} == produced
        telemetry = json.loads(
            run([str(BIN / "fleet"), "telemetry", "sim-0000", "--since", "10m", "--json"], cwd=tmp_path, env=env)
        )
        assert len(telemetry["windows"]) == produced["sim-0000"]

        # A signed release, installed by a real agent enrolled from the fleet.
        fleet = str(BIN / "fleet")
        run([fleet, "model", "example", "--out", "models"], cwd=tmp_path, env=env)
        run([fleet, "model", "example", "--out", "better", "--variant", "better"], cwd=tmp_path, env=env)
        run([fleet, "release", "publish", "better/int8.onnx", "--name", "digits", "--version", "1.1.0"], tmp_path, env)
        run(
            [fleet, "enroll", "pi-01", "--out", "pi-01", "--model-dir", "models", "--state-dir", "state"], tmp_path, env
        )
        api = f"127.0.0.1:{free_port()}"  # the default port may be taken on a shared machine
        with (tmp_path / "pi-01" / "agent.toml").open("a") as toml:
            toml.write(f'\n[api]\nlisten = "{api}"\n')
        agent = subprocess.Popen(
            [str(BIN / "edge-agent"), "run", "--config", "pi-01/agent.toml"], cwd=tmp_path, stderr=subprocess.DEVNULL
        )
        try:
            wait_for_port("127.0.0.1", int(api.rsplit(":", 1)[1]), timeout=30)
            run([fleet, "assign", "pi-01", "--release", "digits:1.1.0"], tmp_path, env)
            x = digits_split(0)[1]
            for i in range(200):  # an application's traffic: probation commits after enough healthy answers
                conn = server_connect(api)
                body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": x[i].tolist()}]}
                conn.request("POST", "/v2/models/digits/infer", json.dumps(body), {"Content-Type": "application/json"})
                assert conn.getresponse().status == 200
                conn.close()
                shown = json.loads(run([fleet, "devices", "show", "pi-01", "--json"], tmp_path, env))
                if (shown.get("last_install") or {}).get("type") == "install_committed":
                    break
                time.sleep(0.1)
            assert shown["last_install"]["type"] == "install_committed"
            assert shown["last_install"]["release"] == "digits:1.1.0"
            assert shown["models"]["digits"]["release"] == "digits:1.1.0"
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(20)
        assert agent.returncode == 0
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(20)
    assert serve.returncode == 0


@pytest.mark.parametrize("extra", ["agent", "tflite"])
def test_the_agent_extra_does_not_pull_the_fleet_stack(extra: str) -> None:
    from importlib.metadata import requires

    fleet_only = {"sqlite-utils", "click", "rich", "scipy", "amqtt", "scikit-learn", "onnx", "tflite", "flatbuffers"}
    wanted = [r for r in requires("edgefleet") or [] if f'extra == "{extra}"' in r]
    names = {re.split(r"[<>=;\[ ]", r, maxsplit=1)[0].lower() for r in wanted}
    assert names and not names & fleet_only, names
