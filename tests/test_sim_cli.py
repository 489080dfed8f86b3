"""`firmware-sim run` as a new user meets it: refusals in one line, bounded runs, no leftovers, visible progress.

Runs go through real subprocesses (the installed launcher's code path) against the session's real mosquitto, with
``TMPDIR`` pointed into the test's folder so that nothing is left in, or read from, the machine's temp folder.
"""

from __future__ import annotations

import gc
import json
import os
import pty
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from firmware_sim import fdlimit
from firmware_sim.cli import main as firmware_sim
from firmware_sim.simulator import SimSettings, Simulation
from fleet.broker import MosquittoBroker
from fleet.ingest.mqtt import Ingest
from fleet.store import open_store

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = "from firmware_sim.launcher import main; main()"


def sim_command(*args: str) -> list[str]:
    """`firmware-sim ARGS` through the console script's entry point."""
    return [sys.executable, "-c", LAUNCH, *args]


@pytest.fixture(scope="module", autouse=True)
def fleet(broker: MosquittoBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ingest]:
    """The fleet's ingest on the session's broker: a device forgets a window only once the fleet says it stored it,
    so a run's windows count as acknowledged, and its outboxes drain, only with a fleet there."""
    store = open_store(tmp_path_factory.mktemp("fleet") / "fleet.db")
    ingest = Ingest(store, broker.url, client_id=f"sim-cli-fleet-{uuid.uuid4().hex[:8]}")
    ingest.start()
    assert ingest.wait_ready(10)
    yield ingest
    ingest.stop()
    store.close()


@pytest.fixture
def model_cache(tmp_path: Path, example_model: Callable[[str], Path]) -> Path:
    """A --model-dir in which the good model of seed 0 is already built (as `firmware-sim` caches it)."""
    cache = tmp_path / "models"
    cache.mkdir()
    (cache / "good-0").symlink_to(example_model("good"))
    return cache


@pytest.fixture
def sim_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a `firmware-sim` subprocess: its own temp folder."""
    (tmp_path / "tmp").mkdir()
    return {**os.environ, "TMPDIR": str(tmp_path / "tmp")}


def outboxes(folder: Path) -> set[Path]:
    """The state folders of simulated devices under ``folder``."""
    return {p.parent for p in folder.rglob("outbox.sqlite")}


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A loopback port that is bound but not listening: every connection to it is refused, for as long as the
    test runs (a port that was merely free could be taken by someone else meanwhile)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# -- 1. usage errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--broker", "http://x"], "mqtt://HOST:PORT"),
        (["--broker", "mqtt://h:99999"], "'99999'"),
        (["--broker", "mqtt://h:0"], "'0'"),
        (["--broker", "mqtt://h:port"], "'port'"),
        (["--broker", "mqtt://127.0.0.1:1883", "--variant", "best"], "good"),
        (["--broker", "mqtt://127.0.0.1:1883", "--log-level", "loud"], "warning"),
        (["--broker", "mqtt://127.0.0.1:1883", "--id-prefix", "a/b"], "a/b-0000"),
    ],
)
def test_run_refuses_what_it_cannot_use_in_one_line_before_building_anything(
    tmp_path: Path, args: list[str], named: str
) -> None:
    result = CliRunner().invoke(firmware_sim, ["run", *args, "--model-dir", str(tmp_path / "models")])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), "no traceback"
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and named in errors[0], result.output
    if "--broker" in errors[0]:
        assert "mqtt://HOST:PORT" in errors[0], "the error names the accepted form"
    assert not (tmp_path / "models").exists(), "refused before the model was built"


def test_run_says_in_one_line_when_the_cached_model_or_the_state_folder_is_unusable(
    tmp_path: Path, model_cache: Path, sim_env: dict[str, str], refusing_port: int
) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(model_cache / "good-0", damaged / "good-0")
    (damaged / "good-0" / "int8.onnx").write_bytes(b"not a model")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    url = f"mqtt://127.0.0.1:{refusing_port}"
    for args, said in [
        (["--model-dir", str(damaged)], f"delete {damaged / 'good-0'} and the next run builds it again"),
        (["--model-dir", str(model_cache), "--state-dir", str(a_file / "devices")], "Not a directory"),
    ]:
        done = subprocess.run(sim_command("run", "--broker", url, "--duration", "0", *args), env=sim_env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
        errors = [line for line in done.stderr.splitlines() if not line.startswith("{")]
        assert len(errors) == 1 and errors[0].startswith("Error: ") and said in errors[0], done.stderr


def test_devices_send_the_true_label_of_the_configured_share_of_predictions_and_the_fleet_stores_every_one(
    tmp_path: Path, broker: MosquittoBroker, fleet: Ingest, example_model: Callable[[str], Path]
) -> None:
    prefix = f"fb{uuid.uuid4().hex[:6]}"
    settings = SimSettings(devices=3, broker=broker.url, state_root=tmp_path / "devices", id_prefix=prefix,
                           model_dir=example_model("good"), duration_s=3, window_s=1, rate_hz=40,
                           feedback_share=0.25)  # fmt: skip
    report = Simulation(settings).run()
    totals = report["totals"]
    assert totals["windows_produced"] == totals["windows_acked"] > 0
    assert 0.15 * totals["inferences"] < totals["labelled"] < 0.35 * totals["inferences"]
    for device in report["devices"]:
        windows = fleet.store.telemetry(device["device_id"]).windows
        stored = sum(sum(map(sum, w["feedback"])) for w in windows if w.get("feedback"))
        assert stored == device["labelled"] > 0, device  # every label reached the fleet, in the confusion counts


# -- 2. open files ------------------------------------------------------------------------------------------------


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_running_device_holds_the_open_files_the_budget_counts(
    tmp_path: Path, broker: MosquittoBroker, example_model: Callable[[str], Path]
) -> None:
    settings = SimSettings(devices=10, broker=broker.url, state_root=tmp_path / "devices",
                           model_dir=example_model("good"), duration_s=3, window_s=1, rate_hz=5)  # fmt: skip
    gc.collect()  # files earlier tests left to the garbage collector must not close mid-run and hide the devices' own
    before = open_files()
    peak = 0

    def measure() -> bool:
        nonlocal peak
        peak = max(peak, open_files())
        return False

    report = Simulation(settings).run(until=measure)
    assert all(d["connects"] == 1 for d in report["devices"]) and report["totals"]["windows_acked"] > 0
    grown = peak - before
    assert fdlimit.FDS_PER_DEVICE * 10 <= grown <= fdlimit.files_needed(10), (
        f"10 running devices opened {grown} files: update FDS_PER_DEVICE and the figures in fdlimit's docstring"
    )


def limited(soft: int, hard: int) -> Callable[[], None]:
    """A preexec_fn: the child starts with this limit on open files."""
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_run_refuses_more_devices_than_the_hard_limit_on_open_files_allows(
    tmp_path: Path, sim_env: dict[str, str], refusing_port: int
) -> None:
    started = time.monotonic()
    done = subprocess.run(
        sim_command("run", "--devices", "5000", "--broker", f"mqtt://127.0.0.1:{refusing_port}",
                    "--model-dir", str(tmp_path / "models")),
        env=sim_env, capture_output=True, text=True, timeout=120, preexec_fn=limited(256, 256),
    )  # fmt: skip
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    needed = fdlimit.files_needed(5000)
    assert len(lines) == 1 and f"5000 devices need {needed} open files" in lines[0], done.stderr
    assert f"ulimit -n {needed}" in lines[0] and "at most 56 devices" in lines[0]
    assert not (tmp_path / "models").exists() and not outboxes(tmp_path), "refused before starting"
    assert time.monotonic() - started < 60


def test_run_raises_its_soft_limit_on_open_files_to_what_its_devices_need(
    broker: MosquittoBroker, model_cache: Path, sim_env: dict[str, str]
) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < fdlimit.files_needed(100):
        pytest.skip(f"the hard limit on open files here ({hard}) is below what 100 devices need")
    done = subprocess.run(
        sim_command("run", "--devices", "100", "--broker", broker.url, "--duration", "1", "--window", "1",
                    "--rate", "1", "--model-dir", str(model_cache), "--json"),
        env=sim_env, capture_output=True, text=True, timeout=300, preexec_fn=limited(256, hard),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    totals = json.loads(done.stdout)["totals"]
    assert totals["windows_produced"] == totals["windows_acked"] >= 100


# -- 3. an unreachable broker -------------------------------------------------------------------------------------


def test_a_run_against_an_unreachable_broker_ends_near_its_duration_and_says_so(
    model_cache: Path, sim_env: dict[str, str], refusing_port: int
) -> None:
    url = f"mqtt://127.0.0.1:{refusing_port}"
    done = subprocess.run(
        sim_command("run", "--devices", "3", "--broker", url, "--duration", "3", "--window", "1",
                    "--model-dir", str(model_cache), "--json"),
        env=sim_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert 3 <= report["elapsed_s"] < 8, "the drain gives up soon when nothing can be delivered (it took 63 s)"
    assert report["totals"]["windows_acked"] == 0
    said = [line for line in done.stderr.splitlines() if not line.startswith("{")]
    assert said == [f"firmware-sim: the broker at {url} was unreachable: no device could connect in "
                    f"{report['elapsed_s']} s (is it running, and is the URL right?)"]  # fmt: skip


# -- 4. no leftovers ----------------------------------------------------------------------------------------------


def test_a_killed_runs_folder_is_removed_by_the_next_run_and_a_live_runs_is_not(
    tmp_path: Path, broker: MosquittoBroker, model_cache: Path, sim_env: dict[str, str]
) -> None:
    temp = Path(sim_env["TMPDIR"])
    runs: list[subprocess.Popen[bytes]] = []

    def start(id_prefix: str) -> tuple[subprocess.Popen[bytes], Path]:
        known = outboxes(temp)
        stderr = tmp_path / f"{id_prefix}.stderr"
        with stderr.open("wb") as err:
            proc = subprocess.Popen(
                sim_command("run", "--devices", "2", "--broker", broker.url, "--duration", "600", "--window", "1",
                            "--id-prefix", id_prefix, "--model-dir", str(model_cache)),
                env=sim_env, stdout=subprocess.PIPE, stderr=err,
            )  # fmt: skip
        runs.append(proc)

        def set_up() -> bool:
            assert proc.poll() is None, f"the run exited {proc.returncode}: {stderr.read_text()[-2000:]}"
            return len(outboxes(temp) - known) == 2

        wait_for(set_up, 120, "the run's device folders")
        return proc, (outboxes(temp) - known).pop().parent

    try:
        killed, killed_folder = start("killed")
        live, live_folder = start("live")
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
        assert killed_folder.exists(), "SIGKILL leaves the folder: only a later run can clean it"

        later = subprocess.run(
            sim_command("run", "--devices", "1", "--broker", broker.url, "--duration", "0",
                        "--id-prefix", "later", "--model-dir", str(model_cache)),
            env=sim_env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert later.returncode == 0, later.stderr[-2000:]
        assert not killed_folder.exists(), "the next run removed the killed run's folder"
        assert live_folder.exists() and live.poll() is None, "a live run's folder is never touched"

        live.send_signal(signal.SIGTERM)  # ends the run early, with its report and its own clean-up
        out, _ = live.communicate(timeout=120)
        assert live.returncode == 0 and b"2 devices" in out
        assert outboxes(temp) == set(), "nothing is left behind"
    finally:
        for proc in runs:
            proc.kill()
            proc.communicate()


# -- 5. progress --------------------------------------------------------------------------------------------------


def test_set_up_shows_progress_on_a_terminal_and_keeps_stdout_for_json(
    broker: MosquittoBroker, model_cache: Path, sim_env: dict[str, str]
) -> None:
    args = ("run", "--devices", "20", "--broker", broker.url, "--duration", "0", "--model-dir", str(model_cache),
            "--json")  # fmt: skip
    master, terminal = pty.openpty()
    seen = bytearray()

    def read_terminal() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed its end
                return
            if not chunk:
                return
            seen.extend(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        proc = subprocess.Popen(sim_command(*args), env=sim_env, stdout=subprocess.PIPE, stderr=terminal)
        os.close(terminal)
        out, _ = proc.communicate(timeout=120)
    finally:
        reader.join(10)
        os.close(master)
    assert proc.returncode == 0, seen.decode(errors="replace")[-2000:]
    assert len(json.loads(out)["devices"]) == 20, "stdout holds the JSON report alone"
    shown = seen.decode(errors="replace")
    assert "setting up 20 devices" in shown and "100%" in shown, shown

    piped = subprocess.run(sim_command(*args), env=sim_env, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and "setting up" not in piped.stderr, "no progress bar in a log file"


# -- 6. the installed command -------------------------------------------------------------------------------------


def test_the_installed_command_names_the_extra_it_needs_when_it_is_missing(tmp_path: Path) -> None:
    """As after `pip install ".[agent]"`, or a bare install: the package, without click and the fleet's stack."""
    path = tmp_path / "bare"
    path.mkdir()
    (path / "firmware_sim").symlink_to(ROOT / "firmware-sim")
    # -S: no site-packages at all; only the stdlib and the package itself can be imported.
    code = f"import sys; sys.path.insert(0, {str(path)!r}); {LAUNCH}"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-S", "-c", code, "run", "--help"], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr == "firmware-sim needs the sim extra: pip install 'edgefleet[sim]'\n"


def test_the_console_script_is_the_launcher_and_runs_the_command() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["firmware-sim"] == "firmware_sim.launcher:main"
    done = subprocess.run(sim_command("--version"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("firmware-sim, version")
