"""The `fleet` CLI: init, serve as a real process with its embedded broker, and the read commands on real data."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner, Result
from paho.mqtt.enums import CallbackAPIVersion

from agent import protocol
from agent.broker_address import BrokerAddress
from agent.protocol import Kind
from fleet.cli import main
from fleet.store import open_store
from fleet.store.rows import Reject

BOOT = "c" * 32
FLEET = Path(sys.executable).parent / "fleet"


def window(device_id: str, seq: int, start: float, latency_bucket: int, classes: list[int]) -> dict[str, Any]:
    count = sum(classes)
    latency = [0] * (len(protocol.LATENCY_EDGES_MS) + 1)
    latency[latency_bucket] = count
    confidence = [0] * protocol.CONFIDENCE_BINS
    confidence[-1] = count
    return {
        "v": protocol.SCHEMA_VERSION,
        "device_id": device_id,
        "boot_id": BOOT,
        "seq": seq,
        "model": "digits",
        "release": "digits:3",
        "window_start": start,
        "window_end": start + 60,
        "count": count,
        "errors": 1,
        "dropped": 2,
        "latency": latency,
        "confidence": confidence,
        "classes": classes,
        "features": [[0, count, 0, 0]],
        "health": {"temperature_c": 48.5},
    }


def birth(device_id: str) -> dict[str, Any]:
    return {
        "v": protocol.SCHEMA_VERSION,
        "device_id": device_id,
        "state": "online",
        "boot_id": BOOT,
        "agent_version": "0.3.1",
        "hardware": {"machine": "armv7l"},
        "runtimes": ["onnxruntime", "litert"],
        "models": {"digits": {"release": "digits:3"}},
    }


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def fleet(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A fleet home with two devices (pi-1 online with three windows and an event, pi-2 gone offline), two rejects."""
    home = tmp_path / "home"
    assert fleet("init", "--home", str(home)).exit_code == 0
    now = time.time()
    store = open_store(home / "fleet.db")
    store.write_batch(
        status=[birth("pi-1"), birth("pi-2"), protocol.offline_status("pi-2", BOOT, "connection_lost")],
        windows=[
            window("pi-1", 0, now - 3 * 3600, latency_bucket=4, classes=[10, 0, 0]),
            window("pi-1", 1, now - 600, latency_bucket=4, classes=[0, 9, 1]),
            window("pi-1", 2, now - 300, latency_bucket=12, classes=[0, 0, 10]),
        ],
        events=[
            {
                "v": protocol.SCHEMA_VERSION,
                "device_id": "pi-1",
                "boot_id": BOOT,
                "seq": 0,
                "ts": now - 200,
                "type": "install_committed",
                "model": "digits",
                "detail": {"release": "digits:3"},
            }
        ],
        rejects=[Reject("not_json", "edgefleet/v1/pi-3/telemetry", "Expecting value", 12)] * 2,
    )
    store.close()
    return home


# --------------------------------------------------------------------------------------------------------------
# init


def test_init_creates_an_owner_only_home_with_a_database_and_is_idempotent(tmp_path: Path) -> None:
    home = tmp_path / "fleet-home"
    first = fleet("init", "--home", str(home), "--json")
    assert first.exit_code == 0
    made = json.loads(first.stdout)
    assert made["home"] == str(home)
    made_paths = {home, home / "broker", home / "fleet.db", home / "keys", home / "repo"}
    assert set(made["created"]) == {str(p) for p in made_paths}
    assert (home / "fleet.db").stat().st_mode & 0o777 == 0o600
    assert home.stat().st_mode & 0o777 == 0o700
    assert (home / "broker").stat().st_mode & 0o777 == 0o700

    again = fleet("init", "--home", str(home))
    assert again.exit_code == 0
    assert "up to date" in again.stdout


def test_the_home_comes_from_the_environment_when_no_option_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEFLEET_HOME", str(tmp_path / "from-env"))
    assert fleet("init").exit_code == 0
    assert (tmp_path / "from-env" / "fleet.db").exists()


def test_init_refuses_half_a_repository_and_says_what_to_restore(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert fleet("init", "--home", str(home)).exit_code == 0
    (home / "repo").rename(tmp_path / "repo-elsewhere")
    result = CliRunner().invoke(main, ["init", "--home", str(home)])
    assert result.exit_code == 1
    assert (
        f"{home / 'keys'} exists but {home / 'repo'} does not; restore {home / 'repo'} from your backup"
        in result.output
    )
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------------------------------------------
# serve, as a real process


def _first_line(proc: subprocess.Popen[str], timeout: float) -> str:
    stdout = proc.stdout
    assert stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    assert lines, f"`fleet serve` printed nothing in {timeout}s"
    return lines[0].strip()


def _publish(url: str, messages: list[tuple[str, Kind, dict[str, Any]]]) -> None:
    address = BrokerAddress.parse(url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="cli-test-device")
    client.connect(address.host, address.port)
    client.loop_start()
    for device_id, kind, message in messages:
        topic = protocol.topic(protocol.DEFAULT_PREFIX, device_id, kind)
        client.publish(topic, protocol.encode(kind, message), qos=1).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


def test_serve_runs_an_embedded_broker_stores_what_devices_publish_and_exits_cleanly_on_sigterm(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    stderr = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [str(FLEET), "serve", "--home", str(home), "--stats-interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    try:
        line = _first_line(proc, 20)
        assert line.startswith("broker: mqtt://127.0.0.1:"), line
        url = line.removeprefix("broker: ")
        telemetry = window("pi-9", 5, 1.7e9, latency_bucket=3, classes=[4])
        _publish(url, [("pi-9", Kind.STATUS, birth("pi-9")), ("pi-9", Kind.TELEMETRY, telemetry)])
        store = open_store(home / "fleet.db")
        wait_for(lambda: store.window_counts() == {"pi-9": 1}, "the window in the database")
        store.close()
        wait_for(lambda: "ingest_stats" in (tmp_path / "serve.log").read_text(), "a periodic stats line")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        stderr.close()

    logs = [json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines()]
    assert {"serve_started", "ingest_stats", "ingest_stopped", "serve_stopped"} <= {entry["event"] for entry in logs}
    address = BrokerAddress.parse(url)
    with pytest.raises(OSError), socket.create_connection((address.host, address.port), timeout=1):
        pass  # the embedded broker stopped with the fleet
    status = json.loads(fleet("status", "--home", str(home), "--json").stdout)
    assert status["windows"] == 1
    assert status["devices"] == {"total": 1, "online": 1, "offline": 0}


def test_serve_refuses_a_broker_url_it_cannot_use(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["serve", "--home", str(tmp_path), "--broker", "http://example.com"])
    assert result.exit_code == 2
    assert "mqtt://HOST:PORT" in result.output


def test_serve_exits_1_naming_the_fix_when_the_repository_port_is_taken_and_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        serve = [str(FLEET), "serve", "--home", str(home), "--repo-port", str(port), "--ingest-workers", "0"]
        result = subprocess.run(serve, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stdout == ""  # no broker: line for a fleet that is not running
    assert f"the repository server cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "--repo-port" in result.stderr and "Traceback" not in result.stderr
    assert not (home / "serve.json").exists()


def _serve_once(home: Path, log: Path, *options: str) -> tuple[str, str]:
    """Start `fleet serve`, read where it runs (its two stdout lines), stop it with SIGTERM."""
    with log.open("a") as stderr:
        proc = subprocess.Popen([str(FLEET), "serve", "--home", str(home), "--ingest-workers", "0", *options],
                                stdout=subprocess.PIPE, stderr=stderr, text=True)  # fmt: skip
        try:
            return _first_line(proc, 30), _first_line(proc, 5)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0


def test_serve_restarted_comes_back_on_the_same_broker_and_repository_addresses_and_says_when_one_is_taken(
    tmp_path: Path,
) -> None:
    home, log = tmp_path / "home", tmp_path / "serve.log"
    first = _serve_once(home, log)
    assert first[0].startswith("broker: mqtt://127.0.0.1:") and first[1].startswith("repo: http://127.0.0.1:")
    assert _serve_once(home, log) == first
    assert (home / "addresses.json").stat().st_mode & 0o777 == 0o600

    repo_port = int(first[1].rsplit(":", 1)[1])
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", repo_port))
        taken.listen()
        serve = [str(FLEET), "serve", "--home", str(home), "--ingest-workers", "0"]
        result = subprocess.run(serve, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("Error:")]
    assert f"127.0.0.1:{repo_port} (the last start's, remembered in {home / 'addresses.json'})" in line
    assert "--repo-port" in line and "Traceback" not in result.stderr


def test_serve_help_documents_the_remembered_ports() -> None:
    shown = " ".join(fleet("serve", "--help").stdout.split())
    assert "--port INTEGER RANGE Port of the embedded broker; remembered in <home>/addresses.json" in shown
    assert "--repo-port INTEGER RANGE Port of the release repository's HTTP server" in shown


# --------------------------------------------------------------------------------------------------------------
# The read commands


def test_a_device_enrolled_with_tags_is_listed_with_them_and_a_bad_tag_is_refused_in_one_line(
    home: Path, tmp_path: Path
) -> None:
    where = ["--broker", "mqtt://10.0.0.5:1883", "--repo-url", "http://10.0.0.5:8000", "--home", str(home)]
    enrolled = fleet("enroll", "pi-1", "--out", str(tmp_path / "pi-1"), "--tag", "site=berlin", "--tag", "hw=pi4",
                     *where, "--json")  # fmt: skip
    assert enrolled.exit_code == 0, enrolled.output
    assert json.loads(enrolled.stdout)["tags"] == {"site": "berlin", "hw": "pi4"}
    listed = {d["device_id"]: d for d in json.loads(fleet("devices", "list", "--home", str(home), "--json").stdout)}
    assert (listed["pi-1"]["tags"], listed["pi-2"]["tags"]) == ({"site": "berlin", "hw": "pi4"}, {})
    table = fleet("devices", "list", "--home", str(home)).stdout
    assert "hw=pi4" in table and "site=berl" in table  # a narrow terminal wraps the cell
    shown = json.loads(fleet("devices", "show", "pi-1", "--home", str(home), "--json").stdout)
    assert shown["tags"] == {"site": "berlin", "hw": "pi4"}
    for bad in ("site", "Site=x", "site=a b", "site=a --tag site=b"):
        refused = fleet("enroll", "pi-3", "--out", str(tmp_path / "pi-3"), *[a for t in bad.split(" --tag ")
                        for a in ("--tag", t)], *where)  # fmt: skip
        assert refused.exit_code == 2 and refused.stderr.strip().startswith("Error: ") and "tag" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert not (tmp_path / "pi-3").exists()


def test_devices_list_json_has_each_devices_state_windows_agent_and_models(home: Path) -> None:
    result = fleet("devices", "list", "--home", str(home), "--json")
    assert result.exit_code == 0
    devices = json.loads(result.stdout)
    assert [d["device_id"] for d in devices] == ["pi-1", "pi-2"]
    pi1, pi2 = devices
    assert set(pi1) == {"device_id", "online", "last_seen", "windows", "agent_version", "models", "releases", "tags"}
    assert pi1["tags"] == {}
    assert (pi1["online"], pi1["windows"], pi1["agent_version"]) == (True, 3, "0.3.1")
    assert pi1["models"] == {"digits": {"release": "digits:3"}}
    assert pi1["releases"] == {"digits": "digits:3"}
    assert (pi2["online"], pi2["windows"]) == (False, 0)
    assert abs(time.time() - datetime.fromisoformat(pi1["last_seen"]).timestamp()) < 60


def test_devices_list_prints_a_table_for_people(home: Path) -> None:
    result = fleet("devices", "list", "--home", str(home))
    assert result.exit_code == 0
    assert "pi-1" in result.stdout
    assert "pi-2" in result.stdout
    assert "0.3.1" in result.stdout


def test_devices_show_gives_the_birth_fields_counts_and_latest_events(home: Path) -> None:
    result = fleet("devices", "show", "pi-1", "--home", str(home), "--json")
    assert result.exit_code == 0
    device = json.loads(result.stdout)
    assert device["hardware"] == {"machine": "armv7l"}
    assert device["runtimes"] == ["onnxruntime", "litert"]
    assert (device["boot_id"], device["windows"], device["events"]) == (BOOT, 3, 1)
    assert [e["type"] for e in device["last_events"]] == ["install_committed"]
    last_install = device["last_install"]
    assert (last_install["type"], last_install["release"], last_install["reason"]) == (
        "install_committed",
        "digits:3",
        None,
    )

    offline = json.loads(fleet("devices", "show", "pi-2", "--home", str(home), "--json").stdout)
    assert (offline["online"], offline["offline_reason"]) == (False, "connection_lost")
    assert (offline["last_install"], offline["desired"]) == (None, None)
    assert "install_committed" in fleet("devices", "show", "pi-1", "--home", str(home)).stdout


def test_an_unknown_device_exits_with_code_3_and_says_so(home: Path) -> None:
    for command in (["devices", "show", "nope"], ["telemetry", "nope"]):
        result = CliRunner().invoke(main, [*command, "--home", str(home), "--json"])
        assert result.exit_code == 3
        assert "unknown device 'nope'" in result.output


def test_read_commands_fail_with_code_1_when_there_is_no_fleet_home(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["devices", "list", "--home", str(tmp_path / "missing")])
    assert result.exit_code == 1
    assert "fleet init" in result.output
    assert not (tmp_path / "missing").exists()


def _as_another_user(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run the real `fleet` as a user who may read but not write the home: nobody, through util-linux's setpriv, when
    the tests run as root (root writes anything); the tests' own user otherwise."""
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
    return subprocess.run([*drop, FLEET, *args], capture_output=True, text=True, timeout=120)


def test_read_commands_work_on_a_home_the_user_cannot_write_and_write_commands_say_why(
    home: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    readable = Path(tempfile.mkdtemp(prefix="fleet-ro-"))  # pytest's own folders are owner-only
    try:
        shared = readable / "home"
        shutil.copytree(home, shared)
        for path in (readable, *shared.rglob("*"), shared):
            path.chmod(0o555 if path.is_dir() else 0o444)
        before = {p: p.read_bytes() for p in shared.rglob("*") if p.is_file()}

        for command in (["devices", "list"], ["status"], ["telemetry", "pi-1"], ["devices", "show", "pi-1"],
                        ["audit", "--verify"]):  # fmt: skip
            result = _as_another_user([*command, "--home", str(shared), "--json"])
            assert result.returncode == 0, (command, result.stderr)
            json.loads(result.stdout)
        assert json.loads(_as_another_user(["status", "--home", str(shared), "--json"]).stdout)["windows"] == 3

        refused = _as_another_user(["release", "revoke", "digits:1", "--home", str(shared)])
        assert refused.returncode == 1
        assert refused.stderr.count("\n") == 1 and refused.stderr.startswith("Error: ")  # one line, no traceback
        assert "run as the home's owner" in refused.stderr
        assert {p: p.read_bytes() for p in shared.rglob("*") if p.is_file()} == before
    finally:
        for path in (readable, *readable.rglob("*")):
            path.chmod(0o755 if path.is_dir() else 0o644)
        shutil.rmtree(readable)


def test_telemetry_json_merges_the_windows_in_range_exactly(home: Path) -> None:
    everything = json.loads(fleet("telemetry", "pi-1", "--home", str(home), "--json").stdout)
    assert [w["seq"] for w in everything["windows"]] == [0, 1, 2]
    (merged,) = everything["merged"]
    assert (merged["model"], merged["release"], merged["windows"]) == ("digits", "digits:3", 3)
    assert (merged["count"], merged["errors"], merged["dropped"]) == (30, 3, 6)
    assert merged["classes"] == [10, 9, 11]
    assert merged["features"] == [[0, 30, 0, 0]]
    assert merged["latency"][4] == 20 and merged["latency"][12] == 10

    recent = json.loads(fleet("telemetry", "pi-1", "--since", "1h", "--home", str(home), "--json").stdout)
    assert [w["seq"] for w in recent["windows"]] == [1, 2]
    assert recent["merged"][0]["count"] == 20

    until = everything["windows"][1]["window_start"]  # ISO 8601, as the output gives it
    older = json.loads(fleet("telemetry", "pi-1", "--until", until, "--home", str(home), "--json").stdout)
    assert [w["seq"] for w in older["windows"]] == [0]
    other_model = json.loads(fleet("telemetry", "pi-1", "--model", "mnist", "--home", str(home), "--json").stdout)
    assert other_model["windows"] == [] and other_model["merged"] == []


def test_telemetry_for_people_shows_totals_error_rate_latency_percentiles_and_classes(home: Path) -> None:
    result = fleet("telemetry", "pi-1", "--home", str(home))
    assert result.exit_code == 0
    out = result.stdout
    assert "digits digits:3: 3 windows" in out
    assert "3 (10.00%)" in out  # errors and error rate
    assert f"<= {protocol.LATENCY_EDGES_MS[4]:g} ms" in out  # p50: 20 of 30 in bucket 4
    assert f"<= {protocol.LATENCY_EDGES_MS[12]:g} ms" in out  # p95: in bucket 12
    assert "0: 10, 1: 9, 2: 11" in out


def test_telemetry_rejects_a_time_it_cannot_read_as_a_usage_error(home: Path) -> None:
    result = CliRunner().invoke(main, ["telemetry", "pi-1", "--since", "yesterday-ish", "--home", str(home)])
    assert result.exit_code == 2
    assert "neither ISO 8601 nor an age" in result.output


def test_status_counts_devices_windows_events_and_rejects(home: Path) -> None:
    status = json.loads(fleet("status", "--home", str(home), "--json").stdout)
    assert status == {
        "devices": {"total": 2, "online": 1, "offline": 1},
        "windows": 3,
        "events": 1,
        "rejects": {"not_json": 2},
        "gaps": {"missing": 0, "devices": {}},
    }
    human = fleet("status", "--home", str(home)).stdout
    assert "1 online, 1 offline" in human
    assert "not_json: 2" in human


@pytest.mark.parametrize(
    "command",
    [[], ["init"], ["serve"], ["devices"], ["devices", "list"], ["devices", "show"], ["telemetry"], ["status"]],
)
def test_every_command_has_help(command: list[str]) -> None:
    result = fleet(*command, "--help")
    assert result.exit_code == 0
    assert "Usage:" in result.stdout


def test_serve_refuses_a_client_id_that_cannot_name_the_workers_shared_subscription(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["serve", "--home", str(tmp_path / "home"), "--client-id", "fleet/ingest"])
    assert result.exit_code == 2
    assert "may not hold '/'" in result.output
    assert not (tmp_path / "home").exists()  # refused before anything was made


def test_the_installed_fleet_command_names_the_extra_it_needs_when_it_is_missing(tmp_path: Path) -> None:
    """As after `pip install ".[agent]"` on a device: the package is there, click and the fleet's stack are not."""
    root = Path(__file__).resolve().parent.parent
    code = f"import sys; sys.path.insert(0, {str(root)!r}); from fleet.launcher import main; main()"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # -S: no site-packages, so only the stdlib and the source tree can be imported.
    done = subprocess.run([sys.executable, "-S", "-c", code, "status"], env=env, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr == "fleet needs the fleet extra: pip install 'edgefleet[fleet]'\n"
    installed = subprocess.run([FLEET, "--version"], capture_output=True, text=True, timeout=60)
    assert installed.returncode == 0 and installed.stdout.startswith("fleet, version")


# --------------------------------------------------------------------------------------------------------------
# Gaps and conflicts in the read commands


def test_devices_show_and_status_show_the_seqs_missing_per_device_and_a_resend_clears_them(home: Path) -> None:
    now = time.time()
    store = open_store(home / "fleet.db")
    store.write_batch(windows=[window("pi-1", s, now - 100, 4, [1, 0, 0]) for s in (5, 9)])  # pi-1 had 0-2
    store.close()

    shown = json.loads(fleet("devices", "show", "pi-1", "--home", str(home), "--json").stdout)
    assert shown["missing"] == 5
    assert [(g["first"], g["last"], g["missing"]) for g in shown["gaps"]] == [(3, 4, 2), (6, 8, 3)]
    assert {(g["prev_boot_id"], g["boot_id"]) for g in shown["gaps"]} == {(BOOT, BOOT)}
    assert json.loads(fleet("devices", "show", "pi-2", "--home", str(home), "--json").stdout)["gaps"] == []
    human = fleet("devices", "show", "pi-1", "--home", str(home)).stdout
    assert "gaps: 5 seqs missing" in human
    assert "6-8" in human

    status = json.loads(fleet("status", "--home", str(home), "--json").stdout)
    assert status["gaps"] == {"missing": 5, "devices": {"pi-1": 5}}
    assert "5 seqs missing on 1 devices (pi-1: 5)" in fleet("status", "--home", str(home)).stdout

    store = open_store(home / "fleet.db")
    store.write_batch(windows=[window("pi-1", s, now - 100, 4, [1, 0, 0]) for s in (3, 4, 6, 7, 8)])
    store.close()
    assert json.loads(fleet("status", "--home", str(home), "--json").stdout)["gaps"] == {"missing": 0, "devices": {}}
    assert json.loads(fleet("devices", "show", "pi-1", "--home", str(home), "--json").stdout)["gaps"] == []
    assert ["gaps", "none"] in [line.split() for line in fleet("status", "--home", str(home)).stdout.splitlines()]


def test_status_counts_a_conflicting_copy_among_the_rejects(home: Path) -> None:
    now = time.time()
    store = open_store(home / "fleet.db")
    store.write_batch(windows=[window("pi-1", 1, now - 600, 4, [0, 7, 1])])  # differs from the stored seq 1
    (stored,) = store.db.execute("SELECT payload FROM windows WHERE device_id = 'pi-1' AND seq = 2").fetchone()
    copy = protocol.decode(Kind.TELEMETRY, stored)
    store.write_batch(windows=[copy], payloads=[stored])  # an identical copy: a plain duplicate
    store.close()
    status = json.loads(fleet("status", "--home", str(home), "--json").stdout)
    assert status["rejects"] == {"conflict": 1, "not_json": 2}
    assert "conflict: 1" in fleet("status", "--home", str(home)).stdout
