"""Issue 10: a committed release that crashes the runtime, a smoke test that ran another runtime than the one that
serves, and two agents on one state folder.

Real `edge-agent run` children, a real broker, the fleet's real ingest and store, real signed releases of the
project's models. The one fault injected is a model that crashes its runtime on some inputs
(``EDGEFLEET_FAULT_SEGV_WHEN``, agent/faults.py): real crashing models are hard to build on demand. The commit watch's
rules (clean stops, the window, a clock set back, the start cap) are checked on the installer through the stand-in
host of tests/test_install_table.py, where clocks and crashes are cheap to arrange.
"""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fleet_fixtures import EventTap, Fleet, deliver, device_view, new_device_id, wait_for
from test_install import (
    Device,
    agent_status,
    agent_toml,
    card_of,
    device,
    fleet,
    persisted_install,
    releases,
    smoke_rows,
    start_agent,
    stop_agent,
)
from test_install_table import Bench, StandInHost, bench, idle_totals, install_to_probation

from agent.cli import EXIT_BUSY
from agent.config import ConfigError, parse
from agent.faults import FAULT_SEGV_WHEN
from agent.update.install import Installer
from agent.update.probation import commit_watch_s
from agent.update.slots import SlotStore
from fleet.broker import MosquittoBroker, free_port
from fleet.ingest.mqtt import Ingest
from fleet.store import open_store
from fleet.trust.releases import ReleaseInfo

#: The fixtures shared with the install tests: pytest finds them by these names in this module.
SHARED_FIXTURES = (bench, device, fleet, releases)

# --------------------------------------------------------------------------------------------------------------
# Case 2: a committed release that crashes the runtime on some inputs is rolled back by the crash loop it causes


def infer(port: int, rows: np.ndarray) -> tuple[int, dict[str, Any]]:
    """POST an OIP v2 infer request to the agent's local endpoint, as an application does."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/v2/models/digits")
        name = json.loads(connection.getresponse().read())["inputs"][0]["name"]
        body = {"inputs": [{"name": name, "datatype": "FP32", "shape": list(rows.shape), "data": rows.tolist()}]}
        connection.request("POST", "/v2/models/digits/infer", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def ready(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", "/v2/health/ready")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def test_a_committed_release_that_crashes_the_runtime_is_rolled_back_by_its_crash_loop(
    tmp_path: Path,
    broker: MosquittoBroker,
    fleet: Fleet,
    releases: dict[str, ReleaseInfo],
    example_model: Callable[..., Path],
) -> None:
    """1.1.0 segfaults its runtime when input[0] > 0.5, which no signed smoke sample has: it passes the smoke test and
    probation and is committed. Then one such request kills the agent; restarted (as systemd does), it serves 1.1.0
    again and the next such request kills it again, until the start at ``crash_loop_limit`` rolls 1.1.0 back before
    anything is served. 1.0.0 answers the same request, and the fleet shows the rollback as the device's last install.
    """
    good, better = example_model("good"), example_model("better")
    device_id = new_device_id("segv")
    state_dir = tmp_path / device_id
    port = free_port()
    config = agent_toml(tmp_path, device_id, broker.url, fleet, good, probation_s=60, crash_loop_limit=3)
    config.write_text(config.read_text().replace("enabled = false", f'listen = "127.0.0.1:{port}"'))
    log = tmp_path / "agent.log"
    env = {FAULT_SEGV_WHEN: releases["better"].sha256}
    crashing = smoke_rows(better)[:1].copy()
    crashing[0, 0] = 1.0  # a corner pixel no digit in the signed samples lights
    store = open_store(tmp_path / "fleet.db")
    ingest = Ingest(store, broker.url, client_id=f"ingest-{uuid.uuid4().hex[:10]}")
    ingest.start()
    assert ingest.wait_ready(10)
    tap = EventTap(broker.url, device_id)
    try:
        deliver(broker.url, device_id, fleet.desired(device_id, 1, releases["better"]))
        agent = start_agent(config, log, **env)
        tap.wait_for("install_state", 60, state="PROBATION")
        wait_for(lambda: ready(port), 30, "the local endpoint")
        assert infer(port, smoke_rows(better))[0] == 200  # 16 healthy inferences ...
        assert infer(port, smoke_rows(better)[:4])[0] == 200  # ... and 4: probation's 20
        assert tap.wait_for("install_committed", 30)["detail"]["release"] == "digits:1.1.0"

        for crash in range(1, 4):
            wait_for(lambda: ready(port), 30, "the local endpoint")
            status, answer = infer(port, smoke_rows(better)[:1])
            assert (status, answer["model_version"]) == (200, "digits:1.1.0")
            with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
                print("DEBUG", crash, infer(port, crashing))
            assert agent.wait(30) == -signal.SIGSEGV, log.read_text()[-3000:]
            record = persisted_install(state_dir)
            assert (record["state"], record["restarts"], record["clean_stop"]) == ("COMMITTED", crash - 1, False)
            agent = start_agent(config, log, **env)  # what systemd's Restart=on-failure does

        try:
            wait_for(lambda: ready(port), 30, "the local endpoint after the rollback")
            status, answer = infer(port, crashing)  # the same request, answered by the previous release
            assert (status, answer["model_version"]) == (200, "digits:1.0.0")
            assert np.isfinite(answer["outputs"][0]["data"]).all()
            rolled_back = tap.wait_for("rolled_back", 30)
            assert agent.poll() is None  # nothing replayed the request that crashed 1.1.0
        finally:
            stop_agent(agent, log)
    finally:
        tap.close()
        ingest.stop()

    assert rolled_back["detail"]["reason"] == "crash_loop_after_commit"
    assert (rolled_back["detail"]["release"], rolled_back["detail"]["to"]) == ("digits:1.1.0", "digits:1.0.0")
    assert [e["detail"]["restarts"] for e in tap.of("unclean_restart")] == [1, 2, 3]
    assert tap.states()[-2:] == ["REVERTING", "IDLE"]
    status_file = json.loads((state_dir / "status.json").read_text())["models"]["digits"]
    assert status_file["release"] == "digits:1.0.0" and status_file["slots"]["active"]["factory"]
    assert status_file["install"]["last_outcome"]["reason"] == "crash_loop_after_commit"
    assert not (state_dir / "models" / "digits" / f"{releases['better'].sha256}.onnx").exists()

    def last_install() -> dict[str, Any] | None:  # what `fleet devices show --json` prints as last_install
        shown = (device_view(store, device_id) or {}).get("last_install")
        return shown if shown and shown["type"] == "rolled_back" else None

    try:
        shown = wait_for(last_install, 15, "the fleet to store the rollback")
    finally:
        store.close()
    assert (shown["release"], shown["reason"], shown["desired_seq"]) == ("digits:1.1.0", "crash_loop_after_commit", 1)


@dataclass
class ClockedHost(StandInHost):
    """The stand-in host with a device clock that can be set off the real one."""

    offset: float = 0.0

    def clock(self) -> float:
        return time.time() + self.offset


def commit(bench_: Bench) -> None:
    """Install and commit the bench's release, then stop cleanly."""
    host = StandInHost()
    installer = install_to_probation(bench_, host)
    host.counts["digits"] = idle_totals(count=20)
    host.wait_for("install_committed")
    wait_for(lambda: installer.model_status("digits")["install"]["last_outcome"]["reported"], 10, "the report")
    installer.close(5)


def start(bench_: Bench, offset: float = 0.0) -> tuple[ClockedHost, Installer]:
    """One start of the agent: the installer recovers, and the host serves what it says. Not closing the installer
    afterwards is a crash: no clean stop is recorded."""
    host = ClockedHost(offset=offset)
    installer = bench_.installer(host)
    host.served = installer.recover(lambda cfg: cfg)
    return host, installer


def test_the_commit_watch_lasts_what_the_signed_card_or_the_config_says(tmp_path: Path) -> None:
    base = {"device_id": "dev-1", "state_dir": "state", "mqtt": {"broker": "mqtt://127.0.0.1:1883"}}
    update = {"repo_url": "https://releases.example", "trusted_root": "root.json", "director_key": "director.json"}
    config, off = (
        parse({**base, "update": {**update, **extra}}, tmp_path).update for extra in ({}, {"commit_watch_s": 0})
    )
    assert config is not None and off is not None and (config.commit_watch_s, off.commit_watch_s) == (3600.0, 0.0)
    with pytest.raises(ConfigError, match=r"\[update\] commit_watch_s must be between 0 and 604800, got -1"):
        parse({**base, "update": {**update, "commit_watch_s": -1}}, tmp_path)
    assert commit_watch_s({}, config) == 3600.0
    assert commit_watch_s({"probation": {"watch_s": 600}}, config) == 600.0  # the signed card wins
    assert commit_watch_s({"probation": {"watch_s": -1}}, config) == 3600.0  # a nonsense value does not


def test_clean_stops_after_commit_are_not_counted_and_unclean_starts_roll_the_release_back(bench: Bench) -> None:
    commit(bench)
    for _ in range(2):  # orderly restarts: never a crash
        host, installer = start(bench)
        assert host.served["digits"].release == "digits:1.1.0" and not host.of("unclean_restart")
        installer.close(5)
    start(bench)  # never stopped: it crashes
    for crash in range(1, 3):
        host, _ = start(bench)  # the previous start was never stopped: it crashed, and so does this one
        assert host.served["digits"].release == "digits:1.1.0"
        assert [e["restarts"] for e in host.of("unclean_restart")] == [crash]
    host, _ = start(bench)
    assert host.served["digits"] == bench.factory  # reverted before anything was served
    rolled_back = host.wait_for("rolled_back")
    assert (rolled_back["reason"], rolled_back["release"], rolled_back["to"]) == (
        "crash_loop_after_commit",
        "digits:1.1.0",
        "digits:1.0.0",
    )
    assert host.states() == ["REVERTING", "IDLE"]


@pytest.mark.parametrize("offset", [7200.0, -86400.0], ids=["window_passed", "clock_set_back"])
def test_the_watch_ends_when_the_device_clock_is_outside_its_window(bench: Bench, offset: float) -> None:
    """Past commit_watch_s, or with the clock set back before the commit: crashes no longer roll the release back,
    and the watch stays over even once the clock reads inside the window again."""
    commit(bench)
    for clock in (offset, offset, 0.0, 0.0):
        host, _ = start(bench, clock)
        assert host.served["digits"].release == "digits:1.1.0"
        assert not host.of("unclean_restart") and not host.of("rolled_back")
    record = persisted(bench)
    assert (record["state"], record["watch_over"], record["restarts"]) == ("COMMITTED", True, 0)


def test_the_watch_ends_after_twice_crash_loop_limit_starts_so_a_stuck_clock_cannot_keep_it(bench: Bench) -> None:
    commit(bench)
    for _ in range(2 * bench.update.crash_loop_limit):  # clean restarts, with a clock that never leaves the window
        _, installer = start(bench)
        installer.close(5)
    assert persisted(bench)["watch_over"] is True
    for _ in range(bench.update.crash_loop_limit):
        host, _ = start(bench)
        assert host.served["digits"].release == "digits:1.1.0"
        assert not host.of("unclean_restart") and not host.of("rolled_back")


def persisted(bench_: Bench) -> dict[str, Any]:
    store = SlotStore(bench_.state_dir)
    try:
        return store.load("digits")[1]
    finally:
        store.close()


# --------------------------------------------------------------------------------------------------------------
# Case 3: the runtime the smoke test ran is the runtime that serves


def tfl3_onnx_release(fleet_: Fleet, better: Path, tmp_path: Path) -> ReleaseInfo:
    """1.1.0's int8 ONNX model, valid ONNX, whose bytes 4..8 read ``TFL3`` (the TFLite file identifier).

    An ONNX file is a serialized ModelProto, whose fields protobuf writes in field-number order: field 1,
    ``ir_version`` (tag 0x08, a varint of one byte for versions below 128), then field 2, ``producer_name`` (tag 0x12,
    a one-byte length for names below 128 bytes). So bytes 4.. are the producer name's: a producer named ``TFL3...``
    makes a file that onnx.checker and onnxruntime take and that content detection calls TFLite.
    """
    import onnx

    model = onnx.load(better / "int8.onnx")
    model.producer_name = f"TFL3 {model.producer_name}"
    path = tmp_path / "tfl3.onnx"
    onnx.save(model, path)
    data = path.read_bytes()
    assert data[:2] == bytes([0x08, model.ir_version]) and data[2] == 0x12 and data[4:8] == b"TFL3"
    onnx.checker.check_model(onnx.load(path))
    return fleet_.publish_like(path, "1.1.2", card_of(better), "int8.onnx")


def test_an_onnx_release_that_looks_like_tflite_is_served_by_the_runtime_its_smoke_test_ran(
    device: Callable[..., Device], fleet: Fleet, tmp_path: Path, example_model: Callable[..., Path]
) -> None:
    better = example_model("better")
    release = tfl3_onnx_release(fleet, better, tmp_path)
    assert release.runtime == "onnxruntime"
    d = device()
    d.deliver(fleet.desired(d.config.device_id, 1, release))
    d.tap.wait_for("install_state", state="PROBATION")
    d.core.predict("digits", smoke_rows(better))
    d.core.predict("digits", smoke_rows(better)[:4])
    outcome = wait_for(lambda: d.tap.of("install_committed", "install_failed", "rolled_back"), 30, "the outcome")[0]
    assert (outcome["type"], outcome["detail"]["release"]) == ("install_committed", "digits:1.1.2"), outcome
    assert d.core.models["digits"].model.runtime == "onnxruntime"
    d.assert_serves("digits:1.1.2", better)
    d.shutdown()
    d.boot()  # served from its slot at start-up: the same runtime
    assert d.core.models["digits"].model.runtime == "onnxruntime"
    d.assert_serves("digits:1.1.2", better)


# --------------------------------------------------------------------------------------------------------------
# Case 5: one agent per state folder


def test_a_second_agent_on_the_same_state_folder_exits_at_once_naming_the_first(
    tmp_path: Path, broker: MosquittoBroker, fleet: Fleet, example_model: Callable[..., Path]
) -> None:
    device_id = new_device_id("twice")
    state_dir = tmp_path / device_id
    config = agent_toml(tmp_path, device_id, broker.url, fleet, example_model("good"))
    log = tmp_path / "agent.log"
    first = start_agent(config, log)
    try:
        wait_for(lambda: agent_status(first, state_dir), 30, "the first agent to start")
        started = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert time.monotonic() - started < 20
        said = [line for line in second.stderr.splitlines() if not line.startswith("{")]
        assert second.returncode == EXIT_BUSY, second.stderr
        assert said == [
            f"edge-agent: another edge-agent (pid {first.pid}) is running on state folder {state_dir}; "
            f"stop it, or set another state_dir in {config}"
        ]
        assert first.poll() is None and agent_status(first, state_dir)  # the first one never noticed
    finally:
        first.send_signal(signal.SIGKILL)  # the lock dies with its process
        first.wait(20)
    again = start_agent(config, log)
    try:
        wait_for(lambda: agent_status(again, state_dir), 30, "an agent to start after a SIGKILL")
        assert (state_dir / "agent.lock").read_text().strip() == str(again.pid)
    finally:
        stop_agent(again, log)
